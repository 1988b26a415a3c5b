"""The design explorer: which MoE design should we train, on this hardware?

A sweep (YAML, schemas/sweep.schema.json) names a base spec, axes over its fields,
constraints and objectives; `explore` streams every design through the vectorised simulator
and returns the exact Pareto front, a sample of the rest and the count of infeasible designs
by reason. Pure Python and numpy (no torch), callable from a notebook:

    from moespec.explore import load_sweep, explore, write_outputs
    result = explore(load_sweep("specs/sweeps/h100-32-experts.yaml"))
    result.front.rows()
"""

from __future__ import annotations

from moespec.explore.pareto import merge_front, pareto_mask, to_costs
from moespec.explore.quality import ClarkFit, clark_fit
from moespec.explore.report import emit_specs, result_document, scatter_png, write_outputs
from moespec.explore.run import FIGURES, DesignTable, ExploreResult, explore
from moespec.explore.space import DesignSpace
from moespec.explore.sweep import Sweep, load_sweep, sweep_from_text

__all__ = [
    "FIGURES", "ClarkFit", "DesignSpace", "DesignTable", "ExploreResult", "Sweep", "clark_fit", "emit_specs",
    "explore", "load_sweep", "merge_front", "pareto_mask", "result_document", "scatter_png", "sweep_from_text",
    "to_costs", "write_outputs",
]  # fmt: skip
