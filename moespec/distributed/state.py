"""What one rank holds and what it calls: the runtime's side of the memory and collective
counts the cost model predicts (REFERENCE.md sec. 3 and 4).

- `state_bytes(model, optimizers)`: this rank's bytes of parameters, gradients and AdamW
  state (exp_avg + exp_avg_sq; the scalar `step` counters are not optimizer state), each the
  sum of `numel * element_size` of the local tensor (a DTensor's `to_local()` shard). Measure
  after the optimizer step and before the next zero_grad, while the gradients exist.
- `count_collectives()`: c10d calls by kind while the block runs.

Why not `torch.distributed.tensor.debug.CommDebugMode` for the counts: on gloo in torch 2.13
it does see the c10d calls that DDP's reducer, FSDP2 and plain `dist.*` make (it is a
TorchDispatchMode, and so is this counter), but (1) its module tracker registers full backward
hooks on every module, which changes the autograd graph it observes (torch warns about it, and
`distributed/parity.py` saw it fail under DDP's forward hooks), and (2) its list of collectives
has no send/recv. `count_collectives` is the same dispatcher-level view without the tracker,
over every `c10d::` op and the functional collectives (`_c10d_functional::`, which DTensor's
`full_tensor()` uses); `wait_tensor` is not a call of its own.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

# Dispatcher op names (without namespace) -> the kind of collective they are.
_KINDS = {
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce", "all_reduce_coalesced_": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv",
}  # fmt: skip
KINDS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv")
_NOT_CALLS = {"wait_tensor"}  # functional collectives' completion, not a collective


class _CollectiveCounter(TorchDispatchMode):
    def __init__(self, calls: dict[str, int]):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = getattr(func.overloadpacket, "_qualified_op_name", "").partition("::")
        if namespace in ("c10d", "_c10d_functional") and name not in _NOT_CALLS:
            kind = _KINDS.get(name, name)  # an unlisted c10d op (barrier, gather, ...) under its own name
            self.calls[kind] = self.calls.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_collectives():
    """`with count_collectives() as calls: ...` fills `calls` (kind -> calls this rank made):
    every kind of KINDS is a key, zero when unused; other c10d ops appear under their op name.
    Counts what the dispatcher sees on this thread, the autograd backward on CPU included."""
    calls = dict.fromkeys(KINDS, 0)
    with _CollectiveCounter(calls):
        yield calls


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def state_bytes(model: nn.Module, optimizers) -> dict[str, int]:
    """This rank's bytes: {"params", "grads", "optimizer"}. Parameters are counted once even
    when tied; optimizer bytes are the exp_avg and exp_avg_sq tensors of every optimizer."""
    params = {id(p): p for p in model.parameters()}.values()
    optimizer = 0
    for opt in optimizers:
        for per_param in opt.state.values():
            optimizer += sum(_local_bytes(per_param[key]) for key in ("exp_avg", "exp_avg_sq") if key in per_param)
    return {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": optimizer,
    }
