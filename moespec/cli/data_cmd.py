"""`moespec data prepare TEXT --out FILE.bin`: tokenise a text file once, so that `train --data`
memory-maps ids instead of tokenising on every launch (and every rank)."""

from __future__ import annotations

from pathlib import Path

import typer

from moespec.cli.common import console, emit_json, fail

data_app = typer.Typer(help="Prepare training data: text to a token file.", no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False)  # fmt: skip


@data_app.command("prepare")
def prepare_command(
    source: Path = typer.Argument(..., help="A UTF-8 text file.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Token file to write: FILE.bin (flat ids, nanoGPT's layout) or FILE.npy; FILE.json beside it records dtype and tokenizer.", show_default=False),
    tokenizer: str = typer.Option("bytes", "--tokenizer", help="bytes (vocabulary 256), or a Hugging Face tokenizer name (needs transformers and its files)."),
    dtype: str = typer.Option("", "--dtype", help="uint16, uint32, int32 or int64; default: uint16 when every id fits, else uint32."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Tokenise TEXT into a token file that `moespec train --data` reads memory-mapped."""
    from moespec.data.tokens import TokenFileError, prepare

    if out.exists() and out.is_dir():
        fail(f"--out {out} is a directory; give a file name ending in .bin or .npy")
    try:
        meta = prepare(source, out, tokenizer=tokenizer, dtype=dtype or None)
    except TokenFileError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    document = {"out": str(out), **meta}
    if as_json:
        emit_json(document)
        return
    console.print(f"{out}: {meta['tokens']:,} tokens ({meta['dtype']}, tokenizer {meta['tokenizer']}, largest id {meta['max_id']:,})")
