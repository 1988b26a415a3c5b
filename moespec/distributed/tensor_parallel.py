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

Sequence parallelism (`parallelism.sequence_parallel`, Korthikanti et al. 2022; torchtitan's
layout): between the split modules each tp rank keeps 1/tp of the sequence, [B, S/tp, D], so
the blocks' norms (torch's SequenceParallel style) and the residual adds run on S/tp tokens.
The first block's input is cut to the rank's slice; attention and the dense FFN all-gather
their input and reduce-scatter their output (Shard(1)) instead of one all-reduce; a MoE layer
all-gathers its input, runs its router and routed experts on the whole sequence as without
it (their gradients stay equal over tp, the aux loss is the single process's) and keeps its
output's slice; the final norm all-gathers. A norm's weight gradient is then a partial sum
over the tp ranks: `reduce_partial_gradients` sums them once per step.

Attention sinks (one logit per head) are split with the heads. Refused at validation
(spec/resolve.py): full-width QK-norm (it normalises across the heads the split cuts), MLA, dropout (the tp ranks of one replica
draw one random stream), encoder-decoders, the LSTM host and ZeRO stages above 0.
"""

from __future__ import annotations

from torch import nn

from moespec.model.layers import CausalSelfAttention, DecoderBlock, DenseFFN


def apply_tensor_parallel(model: nn.Module, tp_mesh, *, sequence_parallel: bool = False) -> nn.Module:
    """Split `model`'s attention, dense FFNs and shared experts over `tp_mesh` in place
    (their weights become Shard(0)/Shard(1) DTensors), and with `sequence_parallel` its
    residual stream and blocks' norms over the sequence (module docstring); returns `model`."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)  # fmt: skip

    if tp_mesh.size() == 1 or getattr(model, "_moespec_tp", False):
        return model
    model._moespec_tp = True
    # The module's input becomes one replicated DTensor that its column-parallel projections
    # share, so their input gradients are summed as DTensors and reduced once in backward
    # (q, k and v would otherwise each all-reduce their own). Under sequence parallelism the
    # input arrives as the rank's slice (Shard(1)) and is all-gathered into that DTensor.
    def shared_input(n_args: int, arriving) -> PrepareModuleInput:  # x, then arguments that stay plain (RoPE tables)
        rest = (None,) * (n_args - 1)
        return PrepareModuleInput(input_layouts=(arriving,) + rest, desired_input_layouts=(Replicate(),) + rest, use_local_output=False)

    sequence = Shard(1)  # [B, S, D]: the sequence dimension
    block_ffns = set()
    if sequence_parallel:
        blocks = list(model.blocks)
        for block in blocks:
            if not isinstance(block, DecoderBlock) or not isinstance(block.attention, CausalSelfAttention):
                raise ValueError("sequence parallelism runs decoder blocks with standard attention")
            parallelize_module(block.attn_norm, tp_mesh, SequenceParallel())
            parallelize_module(block.ffn_norm, tp_mesh, SequenceParallel())
            if block.moe is not None:  # the whole sequence in, the rank's slice of the output kept
                parallelize_module(block.moe, tp_mesh, PrepareModuleInputOutput(
                    input_layouts=(sequence,), desired_input_layouts=(Replicate(),), use_local_input=True,
                    output_layouts=(Replicate(), None, None), desired_output_layouts=(sequence, None, None), use_local_output=True))  # fmt: skip
            else:
                block_ffns.add(block.ffn)
        # the embeddings' output is whole on every rank: the first block takes its slice;
        # the final norm and the head see the whole sequence again
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(sequence,),
                                                                 use_local_output=True))  # fmt: skip
        parallelize_module(model.final_norm, tp_mesh, PrepareModuleInput(input_layouts=(sequence,), desired_input_layouts=(Replicate(),),
                                                                      use_local_output=True))  # fmt: skip

    for module in list(model.modules()):
        if isinstance(module, CausalSelfAttention):
            arriving, leaving = (sequence, sequence) if sequence_parallel else (Replicate(), Replicate())
            plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                    "o_proj": RowwiseParallel(output_layouts=leaving)}  # fmt: skip
            parallelize_module(module, tp_mesh, shared_input(2, arriving))  # called as attention(x, rope)
            parallelize_module(module, tp_mesh, plan)
            if module.sinks is not None:  # one logit per head: this rank's heads' logits
                module.sinks = nn.Parameter(distribute_tensor(module.sinks.detach(), tp_mesh, [Shard(0)]))
        elif isinstance(module, DenseFFN):  # a block's FFN, or a MoE layer's shared experts (whole input)
            arriving = sequence if module in block_ffns else Replicate()
            plan = {"w_up": ColwiseParallel(), "w_down": RowwiseParallel(output_layouts=arriving)}
            if module.w_gate is not None:
                plan["w_gate"] = ColwiseParallel()
            parallelize_module(module, tp_mesh, shared_input(1, arriving))
            parallelize_module(module, tp_mesh, plan)
    return model


def reduce_partial_gradients(model: nn.Module, tp_group) -> int:
    """Sum the gradients DTensor left as partial sums over the tp ranks (a sequence-parallel
    norm's weight: each rank saw S/tp tokens) in one flat all-reduce, and make them
    Replicate; returns how many there were. Without this AdamW would redistribute each one
    itself, once per use."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    partial = [p for p in model.parameters() if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements)]
    if not partial:
        return 0
    flat = torch.cat([p.grad._local_tensor.reshape(-1) for p in partial])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for p in partial:
        local = flat[offset : offset + p.grad._local_tensor.numel()].view_as(p.grad._local_tensor)
        offset += local.numel()
        p.grad = DTensor.from_local(local, p.grad.device_mesh, [Replicate()], run_check=False)
    return len(partial)

