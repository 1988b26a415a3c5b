"""`parallelism.recompute` executed (moespec/distributed/parallelize.py): the same losses and
gradients as without recomputation, exactly the extra forward FLOPs the definition says, and
fewer activations kept between forward and backward (full < selective < none)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moespec.distributed.parallelize import apply_recompute, recompute_mode
from moespec.model.build import build_model
from moespec.model.layers import AttentionCore, DecoderBlock
from moespec.spec import plan_from_text
from moespec.train import lm_loss

B, S, D, H, N_LAYERS = 2, 16, 32, 2, 2
HD = D // H

SPEC = """
version: 1
name: recompute-{name}
model: {{vocab_size: 256, d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16, dropout: {dropout}}}
moe:
  placement: {{type: every, every: 2, offset: 1}}
  experts: {{count: 4, d_ff: 32}}
  router: {router}
  capacity: {capacity}
parallelism: {{micro_batch: 2}}
"""
CAPACITY = dict(name="capacity", router="{type: topk, k: 2}", capacity="{factor: 1.25}", dropout=0.0)
DROPLESS = dict(name="dropless", router="{type: topk, k: 2}", capacity="{dropless: true}", dropout=0.0)
# Router noise and dropout > 0: equal gradients prove that the replay redraws the same numbers.
NOISY = dict(name="noisy", router="{type: noisy_topk, k: 2, importance_coef: 0.01, load_coef: 0.01}",
             capacity="{factor: 1.5}", dropout=0.1)  # fmt: skip


def _plan(fields: dict):
    return plan_from_text(SPEC.format(**fields))


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, S + 1), generator=torch.Generator().manual_seed(seed))  # [B, S+1]


def _model(fields: dict, mode: str):
    model = apply_recompute(build_model(_plan(fields), seed=0), mode)
    model.train()
    return model


def _loss(model, tokens):
    logits, aux = model(tokens[:, :-1])  # [B, S, V]
    return lm_loss(logits, tokens[:, 1:]) + aux.aux_loss, aux


def test_apply_recompute_keeps_parameter_names_and_marks_the_right_modules():
    reference = build_model(_plan(CAPACITY), seed=0)
    for mode, kind in (("selective", AttentionCore), ("full", DecoderBlock)):
        model = _model(CAPACITY, mode)
        assert list(model.state_dict()) == list(reference.state_dict())
        assert recompute_mode(model) == mode
        marked = [m for m in model.modules() if getattr(m, "_moespec_recompute", False)]
        assert len(marked) == N_LAYERS and all(isinstance(m, kind) for m in marked)
        apply_recompute(model, mode)  # twice is once
        assert [m for m in model.modules() if getattr(m, "_moespec_recompute", False)] == marked
    assert recompute_mode(_model(CAPACITY, "none")) == "none"
    with pytest.raises(ValueError, match="selective"):
        apply_recompute(reference, "some")


@pytest.mark.parametrize("fields", [CAPACITY, DROPLESS, NOISY], ids=lambda f: f["name"])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_losses_stats_and_gradients(fields, mode):
    results = {}
    for m in ("none", mode):
        model = _model(fields, m)
        losses, stats = [], []
        for step in range(2):  # two forwards: RNG state moves on between them in both runs
            torch.manual_seed(100 + step)  # dropout and router noise
            loss, aux = _loss(model, _tokens(step))
            loss.backward()
            losses.append(loss.detach())
            stats.append([s.tokens_per_expert_E for s in aux.moe])
        grads = {name: p.grad for name, p in model.named_parameters()}
        results[m] = (losses, stats, grads)
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results["none"], results[mode]
    # Bitwise: the replay runs the same kernels on the same inputs, on the same thread count.
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    assert all(torch.equal(x, y) for a, b in zip(stats_a, stats_b) for x, y in zip(a, b))
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def _step_flops(model, tokens) -> int:
    with FlopCounterMode(display=False) as counter:
        loss, _ = _loss(model, tokens)
        loss.backward()
    return int(counter.get_total_flops())


def _block_forward_flops(fields: dict, tokens) -> int:
    """Forward FLOPs of the blocks alone: each block run by itself on the input it saw."""
    model = _model(fields, "none")
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda mod, args, kwargs: inputs.append((mod, args, kwargs)), with_kwargs=True)
             for block in model.blocks]  # fmt: skip
    with torch.no_grad():
        model(tokens[:, :-1])
    for hook in hooks:
        hook.remove()
    total = 0
    with torch.no_grad():
        for block, args, kwargs in inputs:
            with FlopCounterMode(display=False) as counter:
                block(*args, **kwargs)
            total += int(counter.get_total_flops())
    return total


def test_recompute_adds_exactly_the_recomputed_forward_flops():
    tokens = _tokens()
    flops = {mode: _step_flops(_model(CAPACITY, mode), tokens) for mode in ("none", "selective", "full")}
    # selective: one more attention-core forward per layer, q k^T and p v: 2 matmuls of 2*B*H*S*S*Hd.
    assert flops["selective"] - flops["none"] == N_LAYERS * 4 * B * H * S * S * HD
    blocks = _block_forward_flops(CAPACITY, tokens)
    assert blocks > N_LAYERS * 4 * B * H * S * S * HD  # projections and FFNs too
    assert flops["full"] - flops["none"] == blocks
    print(f"FLOPs per step: none {flops['none']:,}, selective {flops['selective']:,}, full {flops['full']:,}")


def kept_activation_bytes(model, tokens) -> int:
    """Bytes held between forward and backward: the tensors autograd saved outside checkpoints
    plus the inputs checkpoints keep to replay from, each storage counted once, weights not."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def keep_inputs(module, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            for tensor in value if isinstance(value, tuple) else (value,):  # rope is (cos, sin)
                keep(tensor)

    hooks = [module.register_forward_pre_hook(keep_inputs, with_kwargs=True)
             for module in model.modules() if getattr(module, "_moespec_recompute", False)]  # fmt: skip
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits, aux = model(tokens[:, :-1])
    for hook in hooks:
        hook.remove()
    (logits.float().sum() + aux.aux_loss).backward()
    return sum(storages.values())


def test_recompute_keeps_fewer_activations():
    tokens = _tokens()
    kept = {mode: kept_activation_bytes(_model(NOISY, mode), tokens) for mode in ("none", "selective", "full")}
    assert kept["full"] < kept["selective"] < kept["none"]
    print(f"kept activation bytes: none {kept['none']:,}, selective {kept['selective']:,}, full {kept['full']:,}")
