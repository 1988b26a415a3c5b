"""The expert bank (E routed FFNs stored as stacked weights) and the shared experts.

Shape legend: T tokens, D d_model, F expert d_ff, E experts, C capacity slots per expert,
A assignments (rows after dispatch), N rows of one expert's group.

Three ways to run the same weights, tested against each other (tests/test_moe_layer.py):
- `forward_capacity(x_ECD)`: the fixed buffer of capacity mode, one batched matmul per
  projection. Padding rows are computed too, so FLOPs are exactly E*C rows, which is what the
  simulator counts (REFERENCE.md sec. 2 and 4).
- `forward_dropless(x_TD, token_A, gate_A, counts_E)`: dropless. The assignments arrive
  sorted by expert (token_A, gate_A in that order, counts_E rows per expert); one matmul per
  non-empty group, so FLOPs are exactly sum_e n_e rows. It is one custom autograd.Function
  (`GroupedExpertsFn`) that also does the gather from x and the gated combine into y, group
  by group: a group's rows ([N, D], a few hundred KiB) stay in cache between the gather, the
  matmuls and the scatter-add, instead of an [A, D] copy of x and an [A, D] expert output
  going through memory several times (A = T*K rows, K times the size of x). The gate is
  folded into the hidden activation ([A, F], not [A, D]) before the down projection, which
  is the same product by linearity. Weight gradients are written straight into [E, D, F]
  buffers. With gate None and a permutation as token_A it is gather, experts, scatter: what
  an expert-parallel rank runs on the rows it received.
- `reference_forward(...)`: the slow, obvious per-expert loop on the plain formula; the oracle.

Why not `torch._grouped_mm`: in torch 2.13 it runs on CPU, but FlopCounterMode counts it as
zero FLOPs, it rejects float64 (no gradcheck) and its meta kernel demands bf16, so neither
the FLOP convention nor the tests could see it. The per-group loop costs ~15 ms of op
dispatch per training step at E = 64 (measured with D = F = 16), small next to the matmuls at
the shapes in bench/moe_layer.py. Numbers and what is left on the table: bench/moe_layer.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moespec.model.layers import GATED_ACTIVATIONS, DenseFFN, activation_fn


def _relu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(grad, pre, 0)


def _silu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward(grad, pre)


def _gelu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, pre, approximate="none")


# The derivative of each nonlinearity of layers.activation_fn, for the hand-written backward.
_ACTIVATION_BACKWARD = {"relu": _relu_backward, "gelu": _gelu_backward, "geglu": _gelu_backward, "swiglu": _silu_backward}


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gates multiply in float32 at least (float64 stays float64, so gradcheck sees the math)."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on (bf16 training), else x's."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _groups(counts_E: list[int]):
    """(expert, row slice) for each non-empty group of rows sorted by expert."""
    start = 0
    for e, n in enumerate(counts_E):
        if n:
            yield e, slice(start, start + n)
        start += n


def _scale_rows(h_AF: torch.Tensor, gate_A: torch.Tensor) -> torch.Tensor:
    """h * gate per row, in place; the product is taken in the gate's dtype (at least
    float32: a bf16 h is upcast for it)."""
    if h_AF.dtype == gate_A.dtype:
        return h_AF.mul_(gate_A[:, None])
    return h_AF.copy_(h_AF.to(gate_A.dtype) * gate_A[:, None])


class GroupedExpertsFn(torch.autograd.Function):
    """Dropless experts with gather and combine: y[token[a]] += gate[a] * expert_e(x[token[a]])
    for the assignments a of each expert e, given sorted by expert, counts_E[e] of them.

    Matmuls run per group into slices of preallocated outputs (`out=`); the elementwise work
    (activation, gating and their derivatives) runs once over all A rows, so a step is
    9 matmuls per expert plus a constant number of ops: on a busy CPU every op is a parallel
    region, and a barrier costs more than a small op does. Forward saves the pre-activations
    (h_gate, h_up) and recomputes act(h_gate) in the backward. The backward runs exactly the
    matmuls autograd would run for the textbook formula (two per projection, one when x needs
    no gradient), so FlopCounterMode reports 18 * N * D * F per gated group, 12 ungated.
    """

    @staticmethod
    def forward(ctx, x_TD, token_A, gate_A, w_gate_EDF, w_up_EDF, w_down_EFD, counts_E, activation):
        act = activation_fn(activation)
        gated = w_gate_EDF is not None
        dtype = w_up_EDF.dtype  # the compute dtype; the weights arrive already cast
        n_rows, d_ff = token_A.shape[0], w_up_EDF.shape[2]
        h_up_AF = x_TD.new_empty(n_rows, d_ff, dtype=dtype)  # every row is in a group: all written
        h_gate_AF = torch.empty_like(h_up_AF) if gated else None
        for e, rows in _groups(counts_E):
            x_ND = x_TD.index_select(0, token_A[rows]).to(dtype)
            torch.mm(x_ND, w_up_EDF[e], out=h_up_AF[rows])
            if gated:
                torch.mm(x_ND, w_gate_EDF[e], out=h_gate_AF[rows])
        a_AF = act(h_gate_AF).mul_(h_up_AF) if gated else act(h_up_AF)
        if gate_A is not None:
            a_AF = _scale_rows(a_AF, gate_A)
        y_TD = torch.zeros_like(x_TD)
        for e, rows in _groups(counts_E):
            y_TD.index_add_(0, token_A[rows], (a_AF[rows] @ w_down_EFD[e]).to(y_TD.dtype))
        ctx.save_for_backward(x_TD, token_A, gate_A, w_gate_EDF, w_up_EDF, w_down_EFD, h_gate_AF, h_up_AF)
        ctx.counts_E = counts_E
        ctx.activation = activation
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_TD):
        x_TD, token_A, gate_A, w_gate_EDF, w_up_EDF, w_down_EFD, h_gate_AF, h_up_AF = ctx.saved_tensors
        counts_E = ctx.counts_E
        act = activation_fn(ctx.activation)
        act_backward = _ACTIVATION_BACKWARD[ctx.activation]
        gated = w_gate_EDF is not None
        need_x, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dtype = w_up_EDF.dtype
        grad_y_TD = grad_y_TD.contiguous()

        # d(loss)/d(gate * a), group by group: [A, F]
        grad_ga_AF = torch.empty_like(h_up_AF)
        grad_y_groups = {}  # the gathered [N, D] rows, reused for the w_down gradient below
        for e, rows in _groups(counts_E):
            grad_y_groups[e] = grad_y_ND = grad_y_TD.index_select(0, token_A[rows]).to(dtype)
            torch.mm(grad_y_ND, w_down_EFD[e].t(), out=grad_ga_AF[rows])
        # Elementwise over all rows, in place where a buffer is dead, to spare [A, F] temporaries.
        act_gate_AF = act(h_gate_AF) if gated else None
        a_AF = act_gate_AF * h_up_AF if gated else act(h_up_AF)
        grad_gate_A = None
        if gate_A is not None:
            if need_gate:  # vecdot: one fused pass, no [A, F] product
                grad_gate_A = torch.linalg.vecdot(grad_ga_AF.to(gate_A.dtype), a_AF.to(gate_A.dtype), dim=1)
            a_AF = _scale_rows(a_AF, gate_A)  # what the down projection saw
            grad_a_AF = _scale_rows(grad_ga_AF, gate_A)
        else:
            grad_a_AF = grad_ga_AF
        if gated:
            grad_up_AF = act_gate_AF.mul_(grad_a_AF)  # act_gate is dead after this
            grad_gate_AF = act_backward(grad_a_AF.mul_(h_up_AF), h_gate_AF)
        else:
            grad_up_AF = act_backward(grad_a_AF, h_up_AF)
        del grad_ga_AF, grad_a_AF, act_gate_AF

        # An expert that got no rows has a zero gradient, so start from zeros where one is empty.
        new_grad = torch.zeros_like if 0 in counts_E else torch.empty_like
        grad_up_EDF, grad_down_EFD = new_grad(w_up_EDF), new_grad(w_down_EFD)
        grad_gate_EDF = new_grad(w_gate_EDF) if gated else None
        grad_x_TD = torch.zeros_like(x_TD) if need_x else None
        for e, rows in _groups(counts_E):
            tokens_N = token_A[rows]
            x_ND = x_TD.index_select(0, tokens_N).to(dtype)
            torch.mm(a_AF[rows].t(), grad_y_groups.pop(e), out=grad_down_EFD[e])
            torch.mm(x_ND.t(), grad_up_AF[rows], out=grad_up_EDF[e])
            if gated:
                torch.mm(x_ND.t(), grad_gate_AF[rows], out=grad_gate_EDF[e])
            if need_x:
                grad_x_ND = grad_up_AF[rows] @ w_up_EDF[e].t()
                if gated:  # addmm with out=, not addmm_: FlopCounterMode counts only the former
                    torch.addmm(grad_x_ND, grad_gate_AF[rows], w_gate_EDF[e].t(), out=grad_x_ND)
                grad_x_TD.index_add_(0, tokens_N, grad_x_ND.to(grad_x_TD.dtype))
        return grad_x_TD, None, grad_gate_A, grad_gate_EDF, grad_up_EDF, grad_down_EFD, None, None


class ExpertBank(nn.Module):
    """E expert FFNs as stacked weights, no biases (as in Mixtral, Qwen-MoE, DeepSeek).

    Gated activations (swiglu, geglu): `down(act(x @ w_gate) * (x @ w_up))`, 3*D*F per expert;
    plain (relu, gelu): `down(act(x @ w_up))`, 2*D*F per expert. Weights are stored [E, D, F]
    and [E, F, D] (input dim first) so that the batched and grouped matmuls need no transposes.
    Init: normal(0, init_std) for every weight; `down_init_std` lets the model builder scale
    the residual-facing projection (GPT-2 style 1/sqrt(2 * n_layers)), which this module cannot
    know. Default: the same std, unscaled.
    """

    def __init__(
        self,
        *,
        n_experts: int,
        d_model: int,
        d_ff: int,
        activation: str,
        init_std: float = 0.02,
        down_init_std: float | None = None,
    ):
        super().__init__()
        activation_fn(activation)  # reject an unknown name here, not at the first forward
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff)) if self.gated else None  # [E, D, F]
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # [E, D, F]
        self.w_down = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # [E, F, D]
        self.init_std = init_std
        self.down_init_std = init_std if down_init_std is None else down_init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_gate, self.w_up):
            if w is not None:
                nn.init.normal_(w, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.down_init_std)

    def _weights(self, dtype: torch.dtype):
        """(w_gate, w_up, w_down) in the compute dtype (a no-op cast in float32 training)."""
        gate = None if self.w_gate is None else self.w_gate.to(dtype)
        return gate, self.w_up.to(dtype), self.w_down.to(dtype)

    def forward_capacity(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Capacity mode: every expert runs on its full [C, D] buffer, padding included."""
        dtype = compute_dtype(x_ECD)
        w_gate, w_up, w_down = self._weights(dtype)
        x_ECD = x_ECD.to(dtype)
        act = activation_fn(self.activation)
        h_ECF = torch.bmm(x_ECD, w_up)
        h_ECF = act(torch.bmm(x_ECD, w_gate)) * h_ECF if self.gated else act(h_ECF)
        return torch.bmm(h_ECF, w_down)  # [E, C, D]

    def forward_dropless(
        self, x_TD: torch.Tensor, token_A: torch.Tensor, gate_A: torch.Tensor | None, counts_E: list[int]
    ) -> torch.Tensor:
        """Dropless: y[t] = sum over assignments a with token_A[a] = t of gate_A[a] * expert(x[t]),
        the assignments sorted by expert, counts_E[e] each. counts_E are host ints: the group
        sizes are data and the loop needs them (the dropless all-to-all needs them on the
        host too). gate_A None means weight 1. Returns [T, D] in x's dtype."""
        return self._grouped(x_TD, token_A, gate_A, counts_E)

    def _grouped(
        self, x_TD: torch.Tensor, token_A: torch.Tensor, gate_A: torch.Tensor | None, counts_E: list[int]
    ) -> torch.Tensor:
        """What `forward_dropless` and `forward_grouped` share. They are the bank's entry points
        (FSDP2 all-gathers the bank around each, `register_fsdp_forward_method`), so neither
        calls the other: a nested entry would run FSDP2's forward hooks twice."""
        if len(counts_E) != self.n_experts or sum(counts_E) != token_A.shape[0]:
            raise ValueError(
                f"group sizes {counts_E} must be {self.n_experts} counts summing to the {token_A.shape[0]} assignments"
            )
        w_gate, w_up, w_down = self._weights(compute_dtype(x_TD))
        gate_A = None if gate_A is None else gate_A.to(gate_dtype(gate_A.dtype))
        # dtypes are explicit inside; meta has no autocast state, and nothing to disable there
        no_autocast = contextlib.nullcontext() if x_TD.device.type == "meta" else torch.autocast(x_TD.device.type, enabled=False)
        with no_autocast:
            return GroupedExpertsFn.apply(
                x_TD.contiguous(), token_A, gate_A, w_gate, w_up, w_down, counts_E, self.activation
            )

    def forward_grouped(self, x_AD: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Rows already sorted by expert, counts_E[e] each, no gates: out[a] = expert(x[a]).
        (An expert-parallel rank can instead pass its regrouping permutation as token_A to
        `forward_dropless` and get the outputs back in arrival order without two copies.)"""
        rows_A = torch.arange(x_AD.shape[0], device=x_AD.device)
        return self._grouped(x_AD, rows_A, None, counts_E)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert on its rows, the textbook formula: the oracle's building block."""
        act = activation_fn(self.activation)
        h_NF = x_ND @ self.w_up[e]
        h_NF = act(x_ND @ self.w_gate[e]) * h_NF if self.gated else act(h_NF)
        return h_NF @ self.w_down[e]

    def reference_forward(
        self, x_TD: torch.Tensor, token_index_A: torch.Tensor, expert_index_A: torch.Tensor, gate_A: torch.Tensor
    ) -> torch.Tensor:
        """Slow oracle: y[t] = sum over the given assignments (t, e, g) of g * expert_e(x[t]),
        one expert at a time, gates in float32 (at least). Callers pass only the kept assignments."""
        dtype = gate_dtype(x_TD.dtype)
        y_TD = torch.zeros_like(x_TD, dtype=dtype)
        for e in range(self.n_experts):
            mine = (expert_index_A == e).nonzero().flatten()
            tokens = token_index_A[mine]
            out_ND = self.expert_forward(e, x_TD[tokens]).to(dtype)
            y_TD = y_TD.index_add(0, tokens, out_ND * gate_A[mine].to(dtype)[:, None])
        return y_TD.to(x_TD.dtype)


class SharedExperts(nn.Module):
    """Experts every token passes through (DeepSeek-MoE, Qwen-MoE), run as one dense FFN of
    width shared_count * shared_d_ff: the same parameters and FLOPs as shared_count separate
    experts whose outputs are summed, in one matmul instead of several. Qwen adds a sigmoid
    gate `Linear(D, 1, bias=False)` that scales the shared output per token."""

    def __init__(self, *, ffn: DenseFFN, gate: nn.Linear | None):
        super().__init__()
        self.ffn = ffn
        self.gate = gate

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.ffn(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD  # [T, 1] * [T, D]
        return y_TD


def build_shared_experts(
    *, d_model: int, count: int, d_ff: int, activation: str, gated_output: bool
) -> SharedExperts | None:
    """None when the layer has no shared experts."""
    if count == 0:
        return None
    ffn = DenseFFN(d_model=d_model, d_ff=count * d_ff, activation=activation)
    gate = nn.Linear(d_model, 1, bias=False) if gated_output else None
    return SharedExperts(ffn=ffn, gate=gate)
