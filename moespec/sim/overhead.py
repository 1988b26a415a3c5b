"""What the matmul roofline does not see: memory-bound elementwise work and fixed host time.

A training step is not only matmuls. Norms, activations, softmax, RoPE, routing, gathers and
their gradients move every activation through memory (REFERENCE sec. 5: each op's time is
`max(flops / (peak * eff), bytes / mem_bw)`; for these ops the bytes win). And each op costs
the host a dispatch (a Python call, an ATen dispatch, a kernel launch): on a small model, on a
CPU or in eager mode, that fixed cost is often most of the step.

- Elementwise bytes: every activation a layer stores (Korthikanti et al., `cost.elementwise_activation_bytes`)
  is written once in forward, read once and its gradient written once in backward: 3 passes.
  No new coefficient: memory bandwidth and its efficiency come from the backend (calibrated).
- Fixed host time: seconds per optimizer step (clipping, AdamW), per micro-step for the
  embedding, LM head and loss, per dense
  block, per MoE block by router type (BASE's auction and Sinkhorn's iterations cost more
  than a top-k), per expert held on the rank (grouped experts run a few ops per expert), and
  per expert-parallel all-to-all call (a blocking collective waits for the slowest rank: on
  busy CPU ranks that wait dwarfs the transfer).
  Shipped backends leave them at 0. They belong to the roofline time model only: a
  calibration replaces that model by the operator database (sim/opdb.py), whose host time is
  ops counted along the step (sim/ops.py) at a measured cost per op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from moespec.sim.design import ROUTER_NAMES  # noqa: F401  (calibration fits one overhead per router)

A2A_CALLS_PER_LAYER = 4  # dispatch and combine, forward and backward (6 when full recomputation replays them)
ELEMENTWISE_PASSES = 3  # forward write, backward read, gradient write of every stored activation


@dataclass(frozen=True)
class Overheads:
    """Fixed host-side seconds, forward + backward, at this backend's device."""

    step_s: float = 0.0  # per micro-step: embedding, LM head, loss
    optimizer_step_s: float = 0.0  # per optimizer step: zeroing, clipping, AdamW's dispatch
    dense_layer_s: float = 0.0  # one dense transformer block
    moe_layer_s: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}), hash=False)  # router -> s
    local_expert_s: float = 0.0  # each expert this rank holds, per MoE block
    a2a_call_s: float = 0.0  # each expert-parallel all-to-all call beyond its transfer: waiting for the slowest rank

    def moe_layer(self, router: str) -> float:
        return float(self.moe_layer_s.get(router, 0.0))

    def as_dict(self) -> dict:
        return {"step_s": self.step_s, "optimizer_step_s": self.optimizer_step_s, "dense_layer_s": self.dense_layer_s,
                "moe_layer_s": dict(self.moe_layer_s), "local_expert_s": self.local_expert_s,
                "a2a_call_s": self.a2a_call_s}  # fmt: skip


def overheads_from_dict(data: Mapping) -> Overheads:
    return Overheads(
        step_s=float(data.get("step_s", 0.0)),
        optimizer_step_s=float(data.get("optimizer_step_s", 0.0)),
        dense_layer_s=float(data.get("dense_layer_s", 0.0)),
        moe_layer_s=MappingProxyType({name: float(v) for name, v in data.get("moe_layer_s", {}).items()}),
        local_expert_s=float(data.get("local_expert_s", 0.0)),
        a2a_call_s=float(data.get("a2a_call_s", 0.0)),
    )
