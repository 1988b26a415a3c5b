"""Tensor parallelism (Megatron's column/row split) applied from outside the model with
DTensor's `parallelize_module`, as torchtitan's `apply_tp` does.

Per block, over the tp ranks (a 1-D DeviceMesh):
- attention: q, k, v projections column-parallel (a rank holds H/tp query heads and G/tp
  key/value heads, so the attention core runs on local heads with no communication), the
  output projection row-parallel (one all-reduce of [B, S, D] in forward, one in backward);
- the dense FFN and a MoE layer's shared experts: gate/up column-parallel, down row-parallel
  (the same two all-reduces);
- routed experts are not split: they use expert parallelism inside data parallelism (fine-
  grained experts are too narrow to split, which is why torchtitan dropped expert-TP). The
  router and the routed experts run on the block's replicated input, the same on every tp
  rank; their gradients come out equal on the tp ranks, as do the norms' and embeddings'.
Embeddings, norms and the LM head stay replicated (no vocabulary split): their gradients are
whole on every tp rank because DTensor all-reduces the input gradient of every column-parallel
projection back to Replicate.

Attention sinks (one logit per head) are split with the heads. Refused at validation
(spec/resolve.py): full-width QK-norm (it normalises across the heads the split cuts), MLA, dropout (the tp ranks of one replica
draw one random stream), encoder-decoders, the LSTM host and ZeRO stages above 0.
"""

from __future__ import annotations

from torch import nn

from moespec.model.layers import CausalSelfAttention, DenseFFN


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Split `model`'s attention, dense FFNs and shared experts over `tp_mesh` in place
    (their weights become Shard(0)/Shard(1) DTensors); returns `model`."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

    if tp_mesh.size() == 1 or getattr(model, "_moespec_tp", False):
        return model
    model._moespec_tp = True
    # The module's input becomes one replicated DTensor that its column-parallel projections
    # share, so their input gradients are summed as DTensors and all-reduced once in
    # backward (q, k and v would otherwise each all-reduce their own).
    def shared_input(n_args: int) -> PrepareModuleInput:  # x, then arguments that stay plain (RoPE tables)
        layouts = (Replicate(),) + (None,) * (n_args - 1)
        return PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts, use_local_output=False)

    for module in list(model.modules()):
        if isinstance(module, CausalSelfAttention):
            plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()}
            parallelize_module(module, tp_mesh, shared_input(2))  # called as attention(x, rope)
            parallelize_module(module, tp_mesh, plan)
            if module.sinks is not None:  # one logit per head: this rank's heads' logits
                module.sinks = nn.Parameter(distribute_tensor(module.sinks.detach(), tp_mesh, [Shard(0)]))
        elif isinstance(module, DenseFFN):
            plan = {"w_up": ColwiseParallel(), "w_down": RowwiseParallel()}
            if module.w_gate is not None:
                plan["w_gate"] = ColwiseParallel()
            parallelize_module(module, tp_mesh, shared_input(1))
            parallelize_module(module, tp_mesh, plan)
    return model

