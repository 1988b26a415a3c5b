"""What `moespec train` reports: the JSON document and the rich summary (losses, expert loads)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from moespec.cli.common import console


def document(spec: Path, plan, counts, result, opts, *, batch: int, micro_batches: int) -> dict:
    return {
        "spec": str(spec),
        "name": plan.name,
        "params": {"total": counts.total, "active": counts.active, "embeddings_in_active": True},
        "steps": opts.steps,
        "resumed_from": result.resumed_from,
        "lr": opts.lr,
        "micro_batch": batch,
        "micro_batches_per_step": micro_batches,  # per rank
        "recompute": plan.parallel.recompute,
        "seq_len": plan.model.seq_len,
        "seed": opts.seed,
        "data": str(opts.data) if opts.data is not None else "shipped corpus",
        "device": opts.device,
        "checkpoints": str(opts.save) if opts.save is not None else None,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "initial_val_loss": result.initial_val_loss,
        "final_val_loss": result.final_val_loss,
        "tokens_per_expert_total": {str(k): v for k, v in result.tokens_per_expert_total.items()},
        "records": [record.as_dict() for record in result.records],
    }


def print_summary(plan, counts, result, steps: int, *, batch: int, micro_batches: int, byte_tokens: bool = True) -> None:
    recompute = "" if plan.parallel.recompute == "none" else f", recompute {plan.parallel.recompute}"
    first = result.resumed_from + 1
    resumed = f" (resumed after step {result.resumed_from})" if result.resumed_from else ""
    console.print(
        f"[bold]{plan.name}[/bold]: {counts.total:,} parameters ({counts.active:,} active per token, embeddings "
        f"included), {steps - result.resumed_from} steps{resumed} of {micro_batches} micro-batch{'es' if micro_batches > 1 else ''} "
        f"of {batch} sequences{recompute}"
    )
    console.print(f"train loss: step {first} {result.first_loss:.4f} -> step {steps} {result.last_loss:.4f}")
    console.print(
        f"val loss:   {result.initial_val_loss:.4f} before -> {result.final_val_loss:.4f} after "
        + (f"(a uniform guess over 256 bytes scores {math.log(256):.4f})" if byte_tokens else
           f"(a uniform guess over the {plan.model.vocab_size:,}-token vocabulary scores {math.log(plan.model.vocab_size):.4f})")
    )
    totals = result.tokens_per_expert_total
    if not totals:
        return
    table = Table(title="tokens per expert over the run (share)")
    table.add_column("expert", justify="right")
    for layer in totals:
        table.add_column(f"layer {layer} {plan.layers[layer].moe.router.type}", justify="right")
    n_rows = max(len(counts_E) for counts_E in totals.values())
    for expert in range(n_rows):
        cells = [str(expert)]
        for counts_E in totals.values():
            share = counts_E[expert] / (sum(counts_E) or 1) if expert < len(counts_E) else None
            cells.append("" if share is None else f"{counts_E[expert]:,} ({share:.1%})")
        table.add_row(*cells, end_section=expert == n_rows - 1)
    # max / mean load: 1.00 is perfect balance; with capacity factor cf, loads above cf drop tokens.
    imbalance = [max(c) / (sum(c) / len(c)) if sum(c) else 0.0 for c in totals.values()]
    table.add_row("max/mean", *(f"{value:.2f}" for value in imbalance))
    console.print(table)
