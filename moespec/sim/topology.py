r"""A backend's wiring as a networkx DiGraph, for routing collective traffic.

Vertices:
  r (int)           device of global rank r; attrs kind="device", node, local_rank
  ("switch", n)     node n's hub for nvswitch / pcie / loopback; kind = that topology name
  ("nic", r)        rank r's own NIC (multi-node, switched topologies); kind="nic"
  "fabric"          the inter-node fabric, a non-blocking fat tree; kind="fabric"

Every edge is one direction of a link and carries
  bandwidth_Bps (peak, that direction), efficiency (achievable fraction), latency_s, link (a label).
A message's latency is the sum of latency_s along its path, so a link's configured latency_s is
split over the hops of one device-to-device crossing: half on device->switch, half on
switch->device; for the fabric, half on each nic<->fabric edge (device<->nic edges add none).

  nvswitch / pcie / loopback (per node)      ring (all devices, across nodes too)
     d0   d1 ... d7                             d0 -> d1 -> ... -> d(N-1) -> d0
       \  |     /                               (edges inside a node use intra_node,
      ("switch", n)                              edges between nodes use inter_node)
  and, when nodes > 1:  d_r <-> ("nic", r) <-> "fabric"
"""

from __future__ import annotations

import networkx as nx

from moespec.sim.backend import Backend, LinkSpec

FABRIC = "fabric"


def build_topology(backend: Backend) -> nx.DiGraph:
    graph = nx.DiGraph(name=backend.name, topology=backend.topology)
    for rank in range(backend.num_devices):
        graph.add_node(rank, kind="device", node=backend.node_of(rank), local_rank=rank % backend.devices_per_node)
    if backend.topology == "ring":
        links = [backend.intra_node if _same_node(backend, r) else backend.inter_node for r in range(backend.num_devices)]
        _add_ring(graph, list(range(backend.num_devices)), links)
        return graph
    for node in range(backend.nodes):
        hub = ("switch", node)
        graph.add_node(hub, kind=backend.topology, node=node)
        for local in range(backend.devices_per_node):
            rank = node * backend.devices_per_node + local
            _add_duplex(graph, rank, hub, backend.intra_node, backend.intra_node.latency_s / 2, backend.topology)
    if backend.nodes > 1:
        graph.add_node(FABRIC, kind="fabric")
        inter = backend.inter_node
        for rank in range(backend.num_devices):
            nic = ("nic", rank)
            graph.add_node(nic, kind="nic", node=backend.node_of(rank))
            _add_duplex(graph, rank, nic, inter, 0.0, "nic")
            _add_duplex(graph, nic, FABRIC, inter, inter.latency_s / 2, "fabric")
    return graph


def ring_topology(n: int, link: LinkSpec) -> nx.DiGraph:
    """A flat one-way ring of n devices (0 -> 1 -> ... -> n-1 -> 0), every hop `link`."""
    graph = nx.DiGraph(name=f"ring-{n}", topology="ring")
    for rank in range(n):
        graph.add_node(rank, kind="device", node=0, local_rank=rank)
    _add_ring(graph, list(range(n)), [link] * n)
    return graph


def _same_node(backend: Backend, rank: int) -> bool:
    """Whether the ring hop rank -> rank+1 (wrapping) stays inside one node."""
    return backend.node_of(rank) == backend.node_of((rank + 1) % backend.num_devices)


def _add_ring(graph: nx.DiGraph, ranks: list[int], links: list[LinkSpec]) -> None:
    for index, (rank, link) in enumerate(zip(ranks, links)):
        successor = ranks[(index + 1) % len(ranks)]
        if successor != rank:
            graph.add_edge(rank, successor, bandwidth_Bps=link.bandwidth_Bps, efficiency=link.efficiency, latency_s=link.latency_s, link="ring")


def _add_duplex(graph: nx.DiGraph, u, v, link: LinkSpec, latency_s: float, label: str) -> None:
    for a, b in ((u, v), (v, u)):
        graph.add_edge(a, b, bandwidth_Bps=link.bandwidth_Bps, efficiency=link.efficiency, latency_s=latency_s, link=label)
