"""`moespec explore SWEEP`: the non-dominated designs of a design space, on one backend.

Thin: loads the sweep, runs `moespec.explore.explore` with a progress bar (stderr, only on a
terminal and never under --json), prints the front as a table, and hands files to
`moespec.explore.report`. Torch is never imported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from moespec.cli.common import console, emit_json, err_console, fail, or_exit, writable_dir_or_exit

DEFAULT_SHOW = 40  # front rows printed; --out / --json carry all of them
# Column headers for common axes (the legend under the table names the full path).
SHORT = {
    "moe.experts.count": "E", "moe.router.k": "k", "moe.capacity.factor": "cf", "moe.experts.d_ff": "expert_d_ff",
    "moe.router.type": "router", "moe.router": "router", "moe.placement": "placement", "moe.placement.every": "every",
    "parallelism.micro_batch": "micro", "parallelism.zero_stage": "zero", "moe.capacity.dropless": "dropless",
}  # fmt: skip


def explore_command(
    sweep: Path = typer.Argument(..., help="Sweep file (see schemas/sweep.schema.json).", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Write front.csv/json, sample.csv/json, summary.json and pareto.png here."),
    emit: Optional[Path] = typer.Option(None, "--emit", help="Write each front design as a ready spec YAML into this folder."),
    top: int = typer.Option(0, "--top", help="Also rank the N best feasible designs by one objective (see --by)."),
    by: Optional[str] = typer.Option(None, "--by", help="Objective (or figure) for --top; default: the sweep's first objective."),
    sample: int = typer.Option(1000, "--sample", help="Feasible designs kept as a uniform sample (for --out and the plot)."),
    plot_x: Optional[str] = typer.Option(None, "--x", help="Figure on the plot's x axis (default: first objective)."),
    plot_y: Optional[str] = typer.Option(None, "--y", help="Figure on the plot's y axis (default: second objective)."),
    show: int = typer.Option(DEFAULT_SHOW, "--show", help="Front rows to print (the files hold all)."),
    chunk: int = typer.Option(65_536, "--chunk", help="Designs evaluated per vectorised batch."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    calibration: str = typer.Option("auto", "--calibration", help="auto (the shipped calibration of the sweep's backend, if any), none, or a calibration file."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Search: simulate at most N designs (NSGA-II, then Pareto local search) instead of every one."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Evaluate every design however long it takes (default: search when that would take over a minute or the space is over max_designs)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Search a sweep's design space for the Pareto front of its objectives under its constraints."""
    from moespec.explore import emit_specs, explore, load_sweep, result_document, write_outputs
    from moespec.explore.run import FIGURES
    from moespec.sim.calibration import backend_with_calibration

    loaded = or_exit(load_sweep, sweep)
    calibrated = or_exit(backend_with_calibration, loaded.backend, calibration, world=loaded.backend.num_devices)
    loaded = dataclasses.replace(loaded, backend=calibrated)
    for option, value in (("--by", by), ("--x", plot_x), ("--y", plot_y)):
        if value is not None and value not in FIGURES:
            fail(f"{option} {value!r} is not a figure; choose one of {', '.join(FIGURES)}")
    if not (0 <= top <= 10**7 and 0 <= sample <= 10**7 and 0 <= show <= 10**7 and 1 <= chunk <= 10**9 and 0 <= seed < 2**63):
        fail("--top, --sample and --show must be in [0, 1e7], --chunk in [1, 1e9] and --seed in [0, 2**63)")
    if budget is not None and not 1 <= budget <= 10**9:
        fail(f"--budget must be in [1, 1e9] designs, got {budget}")
    if budget is not None and exhaustive:
        fail("--budget searches part of the space and --exhaustive evaluates all of it; give one")
    check_chunk_memory(chunk)
    if (plot_x is None) != (plot_y is None):
        fail("--x and --y go together; give both or neither")
    for flag, folder in (("--out", out), ("--emit", emit)):
        if folder is not None:
            writable_dir_or_exit(folder, flag)

    mode, note = choose_mode(loaded, budget=budget, exhaustive=exhaustive, seed=seed)
    if note and not as_json:
        err_console.print(note, markup=False, soft_wrap=True)
    with _progress(enabled=not as_json and err_console.is_terminal, search=mode is not None) as step:
        if mode is None:
            result = explore(loaded, chunk_size=chunk, sample_size=sample, top=top, rank_by=by, seed=seed, progress=step)
        else:
            from moespec.explore.search import SearchUnavailable, search

            try:
                result = search(loaded, budget=mode, seed=seed, sample_size=sample, top=top, rank_by=by, progress=step)
            except SearchUnavailable as exc:
                fail(f"{exc}; or give --exhaustive")
    if note and result.search is not None:
        result.search["why"] = note
    written = write_outputs(result, out, plot=(plot_x, plot_y) if plot_x else None) if out is not None else []
    emitted = emit_specs(result, emit) if emit is not None else []
    if as_json:
        document = result_document(result)
        document["written"] = [str(p) for p in written]
        document["emitted"] = [str(p) for p in emitted]
        emit_json(document)
        return
    _print(result, show)
    for path in [*written, *emitted]:
        console.print(f"wrote {path}", markup=False)


# Memory a chunk's evaluation peaks at, per design (measured with tracemalloc on the
# h100-trillion sweep: ~0.9 KB; 1.5 KB leaves room), times the chunks in flight (2 per thread).
CHUNK_BYTES_PER_DESIGN = 1536
EXHAUSTIVE_LIMIT_S = 60.0  # above this estimate (or max_designs), explore searches unless --exhaustive


def check_chunk_memory(chunk: int) -> None:
    """Refuse a --chunk whose in-flight chunks cannot fit in half the available memory, from the
    arithmetic (never by allocating and failing)."""
    from moespec.cli.common import available_memory_bytes
    from moespec.explore.run import default_threads

    available = available_memory_bytes()
    in_flight = 2 * default_threads()
    need = chunk * in_flight * CHUNK_BYTES_PER_DESIGN
    if available is not None and need > available / 2:
        most = int(available / 2 / (in_flight * CHUNK_BYTES_PER_DESIGN))
        fail(f"--chunk {chunk:,} needs ~{need / 2**30:.1f} GiB ({in_flight} chunks in flight, ~1.5 KB per design); "
             f"this machine has {available / 2**30:.1f} GiB available: use --chunk {min(most, 1 << 20):,} or less (larger chunks gain nothing past ~65,536)")  # fmt: skip


def choose_mode(sweep, *, budget: int | None, exhaustive: bool, seed: int) -> tuple[int | None, str]:
    """(search budget or None for every design, the note saying why). The space's size comes
    first; above max_designs, or when every design would take over a minute at the rate
    measured on a sample here, explore searches."""
    import time

    import numpy as np

    from moespec.explore.run import assess, default_threads
    from moespec.explore.search import DEFAULT_BUDGET
    from moespec.explore.space import DesignSpace
    from moespec.sim.cost import CollectiveCosts

    space = DesignSpace(sweep)
    if budget is not None:
        if budget >= space.size:
            return None, f"--budget {budget:,} covers all {space.size:,} designs: evaluating every one"
        return budget, ""
    if exhaustive or space.size <= DEFAULT_BUDGET:  # a search would spend as much as evaluating every design
        return None, ""
    probe = np.unique(np.random.default_rng(seed).integers(0, space.size, size=min(space.size, 20_000)))
    collectives = CollectiveCosts(sweep.backend)
    assess(space, space.chunk(probe), collectives)  # the collectives' fits of these rank sets, once, outside the timing
    started = time.perf_counter()
    assess(space, space.chunk(probe), collectives)
    rate = len(probe) / max(time.perf_counter() - started, 1e-9) * min(default_threads(), 2) * 0.75
    estimate = space.size / rate
    if space.size <= sweep.max_designs and estimate <= EXHAUSTIVE_LIMIT_S:
        return None, ""
    budget = DEFAULT_BUDGET
    why = f"over max_designs ({sweep.max_designs:,}) and " if space.size > sweep.max_designs else ""
    return budget, (f"{space.size:,} designs ({why}~{_duration(estimate)} to evaluate every one at ~{rate:,.0f} designs/s measured here): "
                    f"searching {budget:,} of them (NSGA-II, then Pareto local search); --exhaustive evaluates all, --budget N changes the share")  # fmt: skip


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} s"


class _progress:
    """A rich progress bar on stderr as a context manager yielding the `progress` callback:
    designs done, designs/s, and (searching) the current front's size."""

    def __init__(self, *, enabled: bool, search: bool = False):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("searching" if search else "exploring"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err_console, transient=True)  # fmt: skip

    def __enter__(self):
        if self.bar is None:
            return None
        import time

        self.bar.start()
        task = self.bar.add_task("designs", total=None, status="")
        started = time.perf_counter()

        def update(done: int, total: int, front: int | None = None) -> None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            status = f"{rate:,.0f} designs/s" + (f", front {front:,}" if front is not None else "")
            self.bar.update(task, completed=done, total=total, status=status)

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print(result, show: int) -> None:
    sweep = result.sweep
    console.print(f"[bold]{sweep.name}[/bold]: {result.designs:,} designs of {sweep.base_file} on {sweep.backend.name} "
                  f"({sweep.backend.num_devices} devices{', calibrated' if sweep.backend.calibration else ''}) in {result.elapsed_s:.2f} s ({result.designs_per_s:,.0f} designs/s)", soft_wrap=True)  # fmt: skip
    infeasible = result.designs - result.feasible
    if result.search is not None:
        info = result.search
        console.print(f"searched {info['distinct']:,} of {info['space']:,} designs ({info['distinct'] / info['space']:.2g} of the space; "
                      f"{info['evaluated']:,} simulated of a budget of {info['budget']:,}) with {info['algorithm']}"
                      + (", stopped at a local optimum" if info["converged"] else "") + "; the front is exact over the designs searched", soft_wrap=True)  # fmt: skip
    console.print(f"feasible {result.feasible:,}; infeasible {infeasible:,}" + (", by first failing reason:" if infeasible else ""))
    for reason, count in result.infeasible_by_reason.items():
        console.print(f"  {count:>12,}  {reason}", markup=False)
    varying = [axis.name for axis in sweep.axes if len(axis.values) > 1]
    objectives = [o.name for o in sweep.objectives]
    extra = [name for name in ("memory_per_device",) if name not in objectives]
    if not result.feasible:
        console.print("no feasible design: every one fails a reason above; relax a constraint or widen an axis", markup=False, soft_wrap=True)
        return
    _table(f"Pareto front: {len(result.front)} designs (" + ", ".join(f"{o.name} {o.direction}" for o in sweep.objectives) + ")",
           result.front, varying, objectives + extra, show, sort_by=sweep.objectives[0])  # fmt: skip
    if result.top is not None:
        ranked = result.rank_by
        _table(f"top {len(result.top)} by {ranked.name} ({ranked.direction})", result.top, varying,
               list(dict.fromkeys([ranked.name, *objectives, *extra])), show, sort_by=None)  # fmt: skip
    console.print("columns: " + ", ".join(f"{_short(name)} = {name}" for name in varying), markup=False, soft_wrap=True)
    if "quality" in objectives:
        console.print(result.quality_proxy, markup=False, soft_wrap=True)
    if "quality" in objectives and result.front.figures["quality_extrapolated"].any():
        console.print("* quality extrapolated beyond the law's fitted range (size, experts, k > 1 or router)", markup=False, soft_wrap=True)


def _table(title: str, designs, varying: list[str], figures: list[str], show: int, *, sort_by) -> None:
    from moespec.explore.report import display, label

    table = Table(title=title, title_justify="left", min_width=len(title))
    table.add_column("design", justify="right", overflow="fold")  # narrow terminal: fold, never cut a figure
    for name in varying:
        table.add_column(_short(name), overflow="fold")
    derived_dp = len(set(designs.figures["dp"].tolist())) > 1 and not any(name == "parallelism.dp" for name in varying)
    if derived_dp:
        table.add_column("dp", justify="right", overflow="fold")
    for name in figures:
        table.add_column(label(name), justify="right", overflow="fold")
    order = range(len(designs))
    if sort_by is not None:
        sign = -1.0 if sort_by.direction == "max" else 1.0
        order = sorted(order, key=lambda i: (sign * designs.figures[sort_by.name][i], designs.ids[i]))
    rows = list(order)
    for i in rows[:show]:
        cells = [str(designs.ids[i])] + [display(name, designs.axis_values[name][i]) for name in varying]
        if derived_dp:
            cells.append(str(int(designs.figures["dp"][i])))
        for name in figures:
            text = display(name, designs.figures[name][i])
            cells.append(text + ("*" if name == "quality" and designs.figures["quality_extrapolated"][i] else ""))
        table.add_row(*cells)
    if len(rows) > show:
        table.caption = f"{len(rows) - show} more rows: use --show, --out or --json"
    # Piped output has no terminal width: print at the table's own width rather than truncate.
    out = console
    if not console.is_terminal:
        width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        out = Console(highlight=False, width=max(console.width, width))
    out.print(table)


def _short(name: str) -> str:
    return SHORT.get(name, name.rsplit(".", 1)[-1])
