"""Routers: which experts each token goes to, with what weight, and what keeps them balanced.

One small module per `router.type` of the plan (REFERENCE.md sec. 1), built by `build_router`.
Every module has the same call, `forward(x_TD, *, token_ids_T=None) -> RouterOutput`, and
returns flat assignments, so one dispatcher serves token choice and expert choice alike:
- token choice (topk, noisy_topk, switch, base, sinkhorn, hash, sigmoid_bias): A = T*K,
  token-major, assignment t*K + j is token t's j-th choice, best first;
- expert choice: A = E*C, expert-major, assignment e*C + c is expert e's c-th token, best first.
Capacity dropping is not done here: `tokens_per_expert_E` counts what the router asked for.

Selective precision (Switch Transformer sec. 2.4): the router runs in float32 even under bf16
autocast, because a bf16 softmax over E logits rounds probabilities coarsely enough to change
the top-k. Each forward disables autocast and upcasts x and the weights; float64 stays float64
so that gradcheck can test the math.

Shape legend: T tokens in the routing group, D d_model, E experts, K experts per token,
C capacity per expert, A assignments, G expert groups, S experts per group.
"""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moespec.model import router_losses
from moespec.model.balanced_routers import BaseRouting, SinkhornRouting, balanced_expert_index, sinkhorn_log_plan  # noqa: F401
from moespec.model.router_common import _compute_dtype, _full_precision, _softmax_top_k, _token_choice_output, router_logits  # noqa: F401
from moespec.model.types import RouterOutput
from moespec.spec.plan import (
    BaseRouter,
    CapacityPlan,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKRouter,
    RouterPlan,
    SigmoidBiasRouter,
    SinkhornRouter,
    SparseMixerRouter,
    SwitchRouter,
    TopKRouter,
)


class TopKRouting(nn.Module):
    """GShard / Mixtral: top-k of softmax(x @ W_r)."""

    def __init__(self, *, d_model: int, n_experts: int, k: int, normalize: bool, bias: bool,
                 aux_loss_coef: float, z_loss_coef: float, selection_bias: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=bias)
        self.k, self.normalize = k, normalize
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        # ERNIE-4.5's score correction: a parameter (checkpoints carry it, counts include it)
        # that no gradient reaches, so it is frozen here.
        self.selection_bias_E = nn.Parameter(torch.zeros(n_experts), requires_grad=False) if selection_bias else None

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            logits_TE = router_logits(self.gate, x_TD)
            return _softmax_top_k(logits_TE, self.k, self.normalize, self.aux_loss_coef, self.z_loss_coef,
                                  selection_bias_E=self.selection_bias_E)  # fmt: skip


class SwitchRouting(nn.Module):
    """Switch Transformer: top-1; in training the router input may be jittered by
    x * U(1 - eps, 1 + eps) (multiplicative noise; the experts still see the clean x)."""

    def __init__(self, *, d_model: int, n_experts: int, bias: bool, jitter_eps: float,
                 aux_loss_coef: float, z_loss_coef: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=bias)
        self.jitter_eps = jitter_eps
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            x_TD = x_TD.to(_compute_dtype(x_TD))
            if self.training and self.jitter_eps > 0:
                eps = self.jitter_eps
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            logits_TE = router_logits(self.gate, x_TD)
            return _softmax_top_k(logits_TE, 1, False, self.aux_loss_coef, self.z_loss_coef)


class NoisyTopKRouting(nn.Module):
    """Shazeer et al. 2017 noisy top-k gating.

    Training: H = x W_g + N(0, 1) * (softplus(x W_noise) + noise_epsilon); the k largest of H
    are kept and softmaxed, the others get gate 0. Eval: no noise. The tunable noise is what
    lets the smooth load estimator (appendix A) pass a balancing gradient to W_g and W_noise.
    """

    def __init__(self, *, d_model: int, n_experts: int, k: int, bias: bool, noise_epsilon: float,
                 importance_coef: float, load_coef: float, z_loss_coef: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=bias)
        self.noise = nn.Linear(d_model, n_experts, bias=False)
        self.k, self.noise_epsilon = k, noise_epsilon
        self.coefs = {"importance": importance_coef, "load": load_coef, "z_loss": z_loss_coef}

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            clean_TE = router_logits(self.gate, x_TD)
            if self.training:
                noise_std_TE = F.softplus(router_logits(self.noise, x_TD)) + self.noise_epsilon
                noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            else:
                noisy_TE = clean_TE
            top_logits_TK, expert_index_TK = noisy_TE.topk(self.k, dim=-1)
            gate_TK = top_logits_TK.softmax(dim=-1)
            gates_TE = torch.zeros_like(clean_TE).scatter(1, expert_index_TK, gate_TK)
            if self.training:
                load_E = router_losses.smooth_load(clean_TE, noisy_TE, noise_std_TE, self.k)
            else:  # no noise, nothing to smooth over: the load is the count
                load_E = router_losses.expert_counts(expert_index_TK.reshape(-1), clean_TE.shape[-1]).to(clean_TE.dtype)
            losses = {
                "importance": router_losses.cv_squared(gates_TE.sum(dim=0)),
                "load": router_losses.cv_squared(load_E),
                "z_loss": router_losses.z_loss(clean_TE),
            }
            return _token_choice_output(expert_index_TK, gate_TK, gate_TK, clean_TE.shape[-1], losses, self.coefs)


class ExpertChoiceRouting(nn.Module):
    """Zhou et al. 2022: each expert takes its C best tokens by softmax-over-experts score, so
    every expert is exactly full and a token gets 0..E experts. Holds the CapacityPlan so that
    C comes from the one capacity formula the simulator also uses."""

    def __init__(self, *, d_model: int, n_experts: int, bias: bool, z_loss_coef: float,
                 capacity: CapacityPlan) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=bias)
        self.n_experts, self.z_loss_coef, self.capacity = n_experts, z_loss_coef, capacity

    def slots(self, n_tokens: int) -> int:
        """C = capacity(T, k=1, E), at most T. An unset eval factor evaluates with the training one."""
        slots = self.capacity.capacity(n_tokens, 1, self.n_experts, training=self.training)
        if slots is None:
            slots = self.capacity.capacity(n_tokens, 1, self.n_experts, training=True)
        return min(slots, n_tokens)

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            logits_TE = router_logits(self.gate, x_TD)
            n_tokens, n_experts = logits_TE.shape
            slots = self.slots(n_tokens)
            scores_TE = logits_TE.softmax(dim=-1)
            gate_EC, token_index_EC = scores_TE.t().topk(slots, dim=-1)  # each expert's best tokens
            losses = {"z_loss": router_losses.z_loss(logits_TE)}
            return RouterOutput(
                token_index_A=token_index_EC.reshape(-1),  # [E*C], expert-major
                expert_index_A=torch.arange(n_experts, device=x_TD.device).repeat_interleave(slots),
                gate_A=gate_EC.reshape(-1),
                priority_A=None,
                aux_loss=router_losses.weighted_sum(losses, {"z_loss": self.z_loss_coef}, like=gate_EC),
                losses=losses,
                tokens_per_expert_E=torch.full((n_experts,), slots, dtype=torch.long, device=x_TD.device),
            )


_MASK32 = 0xFFFFFFFF
_HASH_MULT = 0x45D9F3B  # odd, so multiplication is a bijection mod 2^32 (Mueller's int hash)


def _mix32(v):
    """A 32-bit integer mixer, the same on Python ints and int64 tensors; values stay below
    2^32 * 2^27, so int64 never overflows and every device agrees bit for bit."""
    v = (((v >> 16) ^ v) * _HASH_MULT) & _MASK32
    v = (((v >> 16) ^ v) * _HASH_MULT) & _MASK32
    return (v >> 16) ^ v


def hash_expert_index(token_ids_T: torch.Tensor, *, seed: int, n_experts: int) -> torch.Tensor:
    """expert = mix32(token_id XOR mix32(seed)) mod E. mix32 is a bijection on 32-bit ids, so
    a vocabulary spreads evenly over the experts, and each seed gives another mapping. [T] long"""
    return _mix32((token_ids_T.long() & _MASK32) ^ _mix32(seed & _MASK32)) % n_experts


class HashRouting(nn.Module):
    """Hash layers (Roller et al. 2021): a fixed hash of the token id picks one expert, gate 1.
    No parameters, no loss; balance comes from the hash spreading the vocabulary evenly."""

    def __init__(self, *, n_experts: int, seed: int) -> None:
        super().__init__()
        self.n_experts, self.seed = n_experts, seed

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        if token_ids_T is None:
            raise ValueError("router type 'hash' needs token_ids_T: the expert is a hash of the token id")
        if token_ids_T.shape != x_TD.shape[:1]:
            raise ValueError(
                f"hash router: token_ids_T has shape {tuple(token_ids_T.shape)}, x_TD has {x_TD.shape[0]} tokens"
            )
        token_ids_T = token_ids_T.to(x_TD.device)
        expert_index_T1 = hash_expert_index(token_ids_T, seed=self.seed, n_experts=self.n_experts)[:, None]
        ones_T1 = torch.ones(expert_index_T1.shape, dtype=_compute_dtype(x_TD), device=x_TD.device)
        return _token_choice_output(expert_index_T1, ones_T1, ones_T1, self.n_experts, {}, {})


def group_limited_mask(choice_TE: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """DeepSeek-V3 node-limited routing: score each group of S = E/G experts by the sum of its
    2 best choice scores (its best alone when S == 1), keep the topk_groups best groups.
    Returns keep_TE, True for experts in a kept group."""
    n_tokens, n_experts = choice_TE.shape
    grouped_TGS = choice_TE.view(n_tokens, n_groups, n_experts // n_groups)
    group_score_TG = grouped_TGS.topk(min(2, grouped_TGS.shape[-1]), dim=-1).values.sum(dim=-1)
    kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    kept_TG.scatter_(1, group_score_TG.topk(topk_groups, dim=-1).indices, True)
    return kept_TG[:, :, None].expand_as(grouped_TGS).reshape(n_tokens, n_experts)


class SigmoidBiasRouting(nn.Module):
    """DeepSeek-V3 auxiliary-loss-free routing: experts are chosen by sigmoid(logits) + bias,
    gated by the unbiased sigmoid scores. The bias is not trained by gradients; after each
    optimizer step `update_router_biases` moves it against the loads seen, so balance costs no
    interference gradient in the task loss."""

    def __init__(self, *, d_model: int, n_experts: int, k: int, n_groups: int, topk_groups: int,
                 bias_update_rate: float, normalize: bool, scaling_factor: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.k, self.n_groups, self.topk_groups = k, n_groups, topk_groups
        self.bias_update_rate, self.normalize, self.scaling_factor = bias_update_rate, normalize, scaling_factor
        self.register_buffer("expert_bias_E", torch.zeros(n_experts, dtype=torch.float32))
        # Assignments per expert since the last bias update; runtime state, not checkpointed.
        self.register_buffer("load_since_update_E", torch.zeros(n_experts, dtype=torch.long), persistent=False)

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            logits_TE = router_logits(self.gate, x_TD)
            scores_TE = torch.sigmoid(logits_TE)
            choice_TE = scores_TE.detach() + self.expert_bias_E.to(scores_TE.dtype)
            if self.n_groups > 1:
                keep_TE = group_limited_mask(choice_TE, self.n_groups, self.topk_groups)
                choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
            expert_index_TK = choice_TE.topk(self.k, dim=-1).indices  # best biased score first
            score_TK = scores_TE.gather(1, expert_index_TK)
            gate_TK = score_TK / (score_TK.sum(dim=-1, keepdim=True) + 1e-20) if self.normalize else score_TK
            gate_TK = gate_TK * self.scaling_factor
            if self.training:
                n_experts = logits_TE.shape[-1]
                self.load_since_update_E += router_losses.expert_counts(expert_index_TK.reshape(-1), n_experts)
            return _token_choice_output(expert_index_TK, gate_TK, score_TK, logits_TE.shape[-1], {}, {})

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias_i += rate * sign(mean_load - load_i), then forget the loads."""
        load_E = self.load_since_update_E.to(torch.float32)
        step_E = self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.expert_bias_E += step_E.to(self.expert_bias_E.dtype)
        self.load_since_update_E.zero_()


def update_router_biases(model: nn.Module, *, process_group: dist.ProcessGroup | None = None) -> None:
    """Call after each optimizer step: nudge every sigmoid_bias router's selection bias towards
    balance using the loads seen since the last call. With data parallelism pass the group the
    router is replicated over: the loads are summed over it first, so every replica makes the
    same update and the biases stay identical."""
    for module in model.modules():
        if isinstance(module, SigmoidBiasRouting):
            if process_group is not None:
                dist.all_reduce(module.load_since_update_E, group=process_group)
            module.update_bias()


def build_router(plan: RouterPlan, *, d_model: int, n_experts: int, capacity: CapacityPlan | None) -> nn.Module:
    """The router module for one MoE layer. `capacity` matters only to expert choice."""
    k = plan.experts_per_token
    if not 1 <= k <= n_experts:
        raise ValueError(f"router.k ({k}) must be between 1 and experts.count ({n_experts})")
    if isinstance(plan, TopKRouter):
        return TopKRouting(d_model=d_model, n_experts=n_experts, k=plan.k, normalize=plan.normalize, bias=plan.bias,
                           aux_loss_coef=plan.aux_loss_coef, z_loss_coef=plan.z_loss_coef, selection_bias=plan.selection_bias)
    if isinstance(plan, NoisyTopKRouter):
        return NoisyTopKRouting(d_model=d_model, n_experts=n_experts, k=plan.k, bias=plan.bias,
                                noise_epsilon=plan.noise_epsilon, importance_coef=plan.importance_coef,
                                load_coef=plan.load_coef, z_loss_coef=plan.z_loss_coef)
    if isinstance(plan, SwitchRouter):
        return SwitchRouting(d_model=d_model, n_experts=n_experts, bias=plan.bias, jitter_eps=plan.jitter_eps,
                             aux_loss_coef=plan.aux_loss_coef, z_loss_coef=plan.z_loss_coef)
    if isinstance(plan, BaseRouter):
        return BaseRouting(d_model=d_model, n_experts=n_experts, auction_eps=plan.auction_eps)
    if isinstance(plan, SinkhornRouter):
        return SinkhornRouting(d_model=d_model, n_experts=n_experts, bias=plan.bias, iterations=plan.iterations,
                               z_loss_coef=plan.z_loss_coef)
    if isinstance(plan, ExpertChoiceRouter):
        if capacity is None or capacity.dropless or capacity.factor is None:
            raise ValueError(f"router type 'expert_choice' needs a capacity factor (each expert takes "
                             f"C = T * factor / E tokens); got capacity {capacity}")
        return ExpertChoiceRouting(d_model=d_model, n_experts=n_experts, bias=plan.bias,
                                   z_loss_coef=plan.z_loss_coef, capacity=capacity)
    if isinstance(plan, HashRouter):
        return HashRouting(n_experts=n_experts, seed=plan.seed)
    if isinstance(plan, SigmoidBiasRouter):
        if plan.n_groups < 1 or n_experts % plan.n_groups != 0:
            raise ValueError(f"router.n_groups ({plan.n_groups}) must divide experts.count ({n_experts})")
        if not 1 <= plan.topk_groups <= plan.n_groups:
            raise ValueError(
                f"router.topk_groups ({plan.topk_groups}) must be between 1 and router.n_groups ({plan.n_groups})"
            )
        reachable = plan.topk_groups * (n_experts // plan.n_groups)
        if plan.k > reachable:
            raise ValueError(f"router.k ({plan.k}) exceeds the experts in the kept groups "
                             f"(router.topk_groups * experts.count / router.n_groups = {reachable})")
        return SigmoidBiasRouting(d_model=d_model, n_experts=n_experts, k=plan.k, n_groups=plan.n_groups,
                                  topk_groups=plan.topk_groups, bias_update_rate=plan.bias_update_rate,
                                  normalize=plan.normalize, scaling_factor=plan.scaling_factor)
    if isinstance(plan, SparseMixerRouter):
        from moespec.model.sparsemixer import SparseMixerRouting

        return SparseMixerRouting(d_model=d_model, n_experts=n_experts, k=plan.k, bias=plan.bias, jitter_eps=plan.jitter_eps,
                                  aux_loss_coef=plan.aux_loss_coef, z_loss_coef=plan.z_loss_coef)  # fmt: skip
    raise TypeError(f"unknown router plan {type(plan).__name__}")
