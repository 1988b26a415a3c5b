"""Where a dropless layer's time goes, stage by stage: the kernel's forward and backward
(model/grouped_experts.py GroupedExpertsFn) replayed op by op on one layer's real routing, with the
matmuls on the thread engine and on `torch._grouped_mm`, beside the capacity path's bmm's and
a dense FFN's products of the same FLOPs. Medians in ms, one column per stage.

The "threads" rows run the all-groups pipeline with each product's groups spread over the
threads (`group_matmuls`' product-level form). The layer's thread engine runs
each group's whole pipeline on one thread instead (grouped_experts.py), so these rows show
what each stage costs, not the layer's time: `bench/moe_layer.py` times the layer.

    python bench/moe_stages.py f-e10k1 g-e16k8      # shape names from bench/moe_layer.py

Run as `moespec train` runs (OpenMP spin capped, malloc keeping freed memory). This is how the
spinning OpenMP thread was found (issue 13): the thread engine's first product after a
parallel op was slower than the next one, which no whole-layer timing shows.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import moespec  # before torch (moespec/openmp_tuning.py)
import torch

from moespec.malloc_tuning import keep_freed_memory
from moespec.model import experts as X
from moespec.model import group_matmuls as G
from moespec.model.expert_math import activate, activate_backward, gate_nonlinearity
from moespec.model.grouped_experts import _scale_rows

sys.path.insert(0, str(Path(__file__).parent))
import moe_layer  # noqa: E402  the bench's shapes and layer builder

FORWARD = ["gather", "up", "gate", "act", "scale", "down", "scatter"]
BACKWARD = ["gather_dy", "d_act", "act", "d_gate", "scale", "act_bwd", "w_down", "gather_x", "w_up", "w_gate", "dx_up", "dx_gate", "scatter"]


def routing(shape: dict):
    """x, the layer's sorted assignments (token_A, gate_A, counts_E) and its bank's weights."""
    torch.manual_seed(0)
    x_TD = torch.randn(shape["tokens"], shape["d"], requires_grad=True)
    fn, layer = moe_layer.ours(shape, dropless=True)
    seen = {}
    grouped = X.ExpertBank._grouped
    X.ExpertBank._grouped = lambda bank, x, token_A, gate_A, counts_E: seen.update(token_A=token_A, gate_A=gate_A.detach(), counts_E=counts_E) or grouped(bank, x, token_A, gate_A, counts_E)
    try:
        fn(x_TD)
    finally:
        X.ExpertBank._grouped = grouped
    bank = layer.experts
    return x_TD.detach(), seen, (bank.w_gate.detach(), bank.w_up.detach(), bank.w_down.detach())


def laps(steps) -> list[float]:
    """Run the thunks in order; ms each."""
    times = [time.perf_counter()]
    for step in steps:
        step()
        times.append(time.perf_counter())
    return [1e3 * (b - a) for a, b in zip(times, times[1:])]


def forward(x_TD, r, w, how) -> list[float]:
    w_gate, w_up, w_down = w
    token_A, gate_A, counts = r["token_A"], r["gate_A"], r["counts_E"]
    s = {}
    return laps([
        lambda: s.update(x=x_TD.index_select(0, token_A)),
        lambda: s.update(up=G.rows_times_weights(s["x"], w_up, counts, how)),
        lambda: s.update(gate=G.rows_times_weights(s["x"], w_gate, counts, how)),
        lambda: s.update(a=activate("swiglu", s["gate"], s["up"])),
        lambda: s.update(a=_scale_rows(s["a"], gate_A)),
        lambda: s.update(out=G.rows_times_weights(s["a"], w_down, counts, how)),
        lambda: torch.zeros_like(x_TD).index_add_(0, token_A, s["out"]),
    ])  # fmt: skip


def capacity_forward(x_ECD, w) -> list[float]:
    w_gate, w_up, w_down = w
    s = {}
    return laps([lambda: s.update(up=torch.bmm(x_ECD, w_up)), lambda: s.update(gate=torch.bmm(x_ECD, w_gate)),
                 lambda: s.update(a=activate("swiglu", s["gate"], s["up"])), lambda: torch.bmm(s["a"], w_down)])  # fmt: skip


def backward(x_TD, r, w, how, h_gate_AF, h_up_AF, dy_TD) -> list[float]:
    w_gate, w_up, w_down = w
    token_A, gate_A, counts = r["token_A"], r["gate_A"], r["counts_E"]
    E, s = len(counts), {}
    return laps([
        lambda: s.update(dy=dy_TD.index_select(0, token_A)),
        lambda: s.update(dga=G.rows_times_weights(s["dy"], w_down.transpose(1, 2), counts, how)),
        lambda: s.update(ag=gate_nonlinearity("swiglu", h_gate_AF)) or s.update(a=s["ag"] * h_up_AF),
        lambda: torch.linalg.vecdot(s["dga"], s["a"], dim=1),
        lambda: s.update(a=_scale_rows(s["a"], gate_A), da=_scale_rows(s["dga"], gate_A)),
        lambda: s.update(zip(("dgate", "dup"), activate_backward("swiglu", s["da"], h_gate_AF, h_up_AF, s["ag"]))),
        lambda: G.weight_grad(s["a"], s["dy"], counts, how, E),
        lambda: s.update(x=x_TD.index_select(0, token_A)),
        lambda: G.weight_grad(s["x"], s["dup"], counts, how, E),
        lambda: G.weight_grad(s["x"], s["dgate"], counts, how, E),
        lambda: s.update(dx=G.rows_times_weights(s["dup"], w_up.transpose(1, 2), counts, how)),
        lambda: G.rows_times_weights(s["dgate"], w_gate.transpose(1, 2), counts, how, into=s["dx"]),
        lambda: torch.zeros_like(x_TD).index_add_(0, token_A, s["dx"]),
    ])  # fmt: skip


def dense_products(shape: dict) -> list[float]:
    """The dense FFN's three product forms at the same FLOPs: x W, x^T dh, dh W^T."""
    T, D, F = shape["tokens"], shape["d"], shape["k"] * shape["f"]
    x_TD, w_DF, dh_TF = torch.randn(T, D), torch.randn(D, F), torch.randn(T, F)
    return laps([lambda: x_TD @ w_DF, lambda: x_TD.t() @ dh_TF, lambda: dh_TF @ w_DF.t()])


def medians(runs: list[list[float]], skip: int = 2) -> list[float]:
    return [statistics.median(column) for column in zip(*runs[skip:])]


def report(shape: dict, repeats: int = 12) -> str:
    x_TD, r, w = routing(shape)
    counts = r["counts_E"]
    offs = G.offsets(counts, x_TD.device)
    x_AD = x_TD.index_select(0, r["token_A"])
    h_gate, h_up = (G.rows_times_weights(x_AD, w_, counts, None) for w_ in w[:2])
    dy_TD = torch.randn_like(x_TD)
    capacity = -(-shape["tokens"] * shape["k"] // len(counts))
    x_ECD = torch.randn(len(counts), capacity, shape["d"])
    runs = {name: [] for name in ("fwd threads", "fwd grouped_mm", "fwd capacity", "bwd threads", "bwd grouped_mm", "dense products")}
    for _ in range(repeats):  # interleaved, so machine noise hits all alike
        runs["fwd threads"].append(forward(x_TD, r, w, "threads"))
        runs["fwd grouped_mm"].append(forward(x_TD, r, w, offs))
        runs["fwd capacity"].append(capacity_forward(x_ECD, w))
        runs["bwd threads"].append(backward(x_TD, r, w, "threads", h_gate, h_up, dy_TD))
        runs["bwd grouped_mm"].append(backward(x_TD, r, w, offs, h_gate, h_up, dy_TD))
        runs["dense products"].append(dense_products(shape))
    names = {"fwd": FORWARD, "capacity": ["up", "gate", "act", "down"], "bwd": BACKWARD, "dense": ["x W", "x^T dh", "dh W^T"]}
    lines = [f"{shape['name']}: D {shape['d']}, F {shape['f']}, E {shape['E']}, k {shape['k']}, T {shape['tokens']}; "
             f"median ms of {repeats - 2}"]  # fmt: skip
    for label, rows in runs.items():
        stages = names["capacity" if "capacity" in label else label.split()[0]]
        ms = medians(rows)
        lines.append(f"  {label:<15} " + "  ".join(f"{n} {v:.1f}" for n, v in zip(stages, ms)) + f"  | sum {sum(ms):.1f}")
    return "\n".join(lines)


def main() -> None:
    keep_freed_memory()
    shapes = {s["name"]: s for s in moe_layer.SHAPES + moe_layer.GRID + moe_layer.FRESH + moe_layer.UNSEEN}
    unknown = [n for n in sys.argv[1:] if n not in shapes]
    if not sys.argv[1:] or unknown:
        print(f"give shape names from bench/moe_layer.py ({', '.join(shapes)}); unknown: {unknown}", file=sys.stderr)
        raise SystemExit(2)
    print(f"moespec {moespec.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'libgomp default')}")
    for name in sys.argv[1:]:
        print(report(shapes[name]))


if __name__ == "__main__":
    main()
