"""The dense parts, the model builder and parameter counting, checked against closed-form
numbers: parameter counts, causality, the RoPE relative-position property, GQA against MHA
with repeated heads, deterministic initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moespec.model.build import build_model
from moespec.model.counting import count_parameters
from moespec.model.layers import CausalSelfAttention, RotaryEmbedding, apply_rope
from moespec.spec import load_plan
from moespec.spec.plan import (
    CapacityPlan,
    ExpertsPlan,
    HashRouter,
    LayerPlan,
    ModelPlan,
    MoELayerPlan,
    NoisyTopKRouter,
    ParallelPlan,
    SpecPlan,
    TopKRouter,
)


def tiny_plan(*, moe_layers: tuple[int, ...] = (), router=None, experts=None, capacity="default", **model) -> SpecPlan:
    """A small plan built from the dataclasses directly (no YAML), with model overrides."""
    fields = dict(
        vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64,
        activation="swiglu", norm="rmsnorm", norm_eps=1e-5, positions="rope", rope_theta=10000.0,
        tied_embeddings=True, seq_len=16, dropout=0.0, qkv_bias=False, init_std=0.02,
    )  # fmt: skip
    fields.update(model)
    m = ModelPlan(**fields)
    if capacity == "default":
        capacity = CapacityPlan(factor=1.25, eval_factor=2.0, min_capacity=4, drop_policy="position", dropless=False)
    moe = MoELayerPlan(
        router=router or TopKRouter(k=2),
        experts=experts or ExpertsPlan(count=4, d_ff=16, shared_count=0, shared_d_ff=0, shared_gate=False),
        capacity=capacity,
    )
    layers = tuple(
        LayerPlan(index=i, kind="moe" if i in moe_layers else "dense", d_ff=m.d_ff, moe=moe if i in moe_layers else None)
        for i in range(m.n_layers)
    )
    parallel = ParallelPlan(dp=1, ep=1, tp=1, pp=1, micro_batch=2, global_batch=2, precision="fp32", zero_stage=0, recompute="none")
    return SpecPlan(version=1, name="tiny", description="", model=m, layers=layers, parallel=parallel)


# --- closed-form parameter counts -----------------------------------------------------------


def attention_params(m: ModelPlan) -> int:
    per_norm = 2 if m.norm == "layernorm" and m.norm_bias else 1
    extra = (m.d_model if m.out_bias else 0) + (m.n_heads if m.attention_sinks else 0)
    if m.mla is not None:  # DeepSeek's latent attention, as HF's DeepseekV3Attention lays it out
        a, qk = m.mla, m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim
        q = m.d_model * m.n_heads * qk if a.q_lora_rank is None else m.d_model * a.q_lora_rank + per_norm * a.q_lora_rank + a.q_lora_rank * m.n_heads * qk
        kv = m.d_model * (a.kv_lora_rank + a.qk_rope_head_dim) + per_norm * a.kv_lora_rank + a.kv_lora_rank * m.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + m.n_heads * a.v_head_dim * m.d_model + extra
    q = m.d_model * m.n_heads * m.head_dim
    kv = 2 * m.d_model * m.n_kv_heads * m.head_dim
    o = m.n_heads * m.head_dim * m.d_model
    bias = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim if m.qkv_bias else 0
    qk_norm = {"none": 0, "full": (m.n_heads + m.n_kv_heads) * m.head_dim, "per_head": 2 * m.head_dim, "l2": 0}[m.qk_norm] * per_norm
    return q + kv + o + bias + qk_norm + extra


def ffn_params(d_model: int, d_ff: int, activation: str) -> int:
    return (3 if activation in ("swiglu", "geglu", "swiglu_clamped") else 2) * d_model * d_ff


def expert_bias_params(d_model: int, d_ff: int, activation: str) -> int:
    """gpt-oss: a bias on each projection of each expert."""
    return (2 if activation in ("swiglu", "geglu", "swiglu_clamped") else 1) * d_ff + d_model


def norm_params(m: ModelPlan) -> int:
    return m.d_model * (2 if m.norm == "layernorm" and m.norm_bias else 1)


def expected_params(plan: SpecPlan) -> tuple[int, int]:
    """(total, active per token) from the formulas, independent of the module tree."""
    m = plan.model
    lstm = m.host == "lstm"  # Shazeer et al. 2017: torch's LSTM parameters per layer, no norms, no positions
    embed = m.vocab_size * m.d_model + (m.seq_len * m.d_model if m.positions == "learned" else 0)
    embed += 2 * m.relative_buckets * m.n_heads if m.positions == "relative" else 0  # T5: a bias table per stack
    head = (0 if m.tied_embeddings else m.vocab_size * m.d_model) + (m.vocab_size if m.lm_head_bias else 0)
    final_norms = 0 if lstm else norm_params(m) * (2 if m.encoder else 1)  # an encoder-decoder: the encoder's too
    total = active = embed + head + final_norms
    for layer in plan.layers:
        block = 4 * m.d_model * (m.d_model + 1) * 2 if lstm else attention_params(m) + 2 * norm_params(m)
        if layer.stack == "decoder" and m.encoder:  # cross-attention: its norm, q, k, v, o
            block += 4 * m.d_model * m.n_heads * m.head_dim + norm_params(m)
        if layer.kind == "dense" and lstm:
            total, active = total + block, active + block
            continue
        if layer.kind == "dense":
            total += block + ffn_params(m.d_model, layer.d_ff, m.activation)
            active += block + ffn_params(m.d_model, layer.d_ff, m.activation)
            continue
        e, r = layer.moe.experts, layer.moe.router
        # A hash router has no weights (a fixed hash of the token id picks the expert).
        router = 0 if r.type == "hash" else m.d_model * e.count * (2 if r.type == "noisy_topk" else 1) + (e.count if getattr(r, "bias", False) else 0)
        one_expert = ffn_params(m.d_model, e.d_ff, m.activation) + (expert_bias_params(m.d_model, e.d_ff, m.activation) if e.bias else 0)
        shared = e.shared_count * ffn_params(m.d_model, e.shared_d_ff, m.activation) + (m.d_model if e.shared_gate else 0)
        total += block + router + shared + e.count * one_expert
        active += block + router + shared + r.experts_per_token * one_expert
    return total, active


DENSE_VARIANTS = [
    dict(),
    dict(n_kv_heads=2, qkv_bias=True),  # GQA with Qwen-style q/k/v bias
    dict(n_kv_heads=1, tied_embeddings=False, positions="learned", norm="layernorm", activation="gelu"),
    dict(head_dim=12, activation="geglu", tied_embeddings=False),  # head_dim != d_model / n_heads
]


@pytest.mark.parametrize("overrides", DENSE_VARIANTS)
def test_dense_parameter_count_matches_formula(overrides):
    plan = tiny_plan(**overrides)
    model = build_model(plan)
    counts = count_parameters(model, plan)
    total, active = expected_params(plan)
    assert counts.total == total
    assert counts.active == active == total  # a dense model uses every parameter per token


def test_tiny_dense_count_by_hand():
    # V=256, D=32, H=4, G=2, Hd=8, F=64, swiglu, rmsnorm, qkv bias, untied, 2 layers:
    # attention 32*32 + 2*32*16 + 32*32 + (32 + 2*16) = 3136; ffn 3*32*64 = 6144; norms 2*32.
    # per layer 3136 + 6144 + 64 = 9344; embed 8192, head 8192, final norm 32.
    plan = tiny_plan(n_kv_heads=2, qkv_bias=True, tied_embeddings=False)
    assert count_parameters(build_model(plan), plan).total == 2 * 9344 + 8192 + 8192 + 32 == 35104


MOE_VARIANTS = [
    dict(moe_layers=(1,)),
    dict(
        moe_layers=(0, 1),
        n_kv_heads=2,
        qkv_bias=True,
        tied_embeddings=False,
        experts=ExpertsPlan(count=8, d_ff=8, shared_count=2, shared_d_ff=8, shared_gate=True),  # Qwen-MoE-like
    ),
    dict(moe_layers=(0,), router=NoisyTopKRouter(k=2, bias=True), activation="relu", norm="layernorm"),
]


@pytest.mark.parametrize("overrides", MOE_VARIANTS)
def test_moe_parameter_count_matches_formula(overrides):
    plan = tiny_plan(**overrides)
    model = build_model(plan)
    counts = count_parameters(model, plan)
    total, active = expected_params(plan)
    assert counts.total == total
    assert counts.active == active < total
    assert counts.embedding == plan.model.vocab_size * plan.model.d_model
    assert counts.total == counts.embedding + counts.lm_head + counts.final_norm + sum(layer.total for layer in counts.layers)


def test_tiny_moe_count_by_hand():
    # One MoE layer (index 1) of 4 experts, top-2, F=16, swiglu, D=32, tied, rope:
    # dense layer 4096 + 6144 + 64 = 10304; MoE layer 4096 + 64 + router 32*4 + 4 * 3*32*16
    # = 4096 + 64 + 128 + 6144 = 10432, of which 2 experts (3072) are inactive per token.
    plan = tiny_plan(moe_layers=(1,))
    counts = count_parameters(build_model(plan), plan)
    assert counts.total == 8192 + 32 + 10304 + 10432 == 28960
    assert counts.active == 28960 - 2 * 1536 == 25888
    assert counts.layers[1].routed_experts == 6144 and counts.layers[1].router_params == 128


SPECS = Path(__file__).resolve().parents[1] / "specs"


@pytest.mark.parametrize("path", sorted(SPECS.glob("tiny-*.yaml")), ids=lambda p: p.stem)
def test_every_tiny_spec_counts_match_the_formula(path):
    """What `moespec compile` reports for each shipped tiny spec (every router type, overrides,
    shared experts) equals the closed form above, which never looks at the module tree."""
    plan = load_plan(path)
    counts = count_parameters(build_model(plan, device="meta"), plan)
    assert (counts.total, counts.active) == expected_params(plan)


DROPLESS_MIXTRAL = CapacityPlan(factor=None, eval_factor=None, min_capacity=4, drop_policy="position", dropless=True)


def test_mixtral_size_on_meta_matches_published_count():
    """Mixtral-8x7B built on meta: the Hugging Face model has exactly 46,702,792,704 parameters."""
    plan = tiny_plan(
        moe_layers=tuple(range(32)), vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, d_ff=14336, tied_embeddings=False, seq_len=4096,
        experts=ExpertsPlan(count=8, d_ff=14336, shared_count=0, shared_d_ff=0, shared_gate=False),
        capacity=DROPLESS_MIXTRAL,
    )  # fmt: skip
    model = build_model(plan, device="meta")
    counts = count_parameters(model, plan)
    assert next(model.parameters()).is_meta
    assert counts.total == 46_702_792_704
    assert counts.active == 12_879_925_248  # published as 12.9B active, embeddings included


# --- tied embeddings, determinism -----------------------------------------------------------


def test_tied_head_shares_the_embedding_and_is_stored_once():
    tied_model, untied_model = build_model(tiny_plan()), build_model(tiny_plan(tied_embeddings=False))
    assert "lm_head.weight" not in tied_model.state_dict()
    assert "lm_head.weight" in untied_model.state_dict()
    hidden = {}
    tied_model.final_norm.register_forward_hook(lambda module, args, out: hidden.update(h=out))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = tied_model(tokens)
    assert logits.shape == (2, 16, 256)
    torch.testing.assert_close(logits, hidden["h"] @ tied_model.tok_embeddings.weight.T)  # same matmul, float32


def test_build_is_deterministic_per_seed_and_leaves_global_rng_alone():
    plan = tiny_plan(moe_layers=(1,))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(plan, seed=7).state_dict()
    assert torch.equal(torch.rand(1), expected_next)  # build ran under a forked RNG
    b = build_model(plan, seed=7).state_dict()
    c = build_model(plan, seed=8).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["blocks.0.attention.q_proj.weight"], c["blocks.0.attention.q_proj.weight"])
    # init_std is honoured: 0.02 on q_proj, 0.02 / sqrt(2 * 2 layers) = 0.01 on o_proj.
    assert a["blocks.0.attention.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)  # 1024 samples: ~2% noise
    assert a["blocks.0.attention.o_proj.weight"].std().item() == pytest.approx(0.01, rel=0.1)


# --- attention ------------------------------------------------------------------------------


DROPLESS = CapacityPlan(factor=None, eval_factor=None, min_capacity=4, drop_policy="position", dropless=True)


@pytest.mark.parametrize("overrides", [dict(), dict(positions="learned", n_kv_heads=2), dict(moe_layers=(1,), capacity=DROPLESS)])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(overrides):
    # The MoE variant is dropless top-k: routing is per token, so no token's output depends
    # on another token's routing (with capacity, a later token could take an earlier one's slot
    # in another sequence of the same routing group).
    plan = tiny_plan(**overrides)
    model = build_model(plan).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before, _ = model(tokens)
        after, _ = model(changed)
    # Earlier positions never see position 10: equal up to float32 kernel reordering.
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-4


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def rotated(x, position):
        cos, sin = rope.cos_sin(torch.tensor([position]))
        return apply_rope(x, cos, sin)

    score = (rotated(q, 3) * rotated(k, 1)).sum()
    for shift in (1, 7, 50):
        shifted = (rotated(q, 3 + shift) * rotated(k, 1 + shift)).sum()
        torch.testing.assert_close(shifted, score, rtol=0, atol=1e-5)  # float32 cos/sin of angles up to ~50 rad
    assert abs((rotated(q, 5) * rotated(k, 1)).sum() - score) > 1e-3  # a different distance scores differently
    torch.testing.assert_close(rotated(q, 9).norm(), q.norm())  # a rotation keeps the norm


def test_gqa_equals_mha_with_repeated_key_value_heads():
    g = torch.Generator().manual_seed(0)
    gqa = CausalSelfAttention(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)
    mha = CausalSelfAttention(d_model=32, n_heads=4, n_kv_heads=4, head_dim=8)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            heads = getattr(gqa, name).weight.view(2, 8, 32)  # [G, Hd, D]
            getattr(mha, name).weight.copy_(heads.repeat_interleave(2, dim=0).reshape(32, 32))  # [H*Hd, D]
    x = torch.randn(2, 5, 32, generator=g)
    rope = RotaryEmbedding(head_dim=8, theta=10000.0).cos_sin(torch.arange(5))
    torch.testing.assert_close(gqa(x, rope), mha(x, rope), rtol=1e-5, atol=1e-6)  # same math, different kernels


def test_forward_returns_moe_stats_and_aux_loss():
    plan = tiny_plan(moe_layers=(0, 1))
    logits, aux = build_model(plan)(torch.zeros(2, 16, dtype=torch.long))
    assert logits.shape == (2, 16, 256)
    assert [s.layer for s in aux.moe] == [0, 1]
    assert all(int(s.tokens_per_expert_E.sum()) == 2 * 16 * 2 for s in aux.moe)  # T * k assignments
    assert aux.aux_loss.dtype == torch.float32 and aux.aux_loss.item() > 0


def test_learned_positions_reject_too_long_input():
    model = build_model(tiny_plan(positions="learned"))
    with pytest.raises(ValueError, match="exceeds the learned position table"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_hash_layers_receive_the_token_ids():
    # Hash routing sees the ids, not the hidden states: a sequence of one repeated byte sends
    # every token of every hash layer to the same expert, whatever the position.
    plan = tiny_plan(moe_layers=(0, 1), router=HashRouter(seed=0), capacity=DROPLESS)
    _, aux = build_model(plan)(torch.full((2, 16), 65, dtype=torch.long))
    for stats in aux.moe:
        assert sorted(stats.tokens_per_expert_E.tolist()) == [0, 0, 0, 32]
