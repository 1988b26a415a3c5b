"""The operator database's lookups (sim/opdb.py) on a synthetic grid whose answers are known:
measured points come back exactly, rates interpolate in log space between them and hold at
the edges, floors bound tiny ops, and an unmeasured dtype costs as fp32."""

from __future__ import annotations

import numpy as np
import pytest

from moespec.sim.opdb import database_from_dict


def _document(rate_of) -> dict:
    axes = {"m": [16, 256, 4096], "k": [32, 512], "n": [32, 512]}
    seconds = [[[6 * m * k * n / rate_of(m, k, n) for n in axes["n"]] for k in axes["k"]] for m in axes["m"]]
    bmm_axes = {"e": [8, 32], "c": [4, 64], "w": [64, 256]}
    bmm = [[[6 * e * c * w * w / 1e9 for w in bmm_axes["w"]] for c in bmm_axes["c"]] for e in bmm_axes["e"]]
    attention = {"axes": {"s": [64, 1024], "hd": [16, 128]}, "seconds": [[12 * s * s * hd / 2e9 for hd in (16, 128)] for s in (64, 1024)],
                 "floor_s": 1e-5}  # fmt: skip
    return {"linear": {"fp32": {"axes": axes, "seconds": seconds, "floor_s": 2e-5}},
            "bmm": {"fp32": {"axes": bmm_axes, "seconds": bmm, "floor_s": 1e-5}},
            "attention": {"fp32": attention},
            "grouped": {"fp32": {"axes": {"n": [8, 512], "w": [32, 512]}, "seconds": [[18 * n * w * w / 3e9 for w in (32, 512)] for n in (8, 512)],
                                  "call_s": 1e-4}},
            "auction": {"axes": {"t": [256, 4096], "e": [4, 64]}, "seconds": [[1e-3, 4e-3], [4e-3, 8e-3]]},
            "op_s": 1e-5, "step_s": 1e-3, "a2a_call_s": 0.0, "optimizer_op_s": 1e-5,
            "optimizer_param_s": {"axes": {"size": [1024, 1 << 20]}, "seconds": [1024e-9, (1 << 20) * 2e-9]}, "bandwidth_Bps": 1e9, "gather_Bps": 1e9}  # fmt: skip


def test_grid_points_come_back_and_rates_interpolate_in_log_space():
    # rate grows as sqrt(M): 10 GFLOP/s at 16 rows, 40 at 256, 160 at 4096
    db = database_from_dict(_document(lambda m, k, n: 1e10 * (m / 16) ** 0.5))
    assert db.linear_s(0, 256, 512, 512)[()] == pytest.approx(6 * 256 * 512 * 512 / 4e10)
    # halfway in log2 between 16 and 256 rows: 64 rows at rate 1e10 * 2
    assert db.linear_s(0, 64, 512, 512)[()] == pytest.approx(6 * 64 * 512 * 512 / 2e10)
    # beyond the grid the edge's rate holds: 16384 rows at the 4096-row rate
    assert db.linear_s(0, 16384, 512, 512)[()] == pytest.approx(6 * 16384 * 512 * 512 / 1.6e11)
    # a tiny Linear costs at least its dispatch; an empty one nothing
    assert db.linear_s(0, 1, 1, 1)[()] == pytest.approx(2e-5)
    assert db.linear_s(0, 0, 512, 512)[()] == 0.0
    assert db.linear_s(0, 1, 1, 1, floor=False)[()] == 0.0  # its dispatch is all there is, counted elsewhere
    big = 6 * 4096 * 512 * 512 / 1.6e11
    assert db.linear_s(0, 4096, 512, 512, floor=False)[()] == pytest.approx(big - 2e-5)


def test_vectorised_lookups_match_one_at_a_time_and_bf16_falls_back_to_fp32():
    db = database_from_dict(_document(lambda m, k, n: 1e10 * np.log2(m * k * n)))
    m = np.array([16, 100, 3000, 64])
    codes = np.array([0, 1, 0, 1])  # bf16 was not measured in this database: costs as fp32
    many = db.linear_s(codes, m, 300, 40)
    one = [db.linear_s(0, int(mm), 300, 40)[()] for mm in m]
    assert many == pytest.approx(one, rel=1e-12)


def test_bmm_and_attention_scale_with_their_work():
    db = database_from_dict(_document(lambda m, k, n: 1e10))
    # a bmm's rate is 1 GFLOP/s everywhere: time is its FLOPs over 1e9, K and N enter as sqrt(K N)
    assert db.bmm_s(0, 16, 10, 100, 400)[()] == pytest.approx(6 * 16 * 10 * 100 * 400 / 1e9)
    # attention at 2 GFLOP/s per (batch x head); 8 heads take 8 times one
    one = db.attention_s(0, 1, 256, 64)[()]
    assert one == pytest.approx(12 * 256 * 256 * 64 / 2e9)
    assert db.attention_s(0, 8, 256, 64)[()] == pytest.approx(8 * one)


def test_auction_points_come_back():
    db = database_from_dict(_document(lambda m, k, n: 1e10))
    assert db.auction_s(4096, 4)[()] == pytest.approx(4e-3)
    assert db.auction_s(256, 64)[()] == pytest.approx(4e-3)
    assert db.auction_s(0, 64)[()] == 0.0


def test_optimizer_cost_per_parameter_grows_with_tensor_size():
    db = database_from_dict(_document(lambda m, k, n: 1e10))
    assert db.optimizer_params_s(10, 1024)[()] == pytest.approx(10 * 1024e-9)
    assert db.optimizer_params_s(1, 1 << 22)[()] == pytest.approx((1 << 22) * 2e-9)  # past the grid: the edge's rate
    assert db.optimizer_params_s(0, 1024)[()] == 0.0


def test_a_dropless_call_costs_its_fixed_part_and_each_group():
    db = database_from_dict(_document(lambda m, k, n: 1e10))
    assert db.grouped_s(0, 16, 100, 128, 128)[()] == pytest.approx(1e-4 + 16 * 18 * 100 * 128 * 128 / 3e9)
    assert db.grouped_s(0, 0, 100, 128, 128)[()] == 0.0


def _slowest_worker(rank: int, port: int, out: str) -> None:
    import json
    import os

    import torch.distributed as dist

    from moespec.profiling.opbench import slowest_rank, timed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    timed(lambda: None, sync=lambda: None, min_repeats=1)  # every measurement starts with a barrier: both ranks must get here
    ops = {"linear": {"fp32": {"axes": {"m": [16, 64]}, "seconds": [[1.0 + rank, 3.0 - rank]], "floor_s": 1e-6 * (1 + rank)}},
           "op_s": 2e-5 if rank == 0 else 1e-5, "bandwidth_Bps": 8e9 if rank == 0 else 4e9, "gather_Bps": 1e9}  # fmt: skip
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(slowest_rank(ops), f)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_two_rank_calibration_keeps_the_slowest_rank_at_every_point(tmp_path):
    """Ranks meet at every collective, so a step runs at the slower one's pace: every time is
    the larger of the two ranks' at that point, every bandwidth the smaller; the axes stay."""
    import json

    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    mp.spawn(_slowest_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        ops = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ops["linear"]["fp32"]["seconds"] == [[2.0, 3.0]] and ops["linear"]["fp32"]["axes"] == {"m": [16, 64]}
        assert ops["linear"]["fp32"]["floor_s"] == pytest.approx(2e-6) and ops["op_s"] == pytest.approx(2e-5)
        assert ops["bandwidth_Bps"] == pytest.approx(4e9) and ops["gather_Bps"] == pytest.approx(1e9)


def test_the_grouped_grid_times_the_engine_a_top_k_layer_runs():
    """The calibration's dropless-kernel grid stands for routed (uneven) groups: equal ones
    would time BASE's one-bmm engine instead. Every grid point: uneven, not the batched engine,
    n rows per group on average (the same FLOPs as n each)."""
    import torch

    from moespec.model import group_matmuls
    from moespec.profiling.opbench import GROUPED_EXPERTS, GROUPED_GRID, uneven_counts

    w = torch.empty(GROUPED_EXPERTS, 32, 32)
    for axes in GROUPED_GRID.values():
        for n in axes["n"]:
            counts = uneven_counts(n, GROUPED_EXPERTS)
            assert sum(counts) == n * GROUPED_EXPERTS and min(counts) > 0
            assert group_matmuls.engine(counts, w) != "batched"
    assert uneven_counts(1, 1) == [1]  # the one-group call the fixed cost is taken from


def test_a_calibration_that_threads_equal_groups_times_base_by_the_kernels_grid():
    """A calibration made where BASE's fp32 equal groups left the bmm for the thread engine
    (oneDNN products, model/group_matmuls.py equal_groups_threaded_flops) records the product
    size from which they did: from it on, the cost model times those groups by the dropless
    kernel's grid (its gathers inside), below it and without it by the bmm grid and counts
    their gathers apart."""
    from pathlib import Path

    from moespec.sim import ops
    from moespec.sim.design import DesignBatch
    from moespec.spec import load_plan

    batch = DesignBatch.from_plans([load_plan(Path(__file__).resolve().parents[1] / "specs" / "tiny-base.yaml")])
    product_flops = 2 * (8 * 64 // 4) * 64 * 128  # 2 * rows (T / E) * D * F of the spec's BASE layer
    plain = _document(lambda m, k, n: 1e9)  # bmm at 1e9 FLOP/s, the kernel's grid at 3e9
    bmm_db = database_from_dict(plain)
    at_db = database_from_dict({**plain, "equal_groups_threaded_flops": product_flops})
    above_db = database_from_dict({**plain, "equal_groups_threaded_flops": product_flops + 1})
    batched = ops.batched_kernel(batch, batch.table, bmm_db)
    assert batched.sum() == 1  # the one BASE layer
    assert not ops.batched_kernel(batch, batch.table, at_db).any()
    assert (ops.batched_kernel(batch, batch.table, above_db) == batched).all()
    linear_bmm, linear_threaded = ops.linear_and_attention_s(batch, bmm_db)[0][0], ops.linear_and_attention_s(batch, at_db)[0][0]
    assert linear_threaded < linear_bmm  # the faster grid now times the experts
    assert ops.linear_and_attention_s(batch, above_db)[0][0] == linear_bmm
    assert ops.gather_bytes(batch, at_db)[0] < ops.gather_bytes(batch, bmm_db)[0]
