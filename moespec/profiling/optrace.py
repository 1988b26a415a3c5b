"""The op list of a real training step, counted at the ATen level: the oracle that the cost
model's analytic op counts (sim/ops.py) are checked against, and what `calibrate` divides a
measured host time by to get seconds per op.

Every op the dispatcher runs is counted (views and in-place updates included: each costs a
dispatch), by family: `matmul` (mm, addmm, bmm: timed by the matmul database instead),
`attention` (the SDPA kernels and their backward), `other` (everything else in forward and
backward), and `optimizer` (zeroing, clipping and AdamW, outside forward and backward).
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "_grouped_mm"})
FREE_OPS = frozenset({"_record_function_enter_new", "_record_function_exit", "promote_types"})  # bookkeeping, no kernel


def op_family(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    return "other"


class OpCounter(TorchDispatchMode):
    """Counts ATen ops by family while active (`phase` names where they are booked)."""

    def __init__(self):
        super().__init__()
        self.phase = "step"
        self.counts: collections.Counter = collections.Counter()
        self.names: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in FREE_OPS:
            family = "optimizer" if self.phase == "optimizer" else op_family(name)
            self.counts[family] += 1
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


def trace_step_ops(plan, *, seed: int = 0) -> dict[str, int]:
    """Ops by family of one single-process optimizer step of `plan` (after one untraced step,
    so that AdamW's state exists): forward and backward of every micro-batch, then the
    gradient clipping and AdamW step as `moespec.train.train_step` runs them."""
    from moespec.model.build import build_model
    from moespec.profiling.measure import TrainingBatches
    from moespec.train import batch_loss, prepare_training, train_step

    device = torch.device("cpu")
    model = build_model(plan, seed=seed, device=device)
    setup = prepare_training(model, plan)
    batches = TrainingBatches(plan, device, seed, 0)
    train_step(setup, plan, batches.step())
    windows = batches.step()
    counter = OpCounter()
    with counter:
        for optimizer in setup.optimizers:
            optimizer.zero_grad(set_to_none=True)
        for window in windows:
            _, ce, aux = batch_loss(setup.model, window, plan.parallel.precision)
            ((ce + aux.aux_loss) / len(windows)).backward()
        counter.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), 1.0)
        for optimizer in setup.optimizers:
            optimizer.step()
    return dict(counter.counts) | {"names": dict(counter.names)}
