"""What is applied to a built model from outside it (torchtitan's `parallelize_*` pattern):
the model's modules hold no process group and no recomputation switch; functions here wrap
them: the layout over ranks (`parallelize`: expert parallelism, then tensor parallelism from
tensor_parallel.py) and activation recomputation (`parallelism.recompute`) here; pipeline
stages (pipeline.py) and data parallelism wrap the result in `train.prepare_training`.

Recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"), each mode a set of modules whose forward runs through
`moespec.model.recompute.checkpoint` (non-reentrant torch.utils.checkpoint): their inner
activations are dropped after the forward and recomputed in the backward, from the inputs
kept at the module's edge; torch restores the RNG, so dropout and router noise replay, and
the replay runs the module's whole forward (torch's early stop is off).
- none: nothing is recomputed; every activation autograd needs is kept.
- selective: every attention core (`CausalSelfAttention.core`: the S x S scores q k^T, the
  causal mask, softmax, attention dropout and the product with v, i.e. one
  `scaled_dot_product_attention`) is recomputed; it keeps q, k, v and nothing of size S x S.
  Costs one extra attention-core forward per layer: 4 * B * H * S^2 * Hd FLOPs.
- full: every `DecoderBlock` is recomputed whole (norms, attention, the dense FFN or the MoE
  layer with its router, token shuffle and dispatch/combine all-to-alls); it keeps only the
  block's input. Costs one extra forward of every block.
The embeddings, final norm and LM head are never recomputed.
"""

from __future__ import annotations

import types

import torch.utils.checkpoint
from torch import nn

from moespec.model.encoder_decoder import EncDecBlock
from moespec.model.layers import AttentionCore, DecoderBlock
from moespec.model.recompute import checkpoint

RECOMPUTE_MODES = ("none", "selective", "full")


def parallelize(model: nn.Module, plan, ctx) -> nn.Module:
    """The model's layout over the ranks of `ctx`, applied in place from outside the model code:
    expert parallelism (each rank keeps its E/ep experts of every MoE layer and gets the
    all-to-all group) and tensor parallelism (tensor_parallel.py). Pipeline stages and data
    parallelism wrap the result (`train.prepare_training`). Applying it twice is once."""
    from moespec.distributed.data_parallel import shard_experts
    from moespec.distributed.tensor_parallel import apply_tensor_parallel

    shard_experts(model, ctx)
    if ctx.tp_size > 1:
        apply_tensor_parallel(model, ctx.tp_mesh, sequence_parallel=plan.parallel.sequence_parallel)
    return model


def apply_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Make `model`'s recomputed modules (per `mode`, see the module docstring) run through
    checkpoint, in place; returns `model`. Parameter names and counts do not change (the
    modules are not wrapped in new ones, their forward is). Applying twice is a no-op."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    kind = {"none": None, "selective": AttentionCore, "full": (DecoderBlock, EncDecBlock)}[mode]
    if kind is None:
        return model
    for module in model.modules():
        if isinstance(module, kind):
            _checkpoint_forward(module)
    return model


def recompute_mode(model: nn.Module) -> str:
    """Which mode `apply_recompute` left on `model` ("none" if it never ran)."""
    for module in model.modules():
        if getattr(module, "_moespec_recompute", False):
            return "full" if isinstance(module, (DecoderBlock, EncDecBlock)) else "selective"
    return "none"


def _checkpoint_forward(module: nn.Module) -> None:
    """module(...) runs `checkpoint(its class's forward, module, ...)`: hooks, `train()`/`eval()`
    and the state dict stay the module's own, and a deep copy rebinds to the copy. A block
    returns (x, stats, aux): non-reentrant checkpoint passes any structure through, so the
    caller sees the first forward's statistics and a differentiable aux loss."""
    if getattr(module, "_moespec_recompute", False):
        return
    module.forward = types.MethodType(_checkpointed_forward, module)
    module._moespec_recompute = True


def _checkpointed_forward(module: nn.Module, *args, **kwargs):
    # No early stop: torch would otherwise end the replay at the last op that saves a tensor
    # and skip what follows (a block's last matmul, the combine all-to-all), and the replay
    # would no longer be the whole forward the simulator counts (sim/counts.py).
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        return checkpoint(type(module).forward, module, *args, **kwargs)
