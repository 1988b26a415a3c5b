"""Parameter counts read off the built module (REFERENCE.md sec. 4), never from a formula, so
they are exactly what runs: `total` is `sum(p.numel())` over `model.parameters()`, which lists
a tied embedding once.

Active parameters per token: every parameter a token's forward touches. That is all dense
parameters (embeddings included, and said so in the output; routers included; shared
experts included) plus `experts_per_token` of the E routed experts of each MoE layer. For
expert choice, where a token meets 0..E experts, the plan's experts_per_token (1) is used,
which is the average when the capacity factor is 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from moespec.spec.plan import SpecPlan


@dataclass(frozen=True)
class LayerCounts:
    index: int
    kind: str  # "dense" or "moe"
    router: str | None  # router type of a MoE layer
    n_experts: int  # E routed experts (0 for dense)
    experts_per_token: int  # K (0 for dense)
    attention: int  # q, k, v, o projections (and q/k/v biases)
    norms: int  # the block's two norms
    ffn: int  # dense FFN (0 for MoE)
    router_params: int  # router weights (and bias, noise weights)
    routed_experts: int  # all E routed experts together
    shared: int  # shared experts and their gate; anything else in the MoE layer
    total: int
    active: int  # per token: everything but the E - K routed experts not chosen


@dataclass(frozen=True)
class ParamCounts:
    total: int  # sum(p.numel()), tied embeddings once
    active: int  # per token, embeddings included
    embedding: int  # token embedding + learned positions or relative-bias tables (in total and in active)
    lm_head: int  # untied output projection; 0 when tied to the token embedding
    final_norm: int  # an encoder-decoder's two (encoder's and decoder's)
    layers: tuple[LayerCounts, ...]
    tied_embeddings: bool
    embeddings_in_active: bool = True  # stated so readers can compare with counts that leave them out

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head

    def as_dict(self) -> dict:
        data = asdict(self)
        data["non_embedding"] = self.non_embedding
        return data


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def routed_expert_module(moe: nn.Module) -> nn.Module:
    """The part of a MoE layer that holds the E routed experts (all of them, same size)."""
    return moe.experts


def count_parameters(model: nn.Module, plan: SpecPlan) -> ParamCounts:
    """Count a model built by `build_model(plan)`; works on the meta device."""
    layers = tuple(_count_block(block, layer) for block, layer in zip(model.blocks, plan.layers))
    # positions: learned table, or T5's relative-bias tables (one per stack of an encoder-decoder)
    positions = _numel(model.pos_embeddings) + _numel(getattr(model, "encoder_bias", None)) + _numel(getattr(model, "decoder_bias", None))
    embedding = _numel(model.tok_embeddings) + positions
    lm_head = _numel(model.lm_head) + (0 if model.head_bias is None else model.head_bias.numel())
    final_norm = _numel(model.final_norm) + _numel(getattr(model, "encoder_norm", None))  # and the encoder's
    total = sum(p.numel() for p in model.parameters())
    accounted = embedding + lm_head + final_norm + sum(layer.total for layer in layers)
    if accounted != total:
        raise RuntimeError(f"parameter breakdown ({accounted}) does not add up to the module's total ({total})")
    active = embedding + lm_head + final_norm + sum(layer.active for layer in layers)
    return ParamCounts(
        total=total,
        active=active,
        embedding=embedding,
        lm_head=lm_head,
        final_norm=final_norm,
        layers=layers,
        tied_embeddings=model.lm_head is None,
    )


def _count_block(block: nn.Module, layer) -> LayerCounts:
    # attention: self (and cross, in an encoder-decoder's decoder), or an LSTM host's recurrence
    attention = sum(_numel(getattr(block, name, None)) for name in ("attention", "cross_attention", "lstm"))
    norms = sum(_numel(getattr(block, name, None)) for name in ("attn_norm", "ffn_norm", "cross_norm"))
    if block.moe is None:
        ffn = _numel(getattr(block, "ffn", None))
        total = attention + norms + ffn
        return LayerCounts(
            index=layer.index, kind="dense", router=None, n_experts=0, experts_per_token=0,
            attention=attention, norms=norms, ffn=ffn, router_params=0, routed_experts=0,
            shared=0, total=total, active=total,
        )  # fmt: skip
    n_experts = layer.moe.experts.count
    k = layer.moe.router.experts_per_token
    moe_total = _numel(block.moe)
    routed = _numel(routed_expert_module(block.moe))
    router = _numel(block.moe.router)
    shared = moe_total - routed - router
    total = attention + norms + moe_total
    # All routed experts of a layer have the same size, so K of them are K/E of the bank.
    active = total - routed + routed * k // n_experts
    return LayerCounts(
        index=layer.index, kind="moe", router=layer.moe.router.type, n_experts=n_experts,
        experts_per_token=k, attention=attention, norms=norms, ffn=0, router_params=router,
        routed_experts=routed, shared=shared, total=total, active=active,
    )  # fmt: skip
