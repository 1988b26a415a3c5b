"""The resolved plan: a valid spec with every default filled in and every layer explicit.

The compiler, the simulator and the explorer consume these frozen dataclasses and nothing
else, so a default is decided once (in the schema, read by `resolve.py`) and cannot differ
between the model that runs and the model that is costed. Pure Python: no torch here.

Shape legend used across moespec: T tokens in a routing group, D d_model, F expert d_ff,
E experts, K experts per token, C capacity per expert, P ranks in an expert-parallel group.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Union

Activation = Literal["relu", "gelu", "swiglu", "geglu", "swiglu_clamped"]
Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rope", "relative", "none"]  # none: an LSTM host (order is in the recurrence)
Precision = Literal["fp32", "bf16", "fp16"]
Recompute = Literal["none", "selective", "full"]
QKNorm = Literal["none", "full", "per_head", "l2"]
DropPolicy = Literal["position", "probability"]


@dataclass(frozen=True)
class MLAPlan:
    """Multi-head Latent Attention (DeepSeek-V2/V3): q = q_b(norm(q_a(x))) (or q_proj(x) when
    q_lora_rank is None), [c, k_rope] = kv_a(x), [k_nope, v] = kv_b(norm(c)); each head's key is
    [k_nope, k_rope] with k_rope shared by the heads."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class EncoderPlan:
    """The encoder stack of a T5-style encoder-decoder (Switch, ST-MoE): `n_layers` bidirectional
    blocks over `seq_len` input tokens; the decoder (model.n_layers, model.seq_len) adds
    cross-attention to the encoder's output in every block. Training corrupts spans of the
    input (`noise_density` of the tokens in spans of mean length `mean_span`) and the decoder
    predicts them (Raffel et al. 2020)."""

    n_layers: int
    seq_len: int
    noise_density: float = 0.15
    mean_span: float = 3.0


@dataclass(frozen=True)
class ModelPlan:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # == n_heads for MHA, fewer for GQA, 1 for MQA
    head_dim: int  # d_model // n_heads unless the spec sets it (Qwen, Gemma set it apart)
    d_ff: int  # hidden width of the dense FFN layers
    activation: Activation
    norm: Norm
    norm_eps: float
    positions: Positions
    rope_theta: float
    tied_embeddings: bool
    seq_len: int
    dropout: float
    qkv_bias: bool  # Qwen-style bias on the q, k, v projections (changes parameter counts)
    init_std: float
    out_bias: bool = False  # bias on o_proj (Phi-3.5-MoE, gpt-oss)
    qk_norm: QKNorm = "none"  # full: over H*Hd (OLMoE); per_head: over Hd, shared by heads (Qwen3)
    norm_bias: bool = True  # LayerNorm's bias (false: DBRX); resolved False for rmsnorm, which has none
    lm_head_bias: bool = False  # bias on the LM head (Phi-3.5-MoE)
    mla: MLAPlan | None = None  # latent attention; then head_dim = qk_nope + qk_rope, n_kv_heads = n_heads
    rope_fraction: float = 1.0  # share of head_dim RoPE rotates (the first channels; GLM-4.5: 0.5)
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (Llama-4's NoPE layers)
    attention_sinks: bool = False  # a learned logit per head joins each softmax (gpt-oss)
    window: int | None = None  # sliding-window size in `window_layers`; None: no window anywhere
    window_layers: tuple[int, ...] = ()  # the windowed layers (resolved: explicit)
    encoder: EncoderPlan | None = None  # encoder-decoder (T5); then n_layers, seq_len are the decoder's
    relative_buckets: int = 32  # positions: relative (T5's bucketed bias, one table per stack)
    relative_max_distance: int = 128
    host: Literal["transformer", "lstm"] = "transformer"  # lstm: Shazeer et al. 2017's stacked LSTMs around the MoE layers

    @property
    def total_blocks(self) -> int:
        """Blocks of the whole model: the decoder's, and the encoder's before them."""
        return self.n_layers + (self.encoder.n_layers if self.encoder else 0)

    def window_of(self, layer: int) -> int | None:
        """The window of a layer, or None when it sees the whole prefix (a window covering
        seq_len is no window)."""
        return self.window if self.window is not None and self.window < self.seq_len and layer in self.window_layers else None

    @property
    def rope_dim(self) -> int:
        """Channels per head RoPE rotates: MLA's rotary part, else head_dim * rope_fraction."""
        return self.mla.qk_rope_head_dim if self.mla else int(round(self.head_dim * self.rope_fraction))


# --- routers: a tagged union, one frozen dataclass per `router.type` -----------------------


@dataclass(frozen=True)
class TopKRouter:
    """GShard / Mixtral: top-k of softmax(logits)."""

    type: Literal["topk"] = "topk"
    k: int = 2
    normalize: bool = True  # renormalise the k chosen probabilities to sum to 1
    bias: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    selection_bias: bool = False  # ERNIE-4.5: a frozen per-expert correction that only selects

    @property
    def experts_per_token(self) -> int:
        return self.k


@dataclass(frozen=True)
class NoisyTopKRouter:
    """Shazeer et al. 2017: top-k of logits + N(0,1) * softplus(x @ W_noise)."""

    type: Literal["noisy_topk"] = "noisy_topk"
    k: int = 2
    bias: bool = False
    noise_epsilon: float = 0.01  # floor on the noise std, as in the paper's reference code
    importance_coef: float = 0.01
    load_coef: float = 0.01
    z_loss_coef: float = 0.0

    @property
    def experts_per_token(self) -> int:
        return self.k


@dataclass(frozen=True)
class SwitchRouter:
    """Fedus et al. 2021: top-1, optional multiplicative input jitter in training."""

    type: Literal["switch"] = "switch"
    bias: bool = False
    jitter_eps: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    @property
    def experts_per_token(self) -> int:
        return 1


@dataclass(frozen=True)
class BaseRouter:
    """Lewis et al. 2021: balanced linear assignment in training, greedy argmax at eval."""

    type: Literal["base"] = "base"
    shuffle: bool = True  # shuffle tokens across the expert-parallel group before routing
    auction_eps: float | None = None  # None: chosen from the affinity range (see auction.py)

    @property
    def experts_per_token(self) -> int:
        return 1


@dataclass(frozen=True)
class SinkhornRouter:
    """S-BASE (Clark et al. 2022): top-1 after Sinkhorn balancing in training."""

    type: Literal["sinkhorn"] = "sinkhorn"
    bias: bool = False
    iterations: int = 8
    z_loss_coef: float = 0.0

    @property
    def experts_per_token(self) -> int:
        return 1


@dataclass(frozen=True)
class ExpertChoiceRouter:
    """Zhou et al. 2022: each expert takes its top C = T * cf / E tokens."""

    type: Literal["expert_choice"] = "expert_choice"
    bias: bool = False
    z_loss_coef: float = 0.0

    @property
    def experts_per_token(self) -> int:
        # On average a token is processed by cf experts; cost counts use capacity, not k.
        return 1


@dataclass(frozen=True)
class HashRouter:
    """Roller et al. 2021: a fixed random hash of the token id picks the expert."""

    type: Literal["hash"] = "hash"
    seed: int = 0

    @property
    def experts_per_token(self) -> int:
        return 1


@dataclass(frozen=True)
class SigmoidBiasRouter:
    """DeepSeek-V3: top-k of sigmoid(logits) + bias; the bias only selects (aux-loss-free)."""

    type: Literal["sigmoid_bias"] = "sigmoid_bias"
    k: int = 8
    n_groups: int = 1  # experts split into groups; a token may use only topk_groups of them
    topk_groups: int = 1
    bias_update_rate: float = 0.001  # gamma: bias += rate * sign(mean_load - load) per step
    normalize: bool = True
    scaling_factor: float = 1.0  # routed_scaling_factor applied to the normalised gates

    @property
    def experts_per_token(self) -> int:
        return self.k


@dataclass(frozen=True)
class SparseMixerRouter:
    """SparseMixer-v2 (Liu et al. 2024; Phi-3.5-MoE): experts chosen one at a time from a
    softmax over the logits within 2 * jitter_eps (relative) of the best remaining one;
    sampled in training with Heun's third-order gradient, argmax at eval."""

    type: Literal["sparsemixer"] = "sparsemixer"
    k: int = 2
    bias: bool = False
    jitter_eps: float = 0.01
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    @property
    def experts_per_token(self) -> int:
        return self.k


RouterPlan = Union[
    TopKRouter,
    NoisyTopKRouter,
    SwitchRouter,
    BaseRouter,
    SinkhornRouter,
    ExpertChoiceRouter,
    HashRouter,
    SigmoidBiasRouter,
    SparseMixerRouter,
]

ROUTER_TYPES: dict[str, type] = {
    cls.type: cls  # type: ignore[attr-defined]
    for cls in (
        TopKRouter,
        NoisyTopKRouter,
        SwitchRouter,
        BaseRouter,
        SinkhornRouter,
        ExpertChoiceRouter,
        HashRouter,
        SigmoidBiasRouter,
        SparseMixerRouter,
    )
}


@dataclass(frozen=True)
class ExpertsPlan:
    count: int  # E routed experts
    d_ff: int  # F, hidden width of one routed expert (fine-grained experts: small F)
    shared_count: int  # experts every token passes through (DeepSeek-MoE, Qwen-MoE)
    shared_d_ff: int  # hidden width of one shared expert
    shared_gate: bool  # Qwen-style sigmoid gate Linear(D, 1) on the shared experts' output
    bias: bool = False  # gpt-oss: a bias per routed expert on every projection
    gate_input: bool = False  # Llama-4: the gate scales the expert's input, not its output (top-1)


@dataclass(frozen=True)
class CapacityPlan:
    """Capacity per expert per routing group: C = max(ceil(k * T / E * factor), min_capacity)."""

    factor: float | None  # None when dropless
    eval_factor: float | None
    min_capacity: int
    drop_policy: DropPolicy
    dropless: bool

    def capacity(self, tokens: int, experts_per_token: int, n_experts: int, *, training: bool = True) -> int | None:
        """Slots per expert for a routing group of `tokens`; None when dropless."""
        factor = self.factor if training else self.eval_factor
        if self.dropless or factor is None:
            return None
        return max(math.ceil(experts_per_token * tokens / n_experts * factor), self.min_capacity)


@dataclass(frozen=True)
class MoELayerPlan:
    router: RouterPlan
    experts: ExpertsPlan
    capacity: CapacityPlan | None  # None for BASE: exactly T/E tokens per expert, nothing dropped


@dataclass(frozen=True)
class LayerPlan:
    index: int  # block number through the whole model: an encoder's blocks come first
    kind: Literal["dense", "moe"]
    d_ff: int  # dense FFN width (used when kind == "dense")
    moe: MoELayerPlan | None
    stack: Literal["decoder", "encoder"] = "decoder"


@dataclass(frozen=True)
class ParallelPlan:
    """world = pp * tp * dp; expert parallelism lives inside data parallelism (ep | dp)."""

    dp: int
    ep: int
    tp: int
    pp: int
    micro_batch: int  # sequences per rank per micro-step
    global_batch: int  # sequences per optimizer step, all ranks together
    precision: Precision
    zero_stage: int
    recompute: Recompute
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    pp_layers: tuple[int, ...] | None = None  # blocks per stage as written; None: balanced
    sequence_parallel: bool = False  # tp ranks keep S/tp of the residual stream; norms run on it

    @property
    def world(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert: the expert-data-parallel degree."""
        return self.dp // self.ep

    @property
    def grad_accum(self) -> int:
        """Micro-batches per rank per optimizer step (also the pipeline's micro-batch count)."""
        return self.global_batch // (self.micro_batch * self.dp)


@dataclass(frozen=True)
class SpecPlan:
    version: int
    name: str
    description: str
    model: ModelPlan
    layers: tuple[LayerPlan, ...]
    parallel: ParallelPlan

    @property
    def moe_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.kind == "moe")

    @property
    def encoder_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.stack == "encoder")

    @property
    def decoder_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.stack == "decoder")

    def tokens_of(self, layer: LayerPlan) -> int:
        """T of one block: micro_batch times its stack's sequence length."""
        seq = self.model.encoder.seq_len if layer.stack == "encoder" else self.model.seq_len
        return self.parallel.micro_batch * seq

    @property
    def tokens_per_group(self) -> int:
        """T: tokens one rank routes at once (one micro-batch)."""
        return self.parallel.micro_batch * self.model.seq_len

    def to_dict(self) -> dict:
        """JSON-ready form (router and layer kinds explicit, derived figures included)."""
        data = dataclasses.asdict(self)
        data["layers"] = list(data["layers"])
        data["model"]["window_layers"] = list(data["model"]["window_layers"])
        data["model"]["nope_layers"] = list(data["model"]["nope_layers"])
        data["parallel"].update(
            world=self.parallel.world,
            expert_dp=self.parallel.expert_dp,
            grad_accum=self.parallel.grad_accum,
        )
        for layer_dict, layer in zip(data["layers"], self.layers):
            if layer.moe is not None:
                cap = layer.moe.capacity
                k = layer.moe.router.experts_per_token
                layer_dict["moe"]["capacity_slots"] = (
                    None if cap is None else cap.capacity(self.tokens_of(layer), k, layer.moe.experts.count)
                )
        return data
