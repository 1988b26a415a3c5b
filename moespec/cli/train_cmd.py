"""`moespec train SPEC --steps N`: train a tiny spec on CPU on the shipped byte corpus and show
the loss falling and how evenly each MoE layer spread its tokens over its experts.

The loop itself is `moespec.train.train`; this module only parses, refuses what cannot run
on a CPU, draws the progress bar and prints the tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from moespec.cli.common import console, emit_json, err_console, fail, load_plan_or_exit

# A CPU step costs ~6 * params * tokens FLOPs; at 25M parameters and 512 tokens a step that is
# ~80 GFLOP, about a second on a laptop core: the most that still gives a curve in minutes.
TRAIN_PARAM_LIMIT = 25_000_000


def train_command(
    spec: Path = typer.Argument(..., help="Spec file (a tiny one: at most 25M parameters).", show_default=False),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps.", show_default=False),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of the batches."),
    batch: int = typer.Option(0, "--batch", help="Sequences per step; 0 takes parallel.micro_batch."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (no progress bar)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Validation loss every N steps (0: only at the end)."),
) -> None:
    """Train a tiny spec on CPU on the shipped corpus; report first/last loss, validation loss and expert loads."""
    plan = load_plan_or_exit(spec)
    if steps < 1:
        fail(f"--steps must be at least 1, got {steps}")
    if batch < 0 or eval_every < 0:
        fail(f"--batch and --eval-every must be >= 0, got {batch} and {eval_every}")
    if not lr > 0:
        fail(f"--lr must be positive, got {lr}")

    from moespec.data.corpus import BYTE_VOCAB
    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters
    from moespec.train import train

    if plan.model.vocab_size < BYTE_VOCAB:
        fail(f"{spec}: model.vocab_size is {plan.model.vocab_size}; training on the byte corpus needs at least {BYTE_VOCAB}")
    try:
        counts = count_parameters(build_model(plan, seed=seed, device="meta"), plan)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        fail(f"{spec}: cannot build the model: {_one_line(exc)}")
    if counts.total > TRAIN_PARAM_LIMIT:
        fail(
            f"{spec}: {plan.name} has {counts.total:,} parameters, over the {TRAIN_PARAM_LIMIT:,} limit for "
            f"training on CPU; use a tiny spec (e.g. specs/tiny-topk.yaml)"
        )
    model = build_model(plan, seed=seed, device="cpu")

    batch = batch or plan.parallel.micro_batch
    try:
        if as_json:
            result = train(model, plan, steps=steps, lr=lr, batch=batch, seed=seed, eval_every=eval_every)
        else:
            result = _train_with_progress(model, plan, steps=steps, lr=lr, batch=batch, seed=seed, eval_every=eval_every)
    except FloatingPointError as exc:
        fail(f"{spec}: {exc}", code=1)

    document = {
        "spec": str(spec),
        "name": plan.name,
        "params": {"total": counts.total, "active": counts.active, "embeddings_in_active": True},
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seq_len": plan.model.seq_len,
        "seed": seed,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "initial_val_loss": result.initial_val_loss,
        "final_val_loss": result.final_val_loss,
        "tokens_per_expert_total": {str(k): v for k, v in result.tokens_per_expert_total.items()},
        "records": [record.as_dict() for record in result.records],
    }
    if as_json:
        emit_json(document)
        return
    _print_summary(plan, counts, result, steps)


def _train_with_progress(model, plan, **kwargs):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moespec.train import train

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task("train", total=kwargs["steps"], status="")

        def on_step(record) -> None:
            status = f"loss {record.ce_loss:.3f}" + (f"  aux {record.aux_loss:.4f}" if record.tokens_per_expert else "")
            if record.val_loss is not None:
                status += f"  val {record.val_loss:.3f}"
            progress.update(task, advance=1, status=status)

        return train(model, plan, on_step=on_step, **kwargs)


def _print_summary(plan, counts, result, steps: int) -> None:
    console.print(
        f"[bold]{plan.name}[/bold]: {counts.total:,} parameters ({counts.active:,} active per token, embeddings "
        f"included), {steps} steps"
    )
    console.print(f"train loss: step 1 {result.first_loss:.4f} -> step {steps} {result.last_loss:.4f}")
    console.print(
        f"val loss:   {result.initial_val_loss:.4f} before -> {result.final_val_loss:.4f} after "
        f"(a uniform guess over 256 bytes scores {math.log(256):.4f})"
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


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
