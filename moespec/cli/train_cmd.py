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

from moespec.cli.common import console, cpu_sized_counts_or_exit, emit_json, err_console, fail, load_plan_or_exit


def train_command(
    spec: Path = typer.Argument(..., help="Spec file (a tiny one: at most 25M parameters).", show_default=False),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps.", show_default=False),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of the batches."),
    batch: int = typer.Option(0, "--batch", help="Sequences per micro-batch; 0 takes parallel.micro_batch (the micro-batches per step stay the spec's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (no progress bar)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Validation loss every N steps (0: only at the end)."),
    nproc: int = typer.Option(1, "--nproc", help="Ranks to launch (torchrun-style); must equal the spec's world size."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds before a stuck collective fails every rank."),
    single_process: bool = typer.Option(False, "--single-process", help="Run a spec of world > 1 in one process: its data-parallel math (global_batch / micro_batch micro-batches per step), without ep or ZeRO."),
) -> None:
    """Train a tiny spec on CPU on the shipped corpus; report first/last loss, validation loss and expert loads."""
    from moespec.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # every step reuses its buffers instead of page-faulting fresh ones
    plan = load_plan_or_exit(spec)
    from moespec.distributed.context import launched_world

    if nproc < 1 or not timeout > 0:
        fail(f"--nproc must be >= 1 and --timeout > 0, got {nproc} and {timeout}")
    if single_process and nproc > 1:
        fail(f"--single-process runs one process; it does not go with --nproc {nproc}")
    if nproc > 1 and launched_world() is None:
        _launch_ranks(spec, plan, nproc=nproc, timeout=timeout, steps=steps, lr=lr, seed=seed, batch=batch,
                      as_json=as_json, eval_every=eval_every)  # fmt: skip
        return
    if launched_world() is not None:
        from moespec.distributed.launch import run_rank

        run_rank(lambda: _train_rank(spec, plan, timeout=timeout, steps=steps, lr=lr, seed=seed, batch=batch,
                                     as_json=as_json, eval_every=eval_every))  # fmt: skip
        return
    if steps < 1:
        fail(f"--steps must be at least 1, got {steps}")
    if batch < 0 or eval_every < 0:
        fail(f"--batch and --eval-every must be >= 0, got {batch} and {eval_every}")
    if not lr > 0:
        fail(f"--lr must be positive, got {lr}")

    from moespec.data.corpus import BYTE_VOCAB
    from moespec.distributed.context import micro_batches_per_step, single_process_note
    from moespec.model.build import build_model
    from moespec.train import train

    if plan.model.vocab_size < BYTE_VOCAB:
        fail(f"{spec}: model.vocab_size is {plan.model.vocab_size}; training on the byte corpus needs at least {BYTE_VOCAB}")
    counts = cpu_sized_counts_or_exit(spec, plan, doing="training", instead="use a tiny spec (e.g. specs/tiny-topk.yaml)")
    refuse_single_process(spec, plan, single_process=single_process)
    model = build_model(plan, seed=seed, device="cpu")

    batch = batch or plan.parallel.micro_batch
    note = single_process_note(plan, batch) if plan.parallel.world > 1 else None
    if note and not as_json:
        console.print(note)
    try:
        if as_json:
            result = train(model, plan, steps=steps, lr=lr, batch=batch, seed=seed, eval_every=eval_every)
        else:
            result = _train_with_progress(model, plan, steps=steps, lr=lr, batch=batch, seed=seed, eval_every=eval_every)
    except FloatingPointError as exc:
        fail(f"{spec}: {exc}", code=1)

    document = _document(spec, plan, counts, result, steps=steps, lr=lr, batch=batch, seed=seed, micro_batches=micro_batches_per_step(plan, None))
    if note:
        document["single_process"] = note
    if as_json:
        emit_json(document)
        return
    _print_summary(plan, counts, result, steps, batch=batch, micro_batches=document["micro_batches_per_step"])


def refuse_single_process(spec: Path, plan, *, single_process: bool) -> None:
    """One line and exit 2 unless one process can run `plan` (context.check_single_process)."""
    from moespec.distributed.context import DistributedConfigError, check_single_process

    try:
        check_single_process(plan, single_process=single_process)
    except DistributedConfigError as exc:
        fail(f"{spec}: {exc}")


def _document(spec: Path, plan, counts, result, *, steps: int, lr: float, batch: int, seed: int, micro_batches: int) -> dict:
    return {
        "spec": str(spec),
        "name": plan.name,
        "params": {"total": counts.total, "active": counts.active, "embeddings_in_active": True},
        "steps": steps,
        "lr": lr,
        "micro_batch": batch,
        "micro_batches_per_step": micro_batches,  # per rank
        "recompute": plan.parallel.recompute,
        "seq_len": plan.model.seq_len,
        "seed": seed,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "initial_val_loss": result.initial_val_loss,
        "final_val_loss": result.final_val_loss,
        "tokens_per_expert_total": {str(k): v for k, v in result.tokens_per_expert_total.items()},
        "records": [record.as_dict() for record in result.records],
    }


def _launch_ranks(spec: Path, plan, *, nproc: int, timeout: float, **options) -> None:
    """Re-run this command on nproc ranks under torch's elastic launcher; one line if a rank fails."""
    from moespec.distributed.context import DistributedConfigError, check_world
    from moespec.distributed.launch import launch

    try:
        check_world(plan, nproc)
    except DistributedConfigError as exc:
        fail(f"{spec}: {exc}")
    args = ["train", str(spec), "--steps", str(options["steps"]), "--lr", str(options["lr"]), "--seed", str(options["seed"]),
            "--batch", str(options["batch"]), "--eval-every", str(options["eval_every"]), "--timeout", str(timeout)]  # fmt: skip
    if options["as_json"]:
        args.append("--json")
    # The launcher's own limit: warm-up and every step, generously; a stuck collective fails
    # earlier, at --timeout, inside the ranks.
    code, failure = launch(nproc, args, timeout_s=timeout * 4 + 60 * options["steps"])
    if failure:
        fail(failure, code=1)
    if code:
        raise typer.Exit(code)


def _train_rank(spec: Path, plan, *, timeout: float, steps: int, lr: float, seed: int, batch: int, as_json: bool, eval_every: int) -> None:
    """One rank of a distributed run: join the group, keep this rank's experts, train; rank 0 reports."""
    from moespec.distributed.context import DistributedConfigError, init_distributed, micro_batches_per_step, shutdown
    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters
    from moespec.train import train

    try:
        ctx = init_distributed(plan, timeout_s=timeout, device="cpu")
    except DistributedConfigError as exc:
        fail(f"{spec}: {exc}")
    counts = count_parameters(build_model(plan, seed=seed, device="meta"), plan)
    model = build_model(plan, seed=seed, device="cpu")  # same seed on every rank: one model; train() lays it out over the ranks
    batch = batch or plan.parallel.micro_batch
    quiet = as_json or ctx.rank != 0
    kwargs = dict(steps=steps, lr=lr, batch=batch, seed=seed, eval_every=eval_every, dist_ctx=ctx)
    result = train(model, plan, **kwargs) if quiet else _train_with_progress(model, plan, **kwargs)
    if ctx.rank == 0:
        document = _document(spec, plan, counts, result, steps=steps, lr=lr, batch=batch, seed=seed,
                             micro_batches=micro_batches_per_step(plan, ctx))  # fmt: skip
        document["world"] = ctx.world
        if as_json:
            emit_json(document)
        else:
            split = ""
            if ctx.tp_size > 1 or ctx.pp_size > 1:
                split = f", tp {ctx.tp_size}, pp {ctx.pp_size}" + (f" ({plan.parallel.pp_schedule})" if ctx.pp_size > 1 else "")
            console.print(f"world {ctx.world}: dp {ctx.dp_size}, ep {ctx.ep_size}{split} ({ctx.backend}); losses averaged over ranks")
            _print_summary(plan, counts, result, steps, batch=batch, micro_batches=document["micro_batches_per_step"])
    shutdown()


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


def _print_summary(plan, counts, result, steps: int, *, batch: int, micro_batches: int) -> None:
    recompute = "" if plan.parallel.recompute == "none" else f", recompute {plan.parallel.recompute}"
    console.print(
        f"[bold]{plan.name}[/bold]: {counts.total:,} parameters ({counts.active:,} active per token, embeddings "
        f"included), {steps} steps of {micro_batches} micro-batch{'es' if micro_batches > 1 else ''} of {batch} "
        f"sequences{recompute}"
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
