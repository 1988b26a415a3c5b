"""`moespec export SPEC --family F -o DIR`: the compiled model as a Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moespec.cli.common import console, emit_json, fail, load_plan_or_exit, one_line


def export_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    family: str = typer.Option(..., "--family", help="Hugging Face model_type to write: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss, glm4_moe, dots1, phimoe, dbrx, granitemoe, ernie4_5_moe, llama4_text or switch_transformers."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.safetensors and config.json."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights to export: a `compile --out` folder or a HF checkpoint (default: the seeded initialisation)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation when no --weights are given."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Write the spec's model as safetensors plus config.json that transformers loads as the
    same model (same logits); a spec key the family cannot hold is refused in one line."""
    from moespec.interop.hf_export import export_config
    from moespec.interop.hf_weights import load_hf_weights, save_hf_checkpoint
    from moespec.model.build import build_model

    plan = load_plan_or_exit(spec)
    try:
        config = export_config(plan, family)
    except ValueError as exc:
        fail(f"{spec}: {exc}")
    try:
        model = build_model(plan, seed=seed, device="cpu")
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        fail(f"{spec}: cannot build the model: {one_line(exc)}")
    if weights is not None:
        try:
            load_hf_weights(model, weights)
        except ValueError as exc:
            fail(str(exc))
    written = [str(path) for path in save_hf_checkpoint(model, out, config)]
    if as_json:
        emit_json({"spec": str(spec), "family": family, "files": written, "weights": str(weights) if weights else None})
        return
    console.print(f"[bold]{plan.name}[/bold] as {family}: " + ", ".join(written))
