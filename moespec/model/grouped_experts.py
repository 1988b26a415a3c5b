"""The dropless experts kernel: y[token[a]] += gate[a] * expert_e(x[token[a]]) for the
assignments a of each expert e, given sorted by expert, counts_E[e] of them, as one
autograd.Function with its own backward (`GroupedExpertsFn`).

Shape legend: T tokens, D d_model, F expert d_ff, E experts, A assignments (rows after
dispatch, sorted by expert), N rows of one slab (below).

The forward and the backward are each one pipeline over a *slab* of the sorted rows: gather
the slab's rows of x (of grad_y), the projections, the activation, the gate, the down
projection (and their derivatives). It runs in one of two shapes, with the same ops per row:
- **every group at once** (engines "batched", "grouped", "loop"): one slab of all A rows;
  the matmuls are one bmm, one `torch._grouped_mm`, or one mm per group into slices
  (`group_matmuls.rows_times_weights`), the elementwise work one op over [A, F]. So a layer
  is one gather and one scatter per pass whatever E is: on a busy CPU every op is a parallel
  region whose threads wait on each other, and per-expert ops made the dropless path
  collapse under load (issue 13).
- **one slab per group, spread over the threads** (engine "threads", a multi-core CPU;
  `group_threads`): each group's whole pipeline runs on one thread, its ops single-threaded,
  so no op crosses a barrier (the same robustness on a busy machine) and a group's gathered
  rows and hidden activations ([N, D], [N, F]) are used while they are in cache instead of
  [A, D] and [A, F] tensors going through memory pass after pass. Groups are cut into pieces
  where whole groups would leave a thread idle (`group_threads.pieces`). Against the kernel
  before it (one slab, only its matmuls on threads), the layer took 0.88-1.00x the time
  (bench/moe_layer.py, A/B at 8 shapes); its transient memory is one group's, not A rows'.
  Consecutive small whole groups run in bundles of at most 512 rows (fewer where their
  activations would leave cache): the bundle's elementwise ops once (`group_threads._bundled`;
  at 64-128 rows a group the ops' dispatch was most of the non-product time; A/B in one
  process, 2-core Zen 3 VM: issue-2's step 0.78-0.95x, f-e256k8's 0.83-0.95x, elsewhere within
  noise), and each of its products one `torch._grouped_mm` (on CPU the per-group mm loop in
  C++: one call from Python for the bundle, not one per group with three slicings each),
  where every group's product is under `cpu_gemm.MIN_FLOPS` (`_grouped_rows`). A/B in one
  process, 2-core Zen 5 VM, paired by step: issue-2 0.95-0.98x, f-e256k8 0.96-0.99x,
  u-e160k4 0.97-1.00x (chosen on these), d288 f192 E96 k3 0.90-0.97x and d256 f192 E160 k2
  0.92-0.97x (not); at E 128, d 16 (all dispatch, no arithmetic) 0.64x. Its fp32 products
  run on oneDNN instead of MKL where the CPU runs them faster (AVX-512 AMD CPUs, where MKL
  takes its AVX2 path: `cpu_gemm`, decided once per process). There, at expert d_ff up to 96,
  a group's gate and up products run as one product with the stacked [w_gate | w_up], in the
  forward, the input gradient and the weight gradient (`_gate_up`: the same FLOPs, in fewer
  and wider calls).
Only what must cross groups stays whole: the scatter-add of the expert outputs into y (two
groups may hold the same token) and the saved pre-activations.

Forward saves x (not the gathered [A, D] copy: backward gathers again) and the
pre-activations (h_gate, h_up). The gate is folded into the hidden activation ([A, F], not
[A, D]) before the down projection, the same product by linearity. The backward runs exactly
the matmuls autograd would run for the textbook formula (two per projection, one when x
needs no gradient), so FlopCounterMode reports 18 * N * D * F per gated group, 12 ungated
(`_grouped_mm`'s FLOP formula is registered in group_matmuls). With gate None and a
permutation as token_A it is gather, experts, scatter: what an expert-parallel rank runs on
the rows it received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moespec.model import cpu_gemm, group_grads, group_threads
from moespec.model.expert_math import activate, activate_backward, expert_of_rows, gate_nonlinearity
from moespec.model.group_matmuls import grouped_gemm_available, groups, matmul_engine, offsets, rows_times_weights, weight_grad


def _scale_rows(h_NF: torch.Tensor, gate_N: torch.Tensor) -> torch.Tensor:
    """h * gate per row, in place; the product is taken in the gate's dtype (at least
    float32: a bf16 h is upcast for it)."""
    if h_NF.dtype == gate_N.dtype:
        return h_NF.mul_(gate_N[:, None])
    return h_NF.copy_(h_NF.to(gate_N.dtype) * gate_N[:, None])


def gather(src_TD: torch.Tensor, token_A: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """The slab's rows of src, [N, D]: src[token_A[rows]]. Named, with `scatter`, so that
    `bench/moe_ceiling.py` can time the kernel without its data movement."""
    return src_TD.index_select(0, token_A[rows]).to(dtype)


def scatter(like_TD: torch.Tensor, token_A: torch.Tensor, rows_AD: torch.Tensor) -> torch.Tensor:
    """Each token's sum of its rows, [T, D] in like's dtype (two groups may hold one token)."""
    return torch.zeros_like(like_TD).index_add_(0, token_A, rows_AD.to(like_TD.dtype))


@dataclass(frozen=True)
class Slab:
    """A contiguous run of the expert-sorted rows and how its products with the stacked
    expert weights run: one expert's group or a piece of it (`expert` set), or a bundle of
    small whole groups (`first` set: experts first.., `counts_E` theirs, `expert_A` its rows'
    experts where there are biases), each product one grouped GEMM (`offs` set) or one mm per
    group, written into the `out` slices it is given; or every group at once (neither: the
    engine's grouped product, `how`, into new tensors)."""

    rows: slice
    expert: int | None
    counts_E: list[int]
    how: object = None  # group_matmuls.matmul_engine's result, for the all-groups slab
    expert_A: torch.Tensor | None = None  # all-groups slab or bundle with biases: the expert of each row
    extra: int = -1  # a further piece of a split group: its slot of partial weight gradients
    onednn: bool = False  # per-group products on oneDNN (cpu_gemm: fp32, where faster)
    first: int = -1  # a bundle's first expert
    offs: torch.Tensor | None = None  # a bundle whose products are one torch._grouped_mm each: its groups' end rows
    w_gu: torch.Tensor | None = None  # [E, D, 2F]: gate and up as one product (`GATE_UP`)

    @property
    def per_group(self) -> bool:
        """Written into slices of preallocated outputs (a group, a piece, a bundle)."""
        return self.expert is not None or self.first >= 0

    def part(self, full: torch.Tensor | None) -> torch.Tensor | None:
        """This slab's rows of a preallocated per-row output (per-group slabs), else None."""
        return None if full is None or not self.per_group else full[self.rows]

    def _groups(self, *tensors: torch.Tensor):
        """(expert, each tensor's rows of that expert) for each group of a per-group slab."""
        if self.expert is not None:  # one group: the tensors whole, no slicing ops
            return [(self.expert, tensors)]
        return [(self.first + e, [t[rows] for t in tensors]) for e, rows in groups(self.counts_E)]

    def _grouped(self, a_NK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
        """A bundle's product as one grouped GEMM over its experts' weights, [N, N']."""
        return torch._grouped_mm(a_NK, w_EKN[self.first : self.first + len(self.counts_E)], offs=self.offs)

    def times(self, a_NK: torch.Tensor, w_EKN: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.per_group:
            return rows_times_weights(a_NK, w_EKN, self.counts_E, self.how)
        if self.offs is not None:
            out_NN = self._grouped(a_NK, w_EKN)
            return out_NN if out is None else out.copy_(out_NN)
        out = a_NK.new_empty(a_NK.shape[0], w_EKN.shape[2]) if out is None else out
        for e, (a, o) in self._groups(a_NK, out):
            if self.onednn:
                cpu_gemm.times_into(a, w_EKN[e], o)
            else:
                torch.mm(a, w_EKN[e], out=o)
        return out

    def add_times(self, into_NN: torch.Tensor, a_NK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
        if not self.per_group:
            return rows_times_weights(a_NK, w_EKN, self.counts_E, self.how, into=into_NN)
        if self.offs is not None:
            return into_NN.add_(self._grouped(a_NK, w_EKN))
        for e, (a, o) in self._groups(a_NK, into_NN):
            if self.onednn:
                cpu_gemm.times_into(a, w_EKN[e], o, add=True)
            else:
                o.addmm_(a, w_EKN[e])
        return into_NN

    def weight_grad(self, a_NK: torch.Tensor, g_NN: torch.Tensor, name: str, grads: dict) -> None:
        """a^T g per expert, [E, K, N], as grads[name]: set (all groups), or written into its
        experts' slices (a group's first piece, a bundle) or the piece's scratch slot
        (`_per_group_buffers`)."""
        if not self.per_group:
            grads[name] = weight_grad(a_NK, g_NN, self.counts_E, self.how, len(self.counts_E))
            return
        if self.offs is not None:  # an empty group's slice gets zeros (group_matmuls' probe checks that)
            grads[name][self.first : self.first + len(self.counts_E)].copy_(torch._grouped_mm(a_NK.t(), g_NN, offs=self.offs))
            return
        for e, (a, g) in self._groups(a_NK, g_NN):
            if self.onednn:
                cpu_gemm.weight_grad_into(a, g, self._target(name, grads, e))
            else:
                torch.mm(a.t(), g, out=self._target(name, grads, e))

    def bias(self, b_EN: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """Each row's expert bias, [N, N']: broadcast over the rows of one group, or a new
        tensor (fresh: to be scaled in place; `contiguous()` would hand a one-row group the
        parameter's own memory)."""
        if self.expert is None:
            return b_EN.index_select(0, self.expert_A)
        rows = b_EN[self.expert].expand(self.rows.stop - self.rows.start, -1)
        return rows.clone(memory_format=torch.contiguous_format) if fresh else rows

    def bias_grad(self, g_NN: torch.Tensor, name: str, grads: dict) -> None:
        """Sum of g over each expert's rows, [E, N'], as grads[name] (as `weight_grad`)."""
        if not self.per_group:
            grads[name] = g_NN.new_zeros(len(self.counts_E), g_NN.shape[1]).index_add_(0, self.expert_A, g_NN)
            return
        for e, (g,) in self._groups(g_NN):
            torch.sum(g, 0, out=self._target(name, grads, e))

    def _target(self, name: str, grads: dict, expert: int) -> torch.Tensor:
        return grads[name][expert] if self.extra < 0 else grads[name + "+"][self.extra]


def _slab(piece: group_threads.Piece, counts_E: list[int], expert_A: torch.Tensor | None, onednn: bool, grouped_rows: float,
          w_gu: torch.Tensor | None = None) -> Slab:  # fmt: skip
    """The per-group slab of a thread engine's piece: a group, a piece of one, or a bundle
    (its products one grouped GEMM each where no group reaches `grouped_rows`)."""
    if piece.groups == 1:
        return Slab(piece.rows, piece.expert, counts_E, extra=piece.extra, onednn=onednn, w_gu=w_gu)
    sub_counts = counts_E[piece.expert : piece.expert + piece.groups]
    rows_expert = None if expert_A is None else expert_A[piece.rows]
    offs = offsets(sub_counts, torch.device("cpu")) if max(sub_counts) < grouped_rows else None
    return Slab(piece.rows, None, sub_counts, expert_A=rows_expert, onednn=onednn, first=piece.expert, offs=offs, w_gu=w_gu)


GATE_UP = {"max_f": 96}  # expert d_ff up to which gate and up run as one product on oneDNN (`_gate_up`)


def _gate_up(onednn: bool, w_gate_EDF: torch.Tensor | None, w_up_EDF: torch.Tensor) -> torch.Tensor | None:
    """[w_gate | w_up], [E, D, 2F], where the thread engine runs a gated expert's gate and up
    products as one (forward, input gradient, weight gradient): on oneDNN at d_ff <= GATE_UP.
    Why: a product 64-96 columns wide runs well under oneDNN's rate, and x (and the gradient
    block) is read once instead of twice. A/B in one process, 2-core Zen 5 VM, paired by step:
    d 192, d_ff 64 (E 16, k 4) 0.90x; d 256, d_ff 64 or 96: 0.94-0.95x; d_ff 128: 0.97x and
    1.02x; d_ff 192: 1.04x; d_ff 512: 1.08x (the copies of the stacked weights and of the
    gradient block outweigh it). On MKL it gained nothing at any width (1.00-1.03x), as an A/B
    on MKL found before oneDNN was used. Judged on six shapes not looked at before (d 128-640,
    d_ff 32-96; `bench/moe_layer.py --gate-up-ab`), two runs: 0.85-1.00x. Built each pass
    (not saved: what a layer keeps for backward stays as the simulator counts it)."""
    if not onednn or w_gate_EDF is None or w_up_EDF.shape[2] > GATE_UP["max_f"]:
        return None
    return torch.cat([w_gate_EDF, w_up_EDF], 2)


def _grouped_rows(w_EKN: torch.Tensor) -> float:
    """The rows from which a bundled group's products leave the bundle's grouped GEMM for one
    call per group: where 2 * rows * D * F reaches `cpu_gemm.MIN_FLOPS` (never where
    `_grouped_mm` cannot run: 0). Why one grouped GEMM per bundle: on CPU it is the loop of
    per-group mm's in C++, so a bundle's product is one call from Python where it was one per
    group with three slicings; at 64-128 rows a group those calls were a good part of the
    layer's non-product time (module docstring). Why not above MIN_FLOPS: there the arithmetic
    dwarfs the calls, the copy out of the grouped GEMM's fresh result (it has no `out=`) does
    not (f-e96k1 on MKL, two-group bundles of 67 MFLOP products: 1.07x the step), and on
    oneDNN CPUs such products run on oneDNN (`cpu_gemm`), which `_grouped_mm` would bypass."""
    if not grouped_gemm_available(w_EKN):
        return 0.0
    return cpu_gemm.MIN_FLOPS / (2 * w_EKN.shape[1] * w_EKN.shape[2])


@dataclass
class _Saved:
    """What the backward needs besides the slab: the forward's inputs and pre-activations."""

    x_TD: torch.Tensor
    token_A: torch.Tensor
    gate_A: torch.Tensor | None
    weights: tuple  # (w_gate [E, D, F] or None, w_up [E, D, F], w_down [E, F, D])
    biases: tuple  # (b_gate [E, F], b_up [E, F], b_down [E, D]) or Nones
    h_gate_AF: torch.Tensor | None
    h_up_AF: torch.Tensor
    activation: str


def _forward_slab(s: Slab, x_TD, token_A, gate_A, weights, biases, activation, h_gate_NF=None, h_up_NF=None, out_ND=None,
                  h_N2F=None):  # fmt: skip
    """The slab's pre-activations and expert outputs (gate applied), into the given slices
    (per-group slabs; with `s.w_gu`, h_N2F is the block whose halves h_gate_NF and h_up_NF
    are) or new tensors."""
    (w_gate, w_up, w_down), (b_gate, b_up, b_down) = weights, biases
    x_ND = gather(x_TD, token_A, s.rows, w_up.dtype)  # the gather
    if s.w_gu is not None:
        s.times(x_ND, s.w_gu, h_N2F)
    else:
        h_up_NF = s.times(x_ND, w_up, h_up_NF)
        h_gate_NF = s.times(x_ND, w_gate, h_gate_NF) if w_gate is not None else None
    del x_ND
    if b_up is not None:
        h_up_NF += s.bias(b_up)
        if w_gate is not None:
            h_gate_NF += s.bias(b_gate)
    gate_N = None if gate_A is None else gate_A[s.rows]
    a_NF = activate(activation, h_gate_NF, h_up_NF)
    if gate_N is not None:
        a_NF = _scale_rows(a_NF, gate_N)
    out_ND = s.times(a_NF, w_down, out_ND)
    if b_down is not None:  # the down bias is gated with the rest of the expert's output
        bias_ND = s.bias(b_down, fresh=True)
        out_ND += bias_ND if gate_N is None else _scale_rows(bias_ND, gate_N)
    return h_gate_NF, h_up_NF, out_ND


def _backward_slab(s: Slab, saved: _Saved, grad_y_TD, need_x: bool, need_gate: bool, grads: dict) -> None:
    """The slab's share of every gradient. Per-row results (grads "gate_A", "x_AD") go into
    the preallocated rows of a per-group slab, else into `grads` as new tensors; weight and
    bias gradients are written into their [E, ...] buffers (per-group) or set (all groups)."""
    (w_gate, w_up, w_down), (_, b_up, b_down) = saved.weights, saved.biases
    gated, dtype, rows = w_gate is not None, w_up.dtype, s.rows
    h_gate_NF = None if saved.h_gate_AF is None else saved.h_gate_AF[rows]
    h_up_NF = saved.h_up_AF[rows]
    gate_N = None if saved.gate_A is None else saved.gate_A[rows]

    grad_y_ND = gather(grad_y_TD, saved.token_A, rows, dtype)  # gather of the output gradient
    grad_ga_NF = s.times(grad_y_ND, w_down.transpose(1, 2))  # d(loss)/d(gate * a)
    act_gate_NF = gate_nonlinearity(saved.activation, h_gate_NF)  # once for both uses
    a_NF = activate(saved.activation, h_gate_NF, h_up_NF) if act_gate_NF is None else act_gate_NF * h_up_NF
    if b_down is not None:  # the down bias: its gradient, and its share of the gate's
        scaled_ND = grad_y_ND if gate_N is None else _scale_rows(grad_y_ND.clone(), gate_N)  # _scale_rows works in place
        s.bias_grad(scaled_ND.to(b_down.dtype), "b_down", grads)
    if gate_N is not None:
        if need_gate:  # vecdot: one fused pass, no [N, F] product
            gdtype, out = gate_N.dtype, s.part(grads.get("gate_A"))
            grad_gate_N = torch.linalg.vecdot(grad_ga_NF.to(gdtype), a_NF.to(gdtype), dim=1, out=out)
            if b_down is not None:
                grad_gate_N += torch.linalg.vecdot(grad_y_ND.to(gdtype), s.bias(b_down).to(gdtype), dim=1)
            if not s.per_group:
                grads["gate_A"] = grad_gate_N
        a_NF = _scale_rows(a_NF, gate_N)  # what the down projection saw
        grad_a_NF = _scale_rows(grad_ga_NF, gate_N)
    else:
        grad_a_NF = grad_ga_NF
    grad_gate_NF, grad_up_NF = activate_backward(saved.activation, grad_a_NF, h_gate_NF, h_up_NF, act_gate_NF)
    del grad_ga_NF, grad_a_NF, act_gate_NF

    s.weight_grad(a_NF, grad_y_ND, "w_down", grads)
    del a_NF, grad_y_ND
    x_ND = gather(saved.x_TD, saved.token_A, rows, dtype)  # gathered again rather than kept
    grad_N2F = None if s.w_gu is None else torch.cat([grad_gate_NF, grad_up_NF], 1)  # the gate-and-up product's gradient
    if grad_N2F is not None:
        s.weight_grad(x_ND, grad_N2F, "w_gu", grads)
    else:
        s.weight_grad(x_ND, grad_up_NF, "w_up", grads)
        if gated:
            s.weight_grad(x_ND, grad_gate_NF, "w_gate", grads)
    del x_ND
    if b_up is not None:
        s.bias_grad(grad_up_NF, "b_up", grads)
        if gated:
            s.bias_grad(grad_gate_NF, "b_gate", grads)
    if need_x:
        if grad_N2F is not None:
            grad_x_ND = s.times(grad_N2F, s.w_gu.transpose(1, 2), s.part(grads.get("x_AD")))
        else:
            grad_x_ND = s.times(grad_up_NF, w_up.transpose(1, 2), s.part(grads.get("x_AD")))
            if gated:
                s.add_times(grad_x_ND, grad_gate_NF, w_gate.transpose(1, 2))
        if not s.per_group:
            grads["x_AD"] = grad_x_ND


class GroupedExpertsFn(torch.autograd.Function):
    """Dropless experts with gather and combine (module docstring): forward and backward are
    one slab pipeline each, over all rows at once or one group per slab on threads."""

    @staticmethod
    def forward(ctx, x_TD, token_A, gate_A, w_gate_EDF, w_up_EDF, w_down_EFD, counts_E, activation, engine,
                b_gate_EF=None, b_up_EF=None, b_down_ED=None):  # fmt: skip
        weights, biases = (w_gate_EDF, w_up_EDF, w_down_EFD), (b_gate_EF, b_up_EF, b_down_ED)
        how = matmul_engine(engine, counts_E, x_TD.device)
        # Each row's expert, for per-expert biases: the all-groups slab reads it; the thread
        # engine does not, but saves it too, so that what a layer keeps for backward (which
        # the simulator counts, sim/activations.py) does not depend on the engine.
        expert_A = expert_of_rows(counts_E, x_TD.device) if b_up_EF is not None else None
        onednn = how == "threads" and cpu_gemm.use_onednn(w_up_EDF)  # decided here, on the main thread, and kept for backward
        grouped_rows = _grouped_rows(w_up_EDF) if how == "threads" else 0.0  # likewise
        if how == "threads":
            n_rows, dtype, d_ff = token_A.shape[0], w_up_EDF.dtype, w_up_EDF.shape[2]
            w_gu = _gate_up(onednn, w_gate_EDF, w_up_EDF)
            if w_gu is not None:  # the pre-activations side by side, [A, 2F]: one product writes both
                h_A2F = x_TD.new_empty(n_rows, 2 * d_ff, dtype=dtype)
                h_gate_AF, h_up_AF = h_A2F[:, :d_ff], h_A2F[:, d_ff:]
            else:
                h_A2F, h_up_AF = None, x_TD.new_empty(n_rows, d_ff, dtype=dtype)
                h_gate_AF = torch.empty_like(h_up_AF) if w_gate_EDF is not None else None
            out_AD = x_TD.new_empty(n_rows, x_TD.shape[1], dtype=dtype)

            def one_piece(piece: group_threads.Piece) -> None:
                s = _slab(piece, counts_E, expert_A, onednn, grouped_rows, w_gu)
                _forward_slab(s, x_TD, token_A, gate_A, weights, biases, activation, s.part(h_gate_AF), s.part(h_up_AF), s.part(out_AD),
                              s.part(h_A2F))  # fmt: skip

            # the forward's pieces write only their own rows: a group may be cut as finely as balance asks
            bundle = _bundle_rows(x_TD, w_gate_EDF, w_up_EDF)
            group_threads.run_pieces(group_threads.pieces(counts_E, torch.get_num_threads(), max_extra=n_rows, bundle_rows=bundle), one_piece)
        else:
            s = Slab(slice(0, token_A.shape[0]), None, counts_E, how, expert_A)
            h_gate_AF, h_up_AF, out_AD = _forward_slab(s, x_TD, token_A, gate_A, weights, biases, activation)
        y_TD = scatter(x_TD, token_A, out_AD)  # the one scatter
        ctx.save_for_backward(x_TD, token_A, gate_A, w_gate_EDF, w_up_EDF, w_down_EFD, h_gate_AF, h_up_AF, b_gate_EF, b_up_EF, b_down_ED, expert_A)
        ctx.counts_E, ctx.activation, ctx.engine, ctx.onednn, ctx.grouped_rows = counts_E, activation, engine, onednn, grouped_rows
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_TD):
        x_TD, token_A, gate_A, w_gate, w_up, w_down, h_gate_AF, h_up_AF, b_gate, b_up, b_down, expert_A = ctx.saved_tensors
        saved = _Saved(x_TD, token_A, gate_A, (w_gate, w_up, w_down), (b_gate, b_up, b_down), h_gate_AF, h_up_AF, ctx.activation)
        counts_E = ctx.counts_E
        need_x, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        how = matmul_engine(ctx.engine, counts_E, x_TD.device)
        if how == "threads":
            bundle = _bundle_rows(x_TD, w_gate, w_up)
            pieces = group_threads.pieces(counts_E, torch.get_num_threads(), max_extra=group_grads.scratch_slots(saved), bundle_rows=bundle)
            w_gu = _gate_up(ctx.onednn, w_gate, w_up)
            grads = group_grads.per_group_buffers(saved, counts_E, pieces, need_x, need_gate, gate_up=w_gu is not None)
            group_threads.run_pieces(
                pieces, lambda p: _backward_slab(_slab(p, counts_E, expert_A, ctx.onednn, ctx.grouped_rows, w_gu), saved, grad_y_TD, need_x, need_gate, grads)
            )
            group_grads.add_partials(grads, pieces)
            if w_gu is not None:  # the stacked gradient's halves, each contiguous like its parameter
                grads["w_gate"], grads["w_up"] = (half.contiguous() for half in grads.pop("w_gu").split(w_up.shape[2], dim=2))
        else:
            grads = {}
            _backward_slab(Slab(slice(0, token_A.shape[0]), None, counts_E, how, expert_A), saved, grad_y_TD, need_x, need_gate, grads)
        grad_x_TD = None
        if need_x:
            grad_x_TD = scatter(x_TD, token_A, grads.pop("x_AD"))  # the one scatter
        return (grad_x_TD, None, grads.get("gate_A"), grads.get("w_gate"), grads["w_up"], grads["w_down"], None, None, None,
                grads.get("b_gate"), grads.get("b_up"), grads.get("b_down"))  # fmt: skip


def _bundle_rows(x_TD: torch.Tensor, w_gate_EDF: torch.Tensor | None, w_up_EDF: torch.Tensor) -> int:
    """How many rows a bundle of small groups may hold: its gathered rows of x and hidden
    pre-activations, [N, D + F (+ F gated)], within group_threads.BUNDLE's bytes."""
    widths = x_TD.shape[1] + w_up_EDF.shape[2] * (2 if w_gate_EDF is not None else 1)
    return group_threads.bundle_rows(widths * w_up_EDF.element_size())
