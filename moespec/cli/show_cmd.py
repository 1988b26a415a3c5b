"""`moespec show SPEC`: the resolved plan, every default filled in and every layer explicit."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moespec.cli.common import console, emit_json, load_plan_or_exit


def show_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved plan as one JSON document."),
    every_layer: bool = typer.Option(False, "--every-layer", help="One row per layer instead of grouping runs."),
) -> None:
    """Print the resolved plan: model shape, parallelism and a row per layer (or run of layers)."""
    from moespec.spec.describe import grouped_rows, layer_row

    plan = load_plan_or_exit(spec)
    if as_json:
        emit_json(plan.to_dict())
        return
    m, p = plan.model, plan.parallel
    attention = "MHA" if m.n_kv_heads == m.n_heads else f"GQA {m.n_kv_heads} kv"
    console.print(f"[bold]{plan.name}[/bold]  {plan.description}".rstrip())
    console.print(
        f"model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({attention}, head_dim {m.head_dim}), "
        f"d_ff {m.d_ff}, {m.activation}, {m.norm}, {m.positions}, vocab {m.vocab_size}, seq {m.seq_len}, "
        f"{'tied' if m.tied_embeddings else 'untied'} embeddings"
    )
    console.print(
        f"parallel: world {p.world} = pp {p.pp} x tp {p.tp} x dp {p.dp} (ep {p.ep}), micro_batch {p.micro_batch}, "
        f"global_batch {p.global_batch} (accum {p.grad_accum}), {p.precision}, ZeRO-{p.zero_stage}, recompute {p.recompute}; "
        f"T = {plan.tokens_per_group} tokens per routing group"
    )
    table = Table(show_lines=False)
    for column in ("layer", "kind", "router", "experts / ffn", "capacity"):
        table.add_column(column)
    rows = [layer_row(plan, layer) for layer in plan.layers] if every_layer else grouped_rows(plan)
    for row in rows:
        table.add_row(*row)
    console.print(table)
