"""Pieces every router shares: float32 router math under autocast, logits, and the flat
token-choice output (see routers.py for the conventions)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from moespec.model import router_losses
from moespec.model.types import RouterOutput

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that switches autocast off for the router math on x's device. Devices without
    autocast (meta, used for shape and FLOP counting) need nothing switched off."""
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def router_logits(linear: nn.Linear, x_TD: torch.Tensor) -> torch.Tensor:
    """x @ W (+ b) in float32 (float64 kept), whatever the parameter dtype. [T, E]"""
    dtype = _compute_dtype(x_TD)
    bias = None if linear.bias is None else linear.bias.to(dtype)
    return F.linear(x_TD.to(dtype), linear.weight.to(dtype), bias)


def _token_choice_output(
    expert_index_TK: torch.Tensor,
    gate_TK: torch.Tensor,
    priority_TK: torch.Tensor,
    n_experts: int,
    losses: dict[str, torch.Tensor],
    coefs: dict[str, float],
) -> RouterOutput:
    """Flatten [T, K] choices token-major into a RouterOutput."""
    n_tokens, k = expert_index_TK.shape
    expert_index_A = expert_index_TK.reshape(-1)  # [T*K]
    return RouterOutput(
        token_index_A=torch.arange(n_tokens, device=gate_TK.device).repeat_interleave(k),
        expert_index_A=expert_index_A,
        gate_A=gate_TK.reshape(-1),
        priority_A=priority_TK.detach().reshape(-1),
        aux_loss=router_losses.weighted_sum(losses, coefs, like=gate_TK),
        losses=losses,
        tokens_per_expert_E=router_losses.expert_counts(expert_index_A, n_experts),
    )


def _softmax_top_k(
    logits_TE: torch.Tensor, k: int, normalize: bool, aux_loss_coef: float, z_loss_coef: float,
    selection_bias_E: torch.Tensor | None = None,
) -> RouterOutput:  # fmt: skip
    """Top-k of softmax(logits) with the Switch load balancing loss and the z-loss (topk,
    switch); with `selection_bias_E` (ERNIE-4.5) the k are chosen by probs + bias and weighed
    by the probs alone."""
    probs_TE = logits_TE.softmax(dim=-1)
    if selection_bias_E is None:
        top_probs_TK, expert_index_TK = probs_TE.topk(k, dim=-1)  # sorted, best first
    else:
        expert_index_TK = (probs_TE.detach() + selection_bias_E).topk(k, dim=-1).indices
        top_probs_TK = probs_TE.gather(1, expert_index_TK)
    gate_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True) if normalize else top_probs_TK
    losses = {
        "load_balancing": router_losses.load_balancing_loss(probs_TE, expert_index_TK.reshape(-1)),
        "z_loss": router_losses.z_loss(logits_TE),
    }
    coefs = {"load_balancing": aux_loss_coef, "z_loss": z_loss_coef}
    return _token_choice_output(expert_index_TK, gate_TK, top_probs_TK, logits_TE.shape[-1], losses, coefs)


# --- one module per router type -----------------------------------------------------------


