"""Expert load models: how a MoE layer's assignments spread over experts and ranks.

The cost model assumes balance unless told otherwise, but real routing is skewed (torchtitan
measured expert-parallel communication at 3.1 s with real routing against 0.77 s forced
balanced). A `Load` says, per MoE layer, what share of each source rank's assignments goes to
each expert, and the figures the step waits for follow from it:
- rank r of an expert-parallel group holds experts [r*L, (r+1)*L); per micro-step it sends
  S_r rows to other ranks' experts (dispatch) and receives R_r rows for its own (combine sends
  them back); forward and backward that is 2 * (S_r + R_r) rows of D * b bytes, 3 * (...)
  when full recomputation replays the forward. With a measured histogram these are exact.
- dropless experts on rank r compute every row routed to them: the busiest rank sets the
  expert time (`compute_imbalance`, its rows over the mean);
- the all-to-all finishes when the busiest rank has sent and received its rows
  (`a2a_imbalance`: max over ranks of max(S_r, R_r) over the balanced S);
- with capacity C per expert, the rows over C are dropped (`dropped_fraction`).

Three sources: `balanced_load` (today's assumption), `zipf_load` (a parametric skew: expert
i of E gets a share proportional to 1 / (i + 1)^s, the same on every source rank; s = 0 is
balanced) and `measured_load` (the per-rank histograms of a `moespec profile` report).
Shape legend: P ranks of an expert-parallel group, E experts, L = E / P local experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moespec.spec.plan import SpecPlan


@dataclass(frozen=True)
class Load:
    kind: str  # balanced | zipf | measured
    source: str  # what it came from, for the report
    rows_PE: dict[int, np.ndarray]  # MoE layer index -> [P, E] rows each source rank routed to each expert in `micro_steps`
    micro_steps: int = 1  # how many micro-steps rows_PE counts (a measured histogram: all the timed ones)


def _assignments(plan: SpecPlan, layer) -> int:
    """Rows one rank routes per micro-step in a layer: T * k."""
    return plan.tokens_of(layer) * layer.moe.router.experts_per_token


def balanced_load(plan: SpecPlan) -> Load:
    p = plan.parallel.ep
    return Load("balanced", "every expert the same share", {
        layer.index: np.full((p, layer.moe.experts.count), _assignments(plan, layer) / layer.moe.experts.count)
        for layer in plan.moe_layers})  # fmt: skip


def zipf_load(plan: SpecPlan, exponent: float) -> Load:
    """Expert i gets a share proportional to 1 / (i + 1)^exponent, from every source rank (so
    the most popular experts sit together on rank 0: the worst placement of that skew)."""
    if not (exponent >= 0 and np.isfinite(exponent)):
        raise ValueError(f"the skew exponent must be a finite number >= 0, got {exponent}")
    rows = {}
    for layer in plan.moe_layers:
        weights = 1.0 / np.arange(1, layer.moe.experts.count + 1) ** exponent
        rows[layer.index] = np.tile(weights / weights.sum() * _assignments(plan, layer), (plan.parallel.ep, 1))
    return Load("zipf", f"Zipf skew, exponent {exponent:g}", rows)


def measured_load(plan: SpecPlan, report_path: str | Path) -> Load:
    """The histograms a `moespec profile` report measured: each rank's tokens per expert over
    its timed steps, per micro-step. Ranks of the first expert-parallel group (ranks 0..P-1)."""
    path = Path(report_path)
    try:
        report = json.loads(path.read_text())
        ranks, steps, accum = report["ranks"], report["steps"], report["grad_accum"]
        world, ep = report["world"], report["ep"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a `moespec profile` report.json ({type(exc).__name__}: {exc})") from None
    p = plan.parallel
    if (world, ep) != (p.world, p.ep):
        raise ValueError(f"{path} was measured at world {world}, ep {ep}; the spec runs world {p.world}, ep {p.ep}: "
                         "profile the same layout (or pass --world/--ep to match)")  # fmt: skip
    rows = {}
    for layer in plan.moe_layers:
        try:
            counts = [ranks[r]["tokens_per_expert"][str(layer.index)] for r in range(p.ep)]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{path} has no expert load for MoE layer {layer.index} of {plan.name}: was it this spec's profile?") from None
        rows_PE = np.array(counts, dtype=np.float64)  # integers: sums stay exact
        if rows_PE.shape != (p.ep, layer.moe.experts.count):
            raise ValueError(f"{path}: layer {layer.index} has {rows_PE.shape[1]} experts, the spec {layer.moe.experts.count}")
        rows[layer.index] = rows_PE
    return Load("measured", str(path), rows, micro_steps=steps * accum)


@dataclass(frozen=True)
class LayerLoad:
    send_rows_P: np.ndarray  # [P] rows each rank sends to other ranks' experts per micro-step
    recv_rows_P: np.ndarray  # [P] rows each rank receives for its experts
    expert_rows_P: np.ndarray  # [P] rows each rank's experts compute on (dropless)
    dropped_fraction: float  # with capacity: the share of assignments over C


def layer_load(plan: SpecPlan, load: Load, layer, *, per_micro_step: bool = True) -> LayerLoad:
    """Rows per rank per micro-step (`per_micro_step=False`: over all of the load's micro-steps)."""
    p, rows_PE = plan.parallel.ep, load.rows_PE[layer.index]
    if per_micro_step:
        rows_PE = rows_PE / load.micro_steps
    n_experts = rows_PE.shape[1]
    owner_E = np.arange(n_experts) // (n_experts // p)  # [E] rank holding each expert
    own_PE = owner_E[None, :] == np.arange(p)[:, None]  # [P, E]: expert e is held by source p
    send_P = (rows_PE * ~own_PE).sum(axis=1)
    into_P = np.array([rows_PE[:, owner_E == r].sum() for r in range(p)])  # every source's rows for rank r's experts
    recv_P = into_P - (rows_PE * own_PE).sum(axis=1)
    capacity = None if layer.moe.capacity is None else layer.moe.capacity.capacity(
        plan.tokens_of(layer), layer.moe.router.experts_per_token, n_experts)  # fmt: skip
    dropped = 0.0
    if capacity is not None:  # each source rank's group fills C slots per expert
        dropped = float(np.maximum(rows_PE - capacity, 0).sum() / rows_PE.sum())
    return LayerLoad(send_P, recv_P, into_P, dropped)


def imbalance_factors(plan: SpecPlan, load: Load) -> dict:
    """What the step waits for, over all dropless layers (weighted by their rows): the busiest
    rank's expert rows over the mean, and its all-to-all rows (max of sent and received) over
    the balanced rows per rank. 1.0 and 1.0 for a balanced load."""
    compute, a2a, weight = 0.0, 0.0, 0.0
    p = plan.parallel.ep
    for layer in plan.moe_layers:
        capacity = layer.moe.capacity
        if capacity is not None and not capacity.dropless:
            continue  # fixed buffers: skew drops tokens, it does not add rows
        ll = layer_load(plan, load, layer)
        total = ll.expert_rows_P.sum()
        if total == 0:
            continue
        compute += ll.expert_rows_P.max() / (total / p) * total
        balanced_send = total / p * (p - 1) / p
        a2a += (max(ll.send_rows_P.max(), ll.recv_rows_P.max()) / balanced_send if p > 1 else 1.0) * total
        weight += total
    return {"compute_imbalance": max(compute / weight, 1.0) if weight else 1.0,
            "a2a_imbalance": max(a2a / weight, 1.0) if weight else 1.0}  # fmt: skip


def a2a_bytes_per_rank(plan: SpecPlan, load: Load, bytes_per_element: int) -> list[float]:
    """Bytes each rank of the expert-parallel group sends to others per micro-step (dispatch
    and combine, forward and backward; the replayed forward under full recomputation) over
    the dropless layers; capacity layers send their fixed buffers (REFERENCE sec. 4)."""
    p = plan.parallel
    if p.ep == 1:
        return [0.0]
    passes = 3 if p.recompute == "full" else 2
    per_rank = np.zeros(p.ep)
    for layer in plan.moe_layers:
        capacity = layer.moe.capacity
        row_bytes = plan.model.d_model * bytes_per_element
        if capacity is not None and not capacity.dropless:
            slots = layer.moe.experts.count * capacity.capacity(plan.tokens_of(layer), layer.moe.router.experts_per_token, layer.moe.experts.count)
            per_rank += 2 * passes * (slots * (p.ep - 1) // p.ep) * row_bytes
            continue
        ll = layer_load(plan, load, layer, per_micro_step=False)  # whole counts, divided once below
        per_rank += passes * (ll.send_rows_P + ll.recv_rows_P) * row_bytes / load.micro_steps
    return per_rank.tolist()
