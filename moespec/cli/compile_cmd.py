"""`moespec compile SPEC`: build the torch model a spec describes, count its parameters from
the built module, optionally run one forward/backward (`--check`) and save it (`--out`).

Full-size specs (Mixtral, DeepSeek-V3) are built on the meta device: shapes and counts
without memory. `--device auto` decides by the exact count of a meta build, which is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moespec.cli.common import console, emit_json, fail, load_plan_or_exit, one_line, writable_dir_or_exit, write_atomic

# Above this many parameters `--device auto` stays on meta: 200M float32 weights are 0.8 GB,
# and the check's gradients and activations double that, still fine on a laptop.
CPU_COMPILE_LIMIT = 200_000_000


def compile_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    check: bool = typer.Option(False, "--check", help="Run one forward and backward on random tokens."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write model.safetensors and spec.json into this folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weight initialisation and the check's tokens."),
    device: str = typer.Option("auto", "--device", help="meta, cpu, or auto (meta above 200M parameters)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Load a Hugging Face checkpoint (safetensors) into the model; builds on cpu."),
) -> None:
    """Compile a spec to a PyTorch module and print its layers with total and active parameters."""
    plan = load_plan_or_exit(spec)
    if device not in ("auto", "meta", "cpu"):
        fail(f"--device must be auto, meta or cpu, not {device!r}")
    if out is not None:
        if str(out) in ("", "."):
            fail("--out needs a folder name (model.safetensors and spec.json go into it)")
        writable_dir_or_exit(out, "--out")

    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters

    try:
        model = build_model(plan, seed=seed, device="meta")
        counts = count_parameters(model, plan)
        if weights is not None and device == "meta":
            fail("--weights needs real memory; use --device cpu (or auto) with it")
        if device == "cpu" or weights is not None or (device == "auto" and counts.total <= CPU_COMPILE_LIMIT):
            model = build_model(plan, seed=seed, device="cpu")
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        fail(f"{spec}: cannot build the model: {one_line(exc)}")
    loaded = None
    if weights is not None:
        from moespec.interop.hf_weights import load_hf_weights

        try:
            loaded = load_hf_weights(model, weights)
        except ValueError as exc:
            fail(str(exc))
    on = next(model.parameters()).device.type

    check_result = None
    if check:
        from moespec.distributed.parallelize import apply_recompute
        from moespec.train import check_step

        apply_recompute(model, plan.parallel.recompute)  # the check's backward replays what training would
        try:
            check_result = check_step(
                model, batch=plan.parallel.micro_batch, seq_len=plan.model.seq_len, vocab_size=plan.model.vocab_size, seed=seed,
                encoder_seq_len=plan.model.encoder.seq_len if plan.model.encoder else None,
            )
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            hint = (
                "; on meta only code that never reads routed values back can run (capacity mode, not dropless)"
                if on == "meta"
                else ""
            )
            fail(f"{spec}: --check failed on {on}: {one_line(exc)}{hint}", code=1)

    written = None
    if out is not None:
        if on == "meta":
            fail(
                f"--out needs real weights, but {plan.name} has {counts.total:,} parameters "
                f"(over {CPU_COMPILE_LIMIT:,}) and was built on meta; pass --device cpu to materialise it"
            )
        written = save_compiled(model, plan, out)

    document = {
        "spec": str(spec),
        "name": plan.name,
        "device": on,
        "seed": seed,
        "params": counts.as_dict(),
        "check": check_result,
        "out": written,
        "weights": None if weights is None else {"from": str(weights), "tensors": loaded},
        "base_auction": _base_auction(plan),
    }
    if as_json:
        emit_json(document)
        return
    _print_report(plan, counts, on, check_result, written)
    if document["base_auction"] == "compiled":
        console.print("BASE auction on CPU: compiled rounds and augmenting paths (moespec/model/_auction_c.c)")
    elif document["base_auction"] == "numpy":
        console.print(
            "BASE auction on CPU: in numpy, as the compiled kernels were not built at install (no C compiler?): "
            "the same assignments, 3-5x slower; reinstall with gcc or cc on PATH"
        )
    if loaded is not None:
        console.print(f"weights: {loaded} tensors loaded from {weights}")


def _base_auction(plan) -> str | None:
    """Which solver a BASE layer's auction runs on the host (None without BASE layers): the
    compiled kernels, or numpy where they were not built at install; the same assignments."""
    if not any(layer.moe.router.type == "base" for layer in plan.moe_layers):
        return None
    from moespec.model import auction_kernels

    return "compiled" if auction_kernels.available() else "numpy"


def save_compiled(model, plan, out: Path) -> dict:
    """The state dict (safetensors when installed, else torch.save) and the resolved plan as
    JSON, each written atomically so that an interrupted save leaves no partial file."""
    import io

    import torch

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    try:
        from safetensors.torch import save as safetensors_save

        weights_path, payload = out / "model.safetensors", safetensors_save(state, metadata={"spec": plan.name})
    except ImportError:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        weights_path, payload = out / "model.pt", buffer.getvalue()
    spec_path = out / "spec.json"
    try:
        write_atomic(weights_path, payload)
        write_atomic(spec_path, json.dumps(plan.to_dict(), indent=2) + "\n")
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror or exc}")
    return {"weights": str(weights_path), "spec": str(spec_path), "tensors": len(state)}


def human(n: int) -> str:
    """12_900_000_000 -> '12.9B'; small counts stay exact."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def _layer_rows(counts) -> list[tuple]:
    """One row per run of identical consecutive layers, so a 61-layer model stays readable."""
    rows: list[tuple] = []
    for layer in counts.layers:
        experts = "-" if layer.kind == "dense" else f"{layer.n_experts} (k={layer.experts_per_token})"
        if layer.kind == "moe" and layer.shared:
            experts += f" + shared {human(layer.shared)}"
        key = (layer.kind, layer.router or "-", experts, layer.total, layer.active)
        if rows and rows[-1][1:] == key:
            rows[-1] = (f"{rows[-1][0].split('-')[0]}-{layer.index}", *key)
        else:
            rows.append((str(layer.index), *key))
    return rows


def _print_report(plan, counts, on: str, check_result: dict | None, written: dict | None) -> None:
    console.print(f"[bold]{plan.name}[/bold] compiled on {on}" + (" (shapes only, no memory)" if on == "meta" else ""))
    table = Table()
    for column in ("layer", "kind", "router", "experts", "params", "active/token"):
        table.add_column(column, justify="right" if column in ("params", "active/token") else "left")
    for index, kind, router, experts, total, active in _layer_rows(counts):
        table.add_row(index, kind, router, experts, f"{total:,}", f"{active:,}")
    console.print(table)
    head = "LM head tied to it" if counts.tied_embeddings else f"untied LM head {counts.lm_head:,} more"
    console.print(f"embedding table{'s' if plan.model.positions == 'learned' else ''}: {counts.embedding:,} ({head}); final norm {counts.final_norm:,}")
    console.print(f"total parameters: {counts.total:,} ({human(counts.total)})")
    console.print(
        f"active per token: {counts.active:,} ({human(counts.active)}), embeddings included; "
        f"non-embedding total {counts.non_embedding:,}"
    )
    if check_result is not None:
        shape = "x".join(map(str, check_result["logits_shape"]))
        if check_result["loss"] is None:
            console.print(f"check: forward+backward on meta ran; logits [{shape}] (shapes only, no loss values)")
        else:
            console.print(
                f"check: logits [{shape}], loss {check_result['loss']:.4f} "
                f"(cross-entropy {check_result['ce_loss']:.4f} + aux {check_result['aux_loss']:.4f}), "
                f"{check_result['params_with_grad']:,} parameters got gradients"
            )
    if written is not None:
        console.print(f"wrote {written['weights']} ({written['tensors']} tensors) and {written['spec']}")
