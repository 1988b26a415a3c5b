"""`moespec validate SPEC...`: schema and semantic checks, every error on one located line."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from moespec.cli.common import BAD_INPUT_EXIT, console, emit_json, err_console


def validate_command(
    specs: List[Path] = typer.Argument(..., help="Spec files to check.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Check specs against the schema and the cross-field rules; exit 2 if any is invalid."""
    from moespec.spec import SpecErrors, load_plan

    results = []
    for path in specs:
        try:
            plan = load_plan(path)
        except SpecErrors as errors:
            results.append({"file": str(path), "valid": False, "errors": [e.to_dict() for e in errors.errors]})
            if not as_json:
                for error in errors.errors:
                    err_console.print(error.format(), markup=False, soft_wrap=True)
            continue
        summary = {
            "name": plan.name,
            "layers": len(plan.layers),
            "moe_layers": len(plan.moe_layers),
            "routers": sorted({layer.moe.router.type for layer in plan.moe_layers}),
        }
        results.append({"file": str(path), "valid": True, "errors": [], **summary})
        if not as_json:
            routers = ", ".join(summary["routers"]) or "dense"
            console.print(
                f"[green]ok[/green] {path}: {plan.name} ({summary['layers']} layers, "
                f"{summary['moe_layers']} MoE; {routers})"
            )
    invalid = sum(not result["valid"] for result in results)
    if as_json:
        emit_json({"valid": invalid == 0, "files": results})
    elif len(results) > 1:
        console.print(f"{len(results) - invalid} valid, {invalid} invalid")
    if invalid:
        raise typer.Exit(BAD_INPUT_EXIT)
