"""Command-line overrides of a spec's parallel layout (`--world`, `--ep`), shared by the
commands that place a spec on hardware (simulate, profile)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moespec.cli.common import fail


def with_ep(plan, ep: int):
    counts = sorted({layer.moe.experts.count for layer in plan.moe_layers})
    if ep < 1 or any(count % ep for count in counts):
        fail(f"--ep ({ep}) must divide every MoE layer's expert count ({', '.join(map(str, counts)) or 'no MoE layers'})")
    return dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, ep=ep))


def with_world(spec: Path, plan, world: int):
    """The same design on `world` devices: dp changes, ep and the micro-batch stay."""
    p = plan.parallel
    if world < 1 or world % (p.tp * p.pp):
        fail(f"--world ({world}) must be a positive multiple of tp * pp ({p.tp * p.pp})")
    dp = world // (p.tp * p.pp)
    if dp % p.ep:
        fail(f"--world {world} gives dp {dp}, which parallelism.ep ({p.ep}) does not divide; pick a multiple of {p.ep * p.tp * p.pp}")
    per_step = p.micro_batch * dp
    global_batch = max(p.global_batch // per_step, 1) * per_step
    return dataclasses.replace(plan, parallel=dataclasses.replace(p, dp=dp, global_batch=global_batch))


def apply_overrides(spec: Path, plan, *, world: int, ep: int):
    if ep:
        plan = with_ep(plan, ep)
    if world:
        plan = with_world(spec, plan, world)
    return plan
