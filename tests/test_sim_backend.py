"""Backends as data, their topology graph, and collective times over it (no torch, well under 10 s)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from moespec.sim import (
    LinkSpec,
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    alpha_beta_time_s,
    build_topology,
    load_backend,
    reduce_scatter_time_s,
    ring_topology,
    shipped_backends,
)
from moespec.sim.backend import backends_dir, load_backend_schema
from moespec.spec.errors import SpecErrors

# Sums of a few dozen floats of similar size: relative error ~1e-15; 1e-12 leaves room.
EXACT = 1e-12


def test_every_shipped_backend_loads_and_matches_its_file_name():
    names = shipped_backends()
    assert {"cpu-local", "dgx-a100", "dgx-h100", "h100-cluster-4n", "h200-cluster-4n"} <= set(names)
    for name in names:
        backend = load_backend(name)
        assert backend.name == name
        assert load_backend(backends_dir() / f"{name}.yaml") == backend  # by path too
        graph = build_topology(backend)
        devices = [v for v, kind in graph.nodes(data="kind") if kind == "device"]
        assert devices == list(range(backend.num_devices))
        if backend.nodes > 1:
            assert backend.inter_node is not None


def test_datasheet_figures():
    h100 = load_backend("dgx-h100")
    assert h100.device.peak_flops_per_s["bf16"] == 989e12
    assert h100.device.memory_bandwidth_Bps == 3.35e12
    assert h100.intra_node.bandwidth_Bps == 450e9  # 900 GB/s NVLink, per direction
    assert load_backend("dgx-a100").device.peak_flops_per_s["bf16"] == 312e12
    h200 = load_backend("h200-cluster-4n")
    assert (h200.device.memory_bandwidth_Bps, h200.inter_node.bandwidth_Bps) == (4.8e12, 50e9)


def test_schema_documents_every_property():
    def walk(node, where):
        if isinstance(node, dict):
            for key, prop in node.get("properties", {}).items():
                assert "description" in prop and "default" in prop, f"{where}.{key}"
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, where
            for key, child in node.items():
                walk(child, f"{where}.{key}")

    walk(load_backend_schema(), "schema")


BAD = textwrap.dedent(
    """\
    version: 1
    name: bad
    device:
      kind: X
      peak_flops_per_s: {fp32: 1.0e12, bf16: 2.0e12, fp16: 2.0e12}
      memory_bytes: 1000
      memory_bandwidth_Bps: 1.0e9
    nodes: four
    devices_per_node: 2
    topology: ring
    links:
      intra_node:
        bandwidth_Bps: 1.0e9
        latency_s: 1.0e-6
        latency_us: 1
    collective_library: gloo
    """
)


def test_bad_backend_gives_located_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(SpecErrors) as caught:
        load_backend(path)
    lines = [error.format() for error in caught.value.errors]
    assert lines == [
        f"{path}:8:8: nodes: expected a whole number, got str 'four'; write a whole number here",
        f"{path}:15:5: links.intra_node.latency_us: unknown key 'latency_us'; did you mean 'latency_s'?",
    ]


def test_multi_node_backend_needs_inter_node_link(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(BAD.replace("nodes: four", "nodes: 2").replace("    latency_us: 1\n", ""))
    with pytest.raises(SpecErrors, match=r"two.yaml:11:1: links: nodes is 2.*add links.inter_node"):
        load_backend(path)


def test_multi_node_ring_uses_the_inter_node_link_between_nodes(tmp_path):
    path = tmp_path / "ring.yaml"
    inter = "  inter_node: {bandwidth_Bps: 1.0e8, latency_s: 1.0e-5}\n"
    path.write_text(BAD.replace("nodes: four", "nodes: 2").replace("    latency_us: 1\n", "").replace("collective_library", inter + "collective_library"))
    graph = build_topology(load_backend(path))
    assert sorted(graph.edges(data="bandwidth_Bps")) == [(0, 1, 1e9), (1, 2, 1e8), (2, 3, 1e9), (3, 0, 1e8)]
    # the two slow hops each carry bytes/4 per step: 2*3 steps of (1e8/4 / 1e8 s + 1e-5 s)
    assert all_reduce_time_s(graph, [0, 1, 2, 3], 1e8) == pytest.approx(6 * (0.25 + 1e-5), rel=EXACT)


def test_unknown_backend_name_suggests():
    with pytest.raises(SpecErrors, match="did you mean 'dgx-h100'"):
        load_backend("dgx-h10")


@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_flat_ring_matches_textbook_alpha_beta(n):
    bandwidth_Bps, latency_s, nbytes = 25e9, 5e-6, 3 * 2**27
    graph = ring_topology(n, LinkSpec(bandwidth_Bps, latency_s, efficiency=1.0))
    ranks = list(range(n))
    assert all_reduce_time_s(graph, ranks, nbytes) == pytest.approx(2 * (n - 1) / n * nbytes / bandwidth_Bps + 2 * (n - 1) * latency_s, rel=EXACT)
    for collective in (reduce_scatter_time_s, all_gather_time_s):
        assert collective(graph, ranks, nbytes) == pytest.approx((n - 1) / n * nbytes / bandwidth_Bps + (n - 1) * latency_s, rel=EXACT)
    for name, collective in [("all_reduce", all_reduce_time_s), ("reduce_scatter", reduce_scatter_time_s), ("all_gather", all_gather_time_s)]:
        expected = alpha_beta_time_s(name, n=n, bytes=nbytes, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)
        assert collective(graph, ranks, nbytes) == pytest.approx(expected, rel=EXACT)


def test_nvswitch_node_matches_textbook_with_effective_bandwidth():
    """Through a switch, a ring hop is device->switch->device: same bandwidth, latency split in two."""
    backend = load_backend("dgx-h100")
    link = backend.intra_node
    expected = alpha_beta_time_s("all_reduce", n=8, bytes=2**30, bandwidth_Bps=link.effective_bandwidth_Bps, latency_s=link.latency_s)
    assert all_reduce_time_s(build_topology(backend), list(range(8)), 2**30) == pytest.approx(expected, rel=EXACT)


def test_all_to_all_slows_sharply_when_the_expert_group_leaves_the_node():
    backend = load_backend("h100-cluster-4n")
    graph = build_topology(backend)
    per_rank_bytes = 64 * 2**20  # tokens x d x 2 bytes one rank dispatches, split evenly over the group
    within = all_to_all_time_s(graph, list(range(8)), per_rank_bytes / 8)
    across = all_to_all_time_s(graph, list(range(16)), per_rank_bytes / 16)
    # ep 8: 7/8 of the volume over NVLink (360 GB/s effective); ep 16: 8/16 over the NIC (45 GB/s).
    assert within == pytest.approx(7 / 8 * per_rank_bytes / (450e9 * 0.8) + 3e-6, rel=EXACT)
    assert across == pytest.approx(8 / 16 * per_rank_bytes / (50e9 * 0.9) + 6e-6, rel=EXACT)
    assert across > 4 * within


def test_all_reduce_across_nodes_is_bound_by_the_nic():
    backend = load_backend("h100-cluster-4n")
    graph = build_topology(backend)
    nic = backend.inter_node
    nbytes = 2**30
    for n in (16, 32):  # 2 and 4 nodes: the two / four node-crossing ring hops each go through one NIC
        time_s = all_reduce_time_s(graph, list(range(n)), nbytes)
        nic_bound_s = alpha_beta_time_s("all_reduce", n=n, bytes=nbytes, bandwidth_Bps=nic.effective_bandwidth_Bps, latency_s=nic.latency_s)
        assert time_s == pytest.approx(nic_bound_s, rel=EXACT)
        bus_bandwidth_Bps = 2 * (n - 1) / n * nbytes / time_s
        assert 0.99 * nic.effective_bandwidth_Bps < bus_bandwidth_Bps <= nic.effective_bandwidth_Bps
    # inside one node the same buffer is ~8x faster (360 vs 45 GB/s effective)
    assert all_reduce_time_s(graph, list(range(8)), nbytes) < all_reduce_time_s(graph, list(range(16)), nbytes) / 7


def test_bad_ranks_are_refused():
    graph = build_topology(load_backend("dgx-a100"))
    with pytest.raises(ValueError, match="not a device"):
        all_reduce_time_s(graph, [0, 99], 1.0)
    with pytest.raises(ValueError, match="repeat"):
        all_to_all_time_s(graph, [0, 0], 1.0)
    assert all_reduce_time_s(graph, [3], 1e9) == 0.0


def test_import_does_not_load_torch():
    code = "import sys, moespec.sim; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
