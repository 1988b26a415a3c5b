"""Auxiliary router losses as plain functions, one formula each (REFERENCE.md sec. 1).

They are split from `routers.py` so that each formula can be read next to its source and
tested alone. Every function takes float32 (or float64) tensors and returns a 0-dim tensor of
the same dtype; none of them holds state.

Shape legend: T tokens in the routing group, E experts, K experts per token, A assignments.
"""

from __future__ import annotations

import torch

# Keeps CV^2 finite when every load is 0; the value of tensor2tensor's `cv_squared`.
CV_EPS = 1e-10


def expert_counts(expert_index_A: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, [E] long. scatter_add rather than bincount: the output shape
    does not depend on the data, so it also runs on the meta device and under torch.compile."""
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=expert_index_A.device)
    return counts_E.scatter_add_(0, expert_index_A, torch.ones_like(expert_index_A))


def load_balancing_loss(probs_TE: torch.Tensor, expert_index_A: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load balancing loss `E * sum_i f_i * P_i` (Fedus 2021, eq. 4).

    f_i is the fraction of the A = T*K assignments sent to expert i (counted before capacity
    dropping, so the loss sees the router's intent), P_i the mean router probability of
    expert i. f is piecewise constant, so the gradient flows through P only. Equals 1 at
    perfect balance and E when every token goes to one expert with probability 1.
    """
    n_experts = probs_TE.shape[-1]
    counts_E = expert_counts(expert_index_A, n_experts).to(probs_TE.dtype)
    fraction_E = counts_E / max(expert_index_A.numel(), 1)
    mean_prob_E = probs_TE.mean(dim=0)
    return n_experts * (fraction_E * mean_prob_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss `mean_t logsumexp_j(logits[t, j])^2` (Zoph 2022, eq. 5): keeps
    logits small so that the float32 softmax stays well conditioned."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(values_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean^2 (Shazeer 2017, eq. 7).

    Population variance (unbiased=False), as tensor2tensor's `tf.nn.moments` computes it, so
    that a single expert gives 0 rather than NaN and the value does not depend on E through a
    Bessel factor.
    """
    mean = values_E.mean()
    return values_E.var(unbiased=False) / (mean.square() + CV_EPS)


def smooth_load(
    clean_TE: torch.Tensor,
    noisy_TE: torch.Tensor,
    noise_std_TE: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Differentiable load estimate of noisy top-k gating (Shazeer 2017, appendix A).

    P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i): the probability that
    expert i stays in the top k if its own noise were drawn again while the other experts'
    noisy logits stay fixed. `kth_excluding` is the k-th largest noisy logit among the others;
    for an expert now inside the top k that is the (k+1)-th largest overall, for one outside
    it is the k-th largest. Returns load_E = sum_t P(x_t, i).
    """
    n_tokens, n_experts = clean_TE.shape
    if k >= n_experts:
        # Every expert is always chosen: the load is exactly T for each, with no gradient.
        return clean_TE.new_full((n_experts,), float(n_tokens))
    top_TK1 = noisy_TE.topk(k + 1, dim=-1).values  # [T, K+1], descending
    threshold_if_in_T1 = top_TK1[:, k : k + 1]  # (k+1)-th largest
    threshold_if_out_T1 = top_TK1[:, k - 1 : k]  # k-th largest
    is_in_TE = noisy_TE > threshold_if_in_T1
    prob_if_in_TE = torch.special.ndtr((clean_TE - threshold_if_in_T1) / noise_std_TE)
    prob_if_out_TE = torch.special.ndtr((clean_TE - threshold_if_out_T1) / noise_std_TE)
    return torch.where(is_in_TE, prob_if_in_TE, prob_if_out_TE).sum(dim=0)


def weighted_sum(losses: dict[str, torch.Tensor], coefs: dict[str, float], like: torch.Tensor) -> torch.Tensor:
    """aux_loss = sum of coefficient * loss. A zero coefficient skips its term entirely, so a
    reported-only loss adds no graph and a non-finite value cannot turn 0 * inf into NaN."""
    total = torch.zeros((), dtype=like.dtype, device=like.device)
    for name, coef in coefs.items():
        if coef != 0.0:
            total = total + coef * losses[name]
    return total
