"""SparseMixer-v2 (Liu et al. 2024, GRIN; Phi-3.5-MoE's router): experts chosen one at a time,
each from a softmax restricted to the experts whose logit is close to the best remaining one.

Why its own router: Phi-3.5-MoE's gates are not top-k of a softmax. For the j-th choice, the
logits already chosen are set to -inf and the best remaining logit m found; experts with
(m - s_e) / max(|s_e|, m) > 2 * jitter_eps are masked out, and the gate is the softmax of the
rest at the chosen expert. At eval the choice is the argmax; in training it is sampled from
that softmax (Gumbel-max), and the gate's gradient reaches the logits through Heun's
third-order estimate (the value is scaled by 1 when the sample is the argmax or with
probability 1/4, by 1/3 otherwise; the backward is grad * gate * (onehot - softmax)), as
transformers' PhimoeMultiplier computes it. The load-balancing and z losses are the Switch
ones on softmax(logits). Shape legend: T tokens, D d_model, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from moespec.model import router_losses
from moespec.model.router_common import _full_precision, _token_choice_output, router_logits
from moespec.model.types import RouterOutput


class _HeunMultiplier(torch.autograd.Function):
    """value: gate * scale; gradient to the logits only: g * gate * (onehot(choice) - softmax)."""

    @staticmethod
    def forward(ctx, logits_TE, gate_T1, choice_T1, probs_TE, scale_T1):
        ctx.save_for_backward(gate_T1, choice_T1, probs_TE)
        return gate_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1):
        gate_T1, choice_T1, probs_TE = ctx.saved_tensors
        grad_T1 = grad_T1 * gate_T1
        grad_TE = probs_TE * -grad_T1
        grad_TE = grad_TE.scatter_add(1, choice_T1, grad_T1)
        return grad_TE, None, None, None, None


def sparsemixer(logits_TE: torch.Tensor, *, k: int, jitter_eps: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates [T, K], experts [T, K]), best first."""
    remaining_TE = logits_TE
    gates, choices = [], []
    for j in range(k):
        with torch.no_grad():
            best_T1, argmax_T1 = remaining_TE.max(dim=-1, keepdim=True)
            factor_TE = logits_TE.abs().clamp(min=best_T1)
            far_TE = (best_T1 - logits_TE) / factor_TE > 2 * jitter_eps
        masked_TE = remaining_TE.masked_fill(far_TE, float("-inf"))
        if training:
            gumbel_TE = -torch.empty_like(masked_TE).exponential_().log()
            choice_T1 = (masked_TE + gumbel_TE).argmax(dim=-1, keepdim=True)
        else:
            choice_T1 = argmax_T1
        probs_TE = masked_TE.softmax(dim=-1)
        gate_T1 = probs_TE.gather(1, choice_T1)
        if training:
            coin_T1 = torch.rand_like(gate_T1) if j == 0 else torch.rand_like(gate_T1).uniform_()  # transformers draws twice after the first: same stream
            heun_T1 = (choice_T1 == probs_TE.argmax(dim=-1, keepdim=True)) | (coin_T1 > 0.75)
            scale_T1 = torch.add(0.3333, heun_T1.to(gate_T1.dtype), alpha=0.6667)
            gate_T1 = _HeunMultiplier.apply(logits_TE, gate_T1, choice_T1, probs_TE, scale_T1)
        gates.append(gate_T1)
        choices.append(choice_T1)
        remaining_TE = remaining_TE.scatter(1, choice_T1, float("-inf"))  # the next choice excludes this one
    return torch.cat(gates, dim=-1), torch.cat(choices, dim=-1)


class SparseMixerRouting(nn.Module):
    def __init__(self, *, d_model: int, n_experts: int, k: int, bias: bool, jitter_eps: float, aux_loss_coef: float, z_loss_coef: float):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=bias)
        self.k, self.jitter_eps = k, jitter_eps
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            logits_TE = router_logits(self.gate, x_TD)
            gate_TK, expert_index_TK = sparsemixer(logits_TE, k=self.k, jitter_eps=self.jitter_eps, training=self.training)
            losses = {
                "load_balancing": router_losses.load_balancing_loss(logits_TE.softmax(dim=-1), expert_index_TK.reshape(-1)),
                "z_loss": router_losses.z_loss(logits_TE),
            }
            coefs = {"load_balancing": self.aux_loss_coef, "z_loss": self.z_loss_coef}
            return _token_choice_output(expert_index_TK, gate_TK, gate_TK, logits_TE.shape[-1], losses, coefs)
