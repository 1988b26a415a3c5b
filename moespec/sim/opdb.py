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
  `optimizer_op_s` per op of clipping and AdamW on one parameter tensor;
  `tp_call_s` per tensor-parallel collective beyond its transfer (DTensor's Python dispatch
  around it and the wait for the other rank: fitted on a toy tp-2 model); `pp_micro_s` per
  micro-batch per pipeline stage (the schedule's own host time, its sends and receives:
  fitted on a toy pp-2 model).
- `bandwidth_Bps`: the memory-bound ops' bytes per second (norms, activations, softmax, their
  gradients, as the model's elementwise bytes count them); `gather_Bps`: index_select /
  index_add rows (dispatch and combine); `optimizer_param_s`: AdamW seconds per parameter.
"""

from __future__ import annotations

import math

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
    tp_call_s: float = 0.0
    pp_micro_s: float = 0.0
    # fp32 equal groups (BASE) whose products (2 * rows * D * F) reach this run on the thread
    # engine, timed by `grouped`, not by `bmm` (model/group_matmuls.py equal_groups_threaded_flops)
    equal_groups_threaded_flops: float = math.inf

    def _by_dtype(self, table: dict, dtype_code, args, seconds) -> np.ndarray:
        """`seconds(key, *args)` for each dtype's designs, args broadcast together as float64;
        an unmeasured dtype costs as fp32 (the report names the time model)."""
        args = [np.asarray(v, dtype=np.float64) for v in args]
        out = np.zeros(np.broadcast(dtype_code, *args).shape)
        for code, name in enumerate(DTYPES):
            sel = np.broadcast_to(np.asarray(dtype_code) == code, out.shape)
            if sel.any():
                key = name if name in table else "fp32"
                out[sel] = seconds(key, *(np.broadcast_to(v, out.shape)[sel] for v in args))
        return out

    def linear_s(self, dtype_code: np.ndarray, m, k, n, *, floor: bool = True) -> np.ndarray:
        """Forward + backward seconds of Linear(K -> N) on M rows, per design (dtype codes of
        DTYPES); 0 where M, K or N is 0. floor=False: the matmuls' work alone, their dispatch
        (the smallest Linear's time) taken out, for products whose dispatch is counted elsewhere."""

        def seconds(key, m, k, n):
            flops = 6 * m * k * n
            work, floor_s = flops / self.linear[key].rate(m, k, n), self.linear_floor_s[key]
            return np.where(flops > 0, np.maximum(work, floor_s) if floor else np.maximum(work - floor_s, 0.0), 0.0)

        return self._by_dtype(self.linear, dtype_code, (m, k, n), seconds)

    def bmm_s(self, dtype_code: np.ndarray, experts, c, k, n) -> np.ndarray:
        """Forward + backward seconds of [E, C, K] @ [E, K, N] (a capacity bank's projection)."""

        def seconds(key, e, c, k, n):
            flops = 6 * e * c * k * n
            return np.where(flops > 0, np.maximum(flops / self.bmm[key].rate(e, c, np.sqrt(k * n)), self.bmm_floor_s[key]), 0.0)

        return self._by_dtype(self.bmm, dtype_code, (experts, c, k, n), seconds)

    def grouped_s(self, dtype_code: np.ndarray, groups, n, d, f) -> np.ndarray:
        """Forward + backward seconds of one call of the dropless kernel on `groups` groups of
        n rows each (gated: 3 D x F matrices; 18 n D F FLOPs a group), gathers and combine
        included: the call's fixed cost plus each group's."""

        def seconds(key, g, n, d, f):
            flops = g * 18 * n * d * f
            return np.where(flops > 0, self.grouped_call_s[key] + flops / self.grouped[key].rate(n, np.sqrt(d * f)), 0.0)

        return self._by_dtype(self.grouped, dtype_code, (groups, n, d, f), seconds)

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

        def seconds(key, h, s, hd):
            work = h * 12 * s * s * hd / self.attention[key].rate(s, hd)
            return np.where(h > 0, np.maximum(work, self.attention_floor_s[key]), 0.0)

        return self._by_dtype(self.attention, dtype_code, (heads, s, hd), seconds)


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
        tp_call_s=float(data.get("tp_call_s", 0.0)),  # calibrations before these two: none fitted
        pp_micro_s=float(data.get("pp_micro_s", 0.0)),
        equal_groups_threaded_flops=float(data.get("equal_groups_threaded_flops", math.inf)),  # absent: always bmm
    )
