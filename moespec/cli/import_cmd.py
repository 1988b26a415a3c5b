"""`moespec import CONFIG.json|DIR [-o spec.yaml]`: a Hugging Face config as a moespec spec."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moespec.cli.common import console, emit_json, fail, write_atomic


def import_command(
    config: Path = typer.Argument(..., help="A Hugging Face config.json, or a model directory holding one.", show_default=False),
    out: Path = typer.Option(None, "--out", "-o", help="Write the spec here (default: print it)."),
    name: str = typer.Option(None, "--name", help="Spec name (default: from the family)."),
    seq_len: int = typer.Option(None, "--seq-len", min=1, help="Training sequence length (default: the config's maximum, at most 4096)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: family, counts, notes and the spec."),
) -> None:
    """Write the spec of a Hugging Face MoE model; its parameter count equals the HF model's.
    Fields that change nothing countable are listed as notes; a field the spec language
    cannot express is refused in one line (exit 2)."""
    import yaml

    from moespec.interop.hf_config import import_config, read_config
    from moespec.sim.counts import predict_params
    from moespec.spec import SpecErrors, plan_from_text
    from moespec.spec.emit import _SpecDumper

    try:
        imported = import_config(read_config(config), name=name or _default_name(config), seq_len=seq_len)
    except ValueError as exc:
        fail(f"{config}: {exc}")
    body = yaml.dump(imported.spec, Dumper=_SpecDumper, sort_keys=False, default_flow_style=None, width=100)
    try:
        plan = plan_from_text(body, str(out or config))
    except SpecErrors as errors:  # a reader wrote something the schema refuses: say which field
        fail(f"{config}: the imported spec does not validate: {errors.errors[0].format()}")
    params = predict_params(plan)
    header = [f"# Imported from {config} ({imported.family}) by `moespec import`.",
              f"# Parameters: {params.total:,} total, {params.active:,} active per token (Hugging Face counts the same)."]  # fmt: skip
    header += [f"# note: {line}" for line in imported.notes]
    text = "\n".join(header) + "\n" + body
    if out is not None:
        write_atomic(out, text)
    if as_json:
        emit_json({"family": imported.family, "name": plan.name, "params_total": params.total, "params_active": params.active,
                   "moe_layers": len(plan.moe_layers), "notes": imported.notes, "out": str(out) if out else None, "spec": imported.spec})  # fmt: skip
        return
    if out is None:  # raw: a terminal-width wrap would break the YAML
        sys.stdout.write(text)
        return
    console.print(f"[bold]{plan.name}[/bold] ({imported.family}): {params.total:,} parameters, {params.active:,} active; "
                  f"{len(plan.moe_layers)} of {len(plan.layers)} {'blocks (encoder and decoder)' if plan.model.encoder else 'layers'} MoE -> {out}",
                  soft_wrap=True)  # fmt: skip
    for line in imported.notes:
        console.print(f"  note: {line}", markup=False, soft_wrap=True)


def _default_name(config: Path) -> str | None:
    """The model's folder name (or the file's stem unless it is `config`), as a spec name."""
    import re

    path = config.resolve()
    stem = path.name if path.is_dir() else (path.parent.name if path.stem == "config" else path.stem)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._").lower()[:128]
    return name or None
