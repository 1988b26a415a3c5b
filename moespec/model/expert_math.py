"""The dropless kernel's elementwise math (model/grouped_experts.py GroupedExpertsFn): each FFN
activation from its pre-activations, and its derivative written by hand, because the kernel
runs its own backward (one gather and one scatter per pass) instead of autograd's."""

from __future__ import annotations

import torch

from moespec.model.layers import SWIGLU_ALPHA, SWIGLU_LIMIT, activation_fn, gated_activation


def _relu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(grad, pre, 0)


def _silu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward(grad, pre)


def _gelu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, pre, approximate="none")


# The derivative of each nonlinearity of layers.activation_fn, for the hand-written backward.
_ACTIVATION_BACKWARD = {"relu": _relu_backward, "gelu": _gelu_backward, "geglu": _gelu_backward, "swiglu": _silu_backward}
# swiglu_clamped (gpt-oss) has its own two-input derivative in `activate_backward`.


def expert_of_rows(counts_E: list[int], device) -> torch.Tensor:
    """The expert of each sorted row [A] (int64), for per-expert biases."""
    return torch.repeat_interleave(torch.arange(len(counts_E), device=device), torch.tensor(counts_E, device=device))


def activate(activation: str, h_gate_AF: torch.Tensor | None, h_up_AF: torch.Tensor) -> torch.Tensor:
    """The FFN's hidden activation from its pre-activations (a new tensor)."""
    if h_gate_AF is None:
        return activation_fn(activation)(h_up_AF)
    if activation == "swiglu_clamped":
        return gated_activation(activation, h_gate_AF, h_up_AF)
    return activation_fn(activation)(h_gate_AF).mul_(h_up_AF)


def gate_nonlinearity(activation: str, h_gate_AF: torch.Tensor | None) -> torch.Tensor | None:
    """act(h_gate) of a gated activation (swiglu, geglu), a new tensor: the backward needs it
    twice (to rebuild a = act(h_gate) * h_up, and as d a / d h_up), so it computes it once and
    hands it to `activate_backward`. None for plain and clamped activations."""
    if h_gate_AF is None or activation == "swiglu_clamped":
        return None
    return activation_fn(activation)(h_gate_AF)


def activate_backward(activation: str, grad_a_AF: torch.Tensor, h_gate_AF: torch.Tensor | None, h_up_AF: torch.Tensor,
                      act_gate_AF: torch.Tensor | None = None):  # fmt: skip
    """(d/d h_gate, d/d h_up) of `activate` given d/d a; may overwrite grad_a_AF, and
    act_gate_AF (`gate_nonlinearity`'s result, computed here when not given)."""
    if h_gate_AF is None:
        return None, _ACTIVATION_BACKWARD[activation](grad_a_AF, h_up_AF)
    if activation == "swiglu_clamped":  # a = (clamp(u, -L, L) + 1) * g * sigmoid(alpha g), g = min(gate, L)
        g = h_gate_AF.clamp(max=SWIGLU_LIMIT)
        s = torch.sigmoid(SWIGLU_ALPHA * g)
        glu = g * s
        grad_up = (grad_a_AF * glu).masked_fill_(h_up_AF.abs() > SWIGLU_LIMIT, 0.0)
        dglu = s * (1 + SWIGLU_ALPHA * g * (1 - s))
        grad_gate = (grad_a_AF * (h_up_AF.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT) + 1) * dglu).masked_fill_(h_gate_AF > SWIGLU_LIMIT, 0.0)
        return grad_gate, grad_up
    if act_gate_AF is None:
        act_gate_AF = activation_fn(activation)(h_gate_AF)
    grad_up = act_gate_AF.mul_(grad_a_AF)  # act_gate is dead after this
    grad_gate = _ACTIVATION_BACKWARD[activation](grad_a_AF.mul_(h_up_AF), h_gate_AF)
    return grad_gate, grad_up
