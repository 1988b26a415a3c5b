"""What an exploration leaves behind: a JSON document, CSV/JSON files of the front and of a
sample of the rest, a PNG scatter, and the front's designs as ready spec files.

Every file is written atomically (temp file + rename), so an interrupted run never leaves a
half-written CSV or spec. matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from moespec.files import write_atomic
from moespec.explore.axes import show_value
from moespec.explore.run import FIGURES, DesignTable, ExploreResult
from moespec.explore.space import DesignSpace, resolve_spec
from moespec.spec import plan_from_text
from moespec.spec.emit import plan_to_yaml

# Figure -> (column label, how to show a value) for tables and plot labels.
_DISPLAY = {
    "tokens_per_s": ("tokens/s", lambda v: f"{v:,.0f}"),
    "step_s": ("step ms", lambda v: f"{v * 1e3:,.1f}"),
    "memory_per_device": ("mem/dev GiB", lambda v: f"{v / 2**30:,.2f}"),
    "params_total": ("params total", lambda v: _si(v)),
    "params_active": ("params active", lambda v: _si(v)),
    "cost_per_token": ("dev-s/Mtok", lambda v: f"{v * 1e6:,.2f}"),
    "mfu": ("MFU", lambda v: f"{v:.1%}"),
    "a2a_bytes": ("a2a MiB/rank", lambda v: f"{v / 2**20:,.1f}"),
    "quality": ("quality", lambda v: f"{v:.4g}"),
}


def result_document(result: ExploreResult) -> dict:
    """The whole answer as one JSON-ready mapping (what `moespec explore --json` prints)."""
    sweep = result.sweep
    return {
        "sweep": sweep.name,
        "file": sweep.file,
        "base": str(sweep.base_file),
        "backend": {"name": sweep.backend.name, "devices": sweep.backend.num_devices, "calibration": sweep.backend.calibration},
        "axes": {axis.name: [show_value(v) if isinstance(v, dict) else v for v in axis.values] for axis in sweep.axes},
        "objectives": {o.name: o.direction for o in sweep.objectives},
        "units": {name: unit for name, unit in FIGURES.items()},
        "quality_proxy": sweep.quality_proxy,
        "quality_proxy_meaning": result.quality_proxy,
        "designs": result.designs,
        "feasible": result.feasible,
        "infeasible": result.designs - result.feasible,
        "infeasible_by_reason": result.infeasible_by_reason,
        "front_ties": "designs with equal objective values are all kept on the front",
        "front": result.front.rows(),
        "top": None if result.top is None else {"by": result.rank_by.name, "direction": result.rank_by.direction,
                                                "designs": result.top.rows()},  # fmt: skip
        "elapsed_s": result.elapsed_s,
        "designs_per_s": result.designs_per_s,
        "search": result.search,  # null: every design was evaluated; else how the space was searched
    }


def write_outputs(result: ExploreResult, out_dir: Path, *, plot: tuple[str, str] | None = None) -> list[Path]:
    """front.csv/json, sample.csv/json, summary.json and pareto.png (`plot`'s two figures, by
    default the first two objectives) under `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    for name, designs in (("front", result.front), ("sample", result.sample)):
        written.append(_write(out_dir / f"{name}.csv", table_csv(designs)))
        written.append(_write(out_dir / f"{name}.json", json.dumps(designs.rows(), indent=2, default=_json) + "\n"))
    summary = {key: value for key, value in result_document(result).items() if key not in ("front", "top")}
    written.append(_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json) + "\n"))
    axes = plot or default_plot_axes(result)
    if axes is not None:
        written.append(_write(out_dir / "pareto.png", scatter_png(result, *axes)))
    return written


def default_plot_axes(result: ExploreResult) -> tuple[str, str] | None:
    names = [o.name for o in result.sweep.objectives]
    if len(names) >= 2:
        return names[0], names[1]
    return (names[0], "params_total") if names[0] != "params_total" else (names[0], "tokens_per_s")


def table_csv(designs: DesignTable) -> str:
    rows = designs.rows()
    columns = ["design", *designs.axis_values, *designs.figures]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else show_value(row[key]) if isinstance(row[key], dict) else row[key] for key in columns})
    return buffer.getvalue()


def scatter_png(result: ExploreResult, x: str, y: str) -> bytes:
    """Sample (grey) and front (red, labelled with design ids) on two figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    for designs, style in ((result.sample, dict(s=8, c="0.7", label="feasible (sample)")),
                           (result.front, dict(s=28, c="tab:red", label="Pareto front", zorder=3))):  # fmt: skip
        xs, ys = designs.figures[x], designs.figures[y]
        ax.scatter(xs, ys, **style)
    fx, fy = result.front.figures[x], result.front.figures[y]
    labels: dict[tuple[float, float], list[str]] = {}  # tied designs share one label
    for design, px, py in zip(result.front.ids, fx, fy):
        labels.setdefault((float(px), float(py)), []).append(str(design))
    for (px, py), designs in labels.items():
        ax.annotate("/".join(designs), (px, py), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for axis_name, set_scale, values in ((x, ax.set_xscale, np.concatenate([result.sample.figures[x], fx])),
                                         (y, ax.set_yscale, np.concatenate([result.sample.figures[y], fy]))):  # fmt: skip
        finite = values[np.isfinite(values)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
            set_scale("log")
    ax.set_xlabel(_axis_label(result, x))
    ax.set_ylabel(_axis_label(result, y))
    ax.set_title(f"{result.sweep.name} on {result.sweep.backend.name}: {result.feasible:,} feasible of {result.designs:,}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def emit_specs(result: ExploreResult, out_dir: Path) -> list[Path]:
    """Each front design as a spec file that `moespec validate` accepts: the design's spec is
    resolved, written back through plan_to_yaml, and re-read to prove it is the same plan."""
    space = DesignSpace(result.sweep)
    written = []
    for design in result.front.ids:
        plan = resolve_spec(space.design_spec(int(design)))
        text = plan_to_yaml(plan)
        path = Path(out_dir) / f"{plan.name}.yaml"
        if plan_from_text(text, str(path)) != plan:  # plan_to_yaml's contract; a bug if not
            raise RuntimeError(f"design {design}: the emitted spec does not resolve to the design's plan")
        written.append(_write(path, text))
    return written


def display(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    label_format = _DISPLAY.get(name)
    return label_format[1](value) if label_format else show_value(value)


def label(name: str) -> str:
    return _DISPLAY[name][0] if name in _DISPLAY else name


def _axis_label(result: ExploreResult, name: str) -> str:
    direction = next((o.direction for o in result.sweep.objectives if o.name == name), None)
    unit = FIGURES.get(name, "")
    if name == "quality":
        unit = result.sweep.quality_proxy
    return f"{name} [{unit}]" + (f" ({direction})" if direction else "")


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _write(path: Path, data: str | bytes) -> Path:
    write_atomic(path, data)
    return path


def _json(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
