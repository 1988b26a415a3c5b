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
  (`grouped_experts.GroupedExpertsFn`) that also does the gather from x and the gated combine
  into y: all groups at once (one gather, one grouped product per projection, one scatter),
  or on a multi-core CPU each group's whole pipeline on one thread, its rows in cache from
  the gather to the down projection. With gate None and a permutation as token_A it is
  gather, experts, scatter: what an expert-parallel rank runs on the rows it received.
- `reference_forward(...)`: the slow, obvious per-expert loop on the plain formula; the oracle.

How the dropless matmuls run (`_grouped_mm`, one bmm, threads or a loop) is
`group_matmuls.py`'s business.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moespec.model import group_matmuls
from moespec.model.grouped_experts import GroupedExpertsFn
from moespec.model.layers import GATED_ACTIVATIONS, DenseFFN, activation_fn, gated_activation


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gates multiply in float32 at least (float64 stays float64, so gradcheck sees the math)."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on (bf16 training), else x's."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class ExpertBank(nn.Module):
    """E expert FFNs as stacked weights, no biases (as in Mixtral, Qwen-MoE, DeepSeek).

    Gated activations (swiglu, geglu): `down(act(x @ w_gate) * (x @ w_up))`, 3*D*F per expert;
    plain (relu, gelu): `down(act(x @ w_up))`, 2*D*F per expert. Weights are stored [E, D, F]
    and [E, F, D] (input dim first) so that the batched and grouped matmuls need no transposes.
    Init: normal(0, init_std) for every weight; `down_init_std` lets the model builder scale
    the residual-facing projection (GPT-2 style 1/sqrt(2 * n_layers)), which this module cannot
    know. Default: the same std, unscaled.

    Each expert draws its weights from its own generator, seeded `init_seed + global index`, so a
    rank can build just its experts [first_expert, first_expert + n_experts) of an expert-parallel
    layer with exactly the values the whole bank would hold, never allocating the others.
    `init_seed` defaults to one draw of torch's global generator: the bank takes one number from
    the model builder's seeded stream whatever its size.
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
        bias: bool = False,
        first_expert: int = 0,
        init_seed: int | None = None,
    ):
        super().__init__()
        activation_fn(activation)  # reject an unknown name here, not at the first forward
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        self.bias = bias
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff)) if self.gated else None  # [E, D, F]
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # [E, D, F]
        self.w_down = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # [E, F, D]
        # gpt-oss's per-expert biases, zero at init: [E, F], [E, F], [E, D]
        self.b_gate = nn.Parameter(torch.zeros(n_experts, d_ff)) if bias and self.gated else None
        self.b_up = nn.Parameter(torch.zeros(n_experts, d_ff)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        self.init_std = init_std
        self.down_init_std = init_std if down_init_std is None else down_init_std
        self.first_expert = first_expert  # global index of local expert 0 (non-zero under EP)
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu")) if init_seed is None else init_seed
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.w_up.device.type == "meta":
            return
        for i in range(self.n_experts):
            generator = torch.Generator().manual_seed(self.init_seed + self.first_expert + i)
            for w, std in ((self.w_gate, self.init_std), (self.w_up, self.init_std), (self.w_down, self.down_init_std)):
                if w is not None:
                    w[i].copy_(torch.empty(w.shape[1:], device="cpu").normal_(0.0, std, generator=generator))  # cpu: the generator's device, whatever the default device

    def _weights(self, dtype: torch.dtype):
        """(w_gate, w_up, w_down) in the compute dtype (a no-op cast in float32 training)."""
        gate = None if self.w_gate is None else self.w_gate.to(dtype)
        return gate, self.w_up.to(dtype), self.w_down.to(dtype)

    def _biases(self, dtype: torch.dtype):
        """(b_gate, b_up, b_down) in the compute dtype, or Nones."""
        return tuple(None if b is None else b.to(dtype) for b in (self.b_gate, self.b_up, self.b_down))

    def forward_capacity(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Capacity mode: every expert runs on its full [C, D] buffer, padding included."""
        dtype = compute_dtype(x_ECD)
        w_gate, w_up, w_down = self._weights(dtype)
        b_gate, b_up, b_down = self._biases(dtype)
        x_ECD = x_ECD.to(dtype)
        act = activation_fn(self.activation)
        h_ECF = torch.bmm(x_ECD, w_up) if b_up is None else torch.baddbmm(b_up[:, None, :], x_ECD, w_up)
        if self.gated:
            g_ECF = torch.bmm(x_ECD, w_gate) if b_gate is None else torch.baddbmm(b_gate[:, None, :], x_ECD, w_gate)
            h_ECF = gated_activation(self.activation, g_ECF, h_ECF)
        else:
            h_ECF = act(h_ECF)
        return torch.bmm(h_ECF, w_down) if b_down is None else torch.baddbmm(b_down[:, None, :], h_ECF, w_down)  # [E, C, D]

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
                x_TD.contiguous(), token_A, gate_A, w_gate, w_up, w_down, counts_E, self.activation, group_matmuls.engine(counts_E, w_up),
                *self._biases(compute_dtype(x_TD)),
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
        h_NF = x_ND @ self.w_up[e] + (0 if self.b_up is None else self.b_up[e])
        if self.gated:
            h_NF = gated_activation(self.activation, x_ND @ self.w_gate[e] + (0 if self.b_gate is None else self.b_gate[e]), h_NF)
        else:
            h_NF = act(h_NF)
        return h_NF @ self.w_down[e] + (0 if self.b_down is None else self.b_down[e])

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
