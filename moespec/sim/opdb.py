"""The operator database: what each op family of a training step costs on one machine, as
`moespec calibrate` measured it, and the lookups the cost model sums along a step's op list.

The accurate training-step simulators build a table of profiled operators and add up the
ops a step runs (vTrain, Bang et al. 2024; Lumos, Liang et al. 2025; Proteus, Duan et al.
2023): the roofline cannot see a CPU's bf16 matmuls running 50x below fp32, a small matmul's
efficiency, or the host time of a thousand small ops. This is the same idea at the size of a
file that ships with a cluster description (`ops` in a calibration document):

- `linear[dtype]`: seconds of a Linear's forward and backward (its three matmuls, as
  autograd runs them: y = x W^T, dX = dY W, dW = dY^T X) measured on a grid of (M rows,
  K in, N out); between grid points the rate (FLOP/s) is interpolated in log space, outside
  it held at the edge's rate (big shapes keep the largest measured efficiency; tiny ones cost
  at least their dispatch, `linear_floor_s`).
- `bmm[dtype]`: a capacity expert bank's batched projection [E, C, K] @ [E, K, N], forward
  and backward, on a grid of (E, C, w = sqrt(K N)): many small matrices run far below one
  large matmul's rate, and slower again once the bank outgrows the caches (measured here: 8 x
  [8, 320] @ [320, 160] at 19 GFLOP/s per expert, 32 of them at 11).
- `attention[dtype]`: SDPA forward and backward (causal) per (batch x head) on a grid of
  (sequence, head_dim): work grows as S^2 * hd past the grid.
- `grouped[dtype]`: the dropless experts' kernel (gather, per-group matmuls, gated combine,
  forward + backward) per group, on a grid of (n rows, w = sqrt(D F)): its small matmuls on
  slices run far below a Linear's rate (measured here: 64 x 128 x 32 products at ~2.5
  GFLOP/s against 30 for a Linear of that size).
- `auction`: BASE's balanced assignment on a grid of (T tokens, E experts), on scores shaped
  like an initialised router's on byte text (its rounds depend on the scores: opbench.py).
- `op_s`: host seconds per op in forward/backward (ATen dispatch, autograd, Python modules);
  `step_s` per optimizer step (the training loop's own Python); `a2a_call_s` per
  expert-parallel all-to-all call beyond its transfer (a blocking collective waits for the
  slowest rank: fitted on a toy ep-2 block);
  `optimizer_op_s` per op of clipping and AdamW on one parameter tensor.
- `bandwidth_Bps`: the memory-bound ops' bytes per second (norms, activations, softmax, their
  gradients, as the model's elementwise bytes count them); `gather_Bps`: index_select /
  index_add rows (dispatch and combine); `optimizer_param_s`: AdamW seconds per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPES = ("fp32", "bf16", "fp16")  # the order of sim/design.py PRECISIONS


@dataclass(frozen=True)
class Grid:
    """Measured seconds on a log-spaced grid; `rate` is work/second at each point."""

    axes: tuple[np.ndarray, ...]  # log2 of each axis' points
    log_rate: np.ndarray  # log of work per second at each point

    def rate(self, *coords: np.ndarray) -> np.ndarray:
        """Multilinear interpolation of log(rate) in log2 coordinates, clamped to the grid."""
        weights, lows = [], []
        for axis, x in zip(self.axes, coords):
            x = np.log2(np.maximum(np.asarray(x, dtype=np.float64), 1.0))
            if len(axis) == 1:
                lows.append(np.zeros(x.shape, dtype=np.int64))
                weights.append(np.zeros(x.shape))
                continue
            x = np.clip(x, axis[0], axis[-1])
            low = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
            lows.append(low)
            weights.append((x - axis[low]) / (axis[low + 1] - axis[low]))
        shape = np.broadcast(*weights).shape
        out = np.zeros(shape)
        for corner in range(1 << len(self.axes)):
            index, w = [], np.ones(shape)
            for d, (low, frac) in enumerate(zip(lows, weights)):
                up = (corner >> d) & 1
                index.append(np.minimum(low + up, len(self.axes[d]) - 1))
                w = w * (frac if up else 1 - frac)
            out = out + w * self.log_rate[tuple(index)]
        return np.exp(out)


def _grid(record: dict, work) -> Grid:
    """A Grid from {"axes": {name: [points]}, "seconds": nested lists}; work(*points) -> work."""
    names = list(record["axes"])
    points = [np.asarray(record["axes"][n], dtype=np.float64) for n in names]
    seconds = np.asarray(record["seconds"], dtype=np.float64)
    mesh = np.meshgrid(*points, indexing="ij")
    return Grid(tuple(np.log2(p) for p in points), np.log(work(*mesh) / seconds))


@dataclass(frozen=True)
class OpDatabase:
    linear: dict  # dtype -> Grid of 6*M*K*N FLOPs per second
    linear_floor_s: dict  # dtype -> seconds of the smallest Linear (dispatch-bound)
    bmm: dict  # dtype -> Grid over (E, C, w) of 6*E*C*w^2 FLOPs per second (a bank's bmm, K = N = w)
    bmm_floor_s: dict
    attention: dict  # dtype -> Grid over (S, hd) of 12*S^2*hd FLOPs per second per (batch x head)
    attention_floor_s: dict
    grouped: dict  # dtype -> Grid over (n rows, w) of 18*n*w^2 FLOPs per second per group (dropless experts)
    grouped_call_s: dict  # dtype -> fixed seconds of one call of the dropless kernel (a layer)
    auction: Grid  # over (T, E) of T*E score entries per second: BASE's balanced assignment
    op_s: float
    step_s: float
    a2a_call_s: float
    optimizer_op_s: float
    optimizer_param_s: Grid  # over tensor size: parameters per second of clipping + AdamW
    bandwidth_Bps: float
    gather_Bps: float

    def _dtype(self, table: dict, dtype: str) -> str:
        return dtype if dtype in table else "fp32"  # an unmeasured dtype costs as fp32 (stated in the report)

    def linear_s(self, dtype_code: np.ndarray, m, k, n, *, floor: bool = True) -> np.ndarray:
        """Forward + backward seconds of Linear(K -> N) on M rows, per design (dtype codes of
        DTYPES); 0 where M, K or N is 0. floor=False: the matmuls' work only, for products
        whose dispatch is counted elsewhere (the experts' bmm and group loop)."""
        m, k, n = (np.asarray(v, dtype=np.float64) for v in (m, k, n))
        out = np.zeros(np.broadcast(dtype_code, m, k, n).shape)
        for code, name in enumerate(DTYPES):
            key = self._dtype(self.linear, name)
            sel = np.broadcast_to(np.asarray(dtype_code) == code, out.shape)
            if not sel.any():
                continue
            mm, kk, nn = (np.broadcast_to(v, out.shape)[sel] for v in (m, k, n))
            flops = 6 * mm * kk * nn
            seconds, floor_s = flops / self.linear[key].rate(mm, kk, nn), self.linear_floor_s[key]
            # floor=False: the matmuls' work alone, their dispatch (the smallest Linear's time) taken out
            seconds = np.maximum(seconds, floor_s) if floor else np.maximum(seconds - floor_s, 0.0)
            out[sel] = np.where(flops > 0, seconds, 0.0)
        return out

    def bmm_s(self, dtype_code: np.ndarray, experts, c, k, n) -> np.ndarray:
        """Forward + backward seconds of [E, C, K] @ [E, K, N] (a capacity bank's projection)."""
        experts, c, k, n = (np.asarray(v, dtype=np.float64) for v in (experts, c, k, n))
        out = np.zeros(np.broadcast(dtype_code, experts, c, k, n).shape)
        for code, name in enumerate(DTYPES):
            key = self._dtype(self.bmm, name)
            sel = np.broadcast_to(np.asarray(dtype_code) == code, out.shape)
            if not sel.any():
                continue
            ee, cc, kk, nn = (np.broadcast_to(v, out.shape)[sel] for v in (experts, c, k, n))
            flops = 6 * ee * cc * kk * nn
            seconds = np.maximum(flops / self.bmm[key].rate(ee, cc, np.sqrt(kk * nn)), self.bmm_floor_s[key])
            out[sel] = np.where(flops > 0, seconds, 0.0)
        return out

    def grouped_s(self, dtype_code: np.ndarray, groups, n, d, f) -> np.ndarray:
        """Forward + backward seconds of one call of the dropless kernel on `groups` groups of
        n rows each (gated: 3 D x F matrices; 18 n D F FLOPs a group), gathers and combine
        included: the call's fixed cost plus each group's."""
        groups, n, d, f = (np.asarray(v, dtype=np.float64) for v in (groups, n, d, f))
        out = np.zeros(np.broadcast(dtype_code, groups, n, d, f).shape)
        for code, name in enumerate(DTYPES):
            key = self._dtype(self.grouped, name)
            sel = np.broadcast_to(np.asarray(dtype_code) == code, out.shape)
            if not sel.any():
                continue
            gg, nn, dd, ff = (np.broadcast_to(v, out.shape)[sel] for v in (groups, n, d, f))
            flops = 18 * nn * dd * ff
            seconds = self.grouped_call_s[key] + gg * flops / self.grouped[key].rate(nn, np.sqrt(dd * ff))
            out[sel] = np.where(gg * flops > 0, seconds, 0.0)
        return out

    def optimizer_params_s(self, tensors, size) -> np.ndarray:
        """Seconds of clipping + AdamW's arithmetic on `tensors` tensors of `size` parameters
        (past the caches a parameter costs more: the rate is measured per tensor size)."""
        tensors, size = (np.asarray(v, dtype=np.float64) for v in (tensors, size))
        return np.where(tensors * size > 0, tensors * size / self.optimizer_param_s.rate(size), 0.0)

    def auction_s(self, tokens, experts) -> np.ndarray:
        """Seconds of one balanced assignment of `tokens` to `experts` (0 where none)."""
        tokens, experts = (np.asarray(v, dtype=np.float64) for v in (tokens, experts))
        work = tokens * experts
        return np.where(work > 0, work / self.auction.rate(tokens, experts), 0.0)

    def attention_s(self, dtype_code: np.ndarray, heads, s, hd) -> np.ndarray:
        """Forward + backward seconds of causal SDPA over `heads` (batch x head) of S x hd."""
        heads, s, hd = (np.asarray(v, dtype=np.float64) for v in (heads, s, hd))
        out = np.zeros(np.broadcast(dtype_code, heads, s, hd).shape)
        for code, name in enumerate(DTYPES):
            key = self._dtype(self.attention, name)
            sel = np.broadcast_to(np.asarray(dtype_code) == code, out.shape)
            if not sel.any():
                continue
            hh, ss, dd = (np.broadcast_to(v, out.shape)[sel] for v in (heads, s, hd))
            flops = 12 * ss * ss * dd
            out[sel] = np.where(hh > 0, np.maximum(hh * flops / self.attention[key].rate(ss, dd), self.attention_floor_s[key]), 0.0)
        return out


def linear_flops(m, k, n):
    return 6.0 * m * k * n


def bmm_flops(e, c, w):
    return 6.0 * e * c * w * w


def grouped_flops(n, w):
    return 18.0 * n * w * w


def attention_flops(s, hd):
    return 12.0 * s * s * hd


def database_from_dict(data: dict) -> OpDatabase:
    """The `ops` section of a calibration document (profiling/calibrate.py writes it)."""
    linear = {dtype: _grid(record, linear_flops) for dtype, record in data["linear"].items()}
    attention = {dtype: _grid(record, attention_flops) for dtype, record in data["attention"].items()}
    bmm = {dtype: _grid(record, bmm_flops) for dtype, record in data["bmm"].items()}
    return OpDatabase(
        grouped={dtype: _grid(record, grouped_flops) for dtype, record in data["grouped"].items()},
        grouped_call_s={dtype: float(record["call_s"]) for dtype, record in data["grouped"].items()},
        auction=_grid(data["auction"], lambda t, e: t * e),
        linear=linear,
        linear_floor_s={dtype: float(record["floor_s"]) for dtype, record in data["linear"].items()},
        bmm=bmm,
        bmm_floor_s={dtype: float(record["floor_s"]) for dtype, record in data["bmm"].items()},
        attention=attention,
        attention_floor_s={dtype: float(record["floor_s"]) for dtype, record in data["attention"].items()},
        op_s=float(data["op_s"]),
        step_s=float(data["step_s"]),
        a2a_call_s=float(data["a2a_call_s"]),
        optimizer_op_s=float(data["optimizer_op_s"]),
        optimizer_param_s=_grid(data["optimizer_param_s"], lambda size: size),
        bandwidth_Bps=float(data["bandwidth_Bps"]),
        gather_Bps=float(data["gather_Bps"]),
    )
