"""Collective times over a topology graph (moespec.sim.topology).

One *step* is a set of concurrent transfers (src rank, dst rank, bytes). Each transfer follows a
shortest path (fewest hops) through the graph; every edge sums the bytes routed over it. The
step takes

    step_time_s = max over edges (bytes_on_edge / (bandwidth_Bps * efficiency))
                + max over transfers (sum of latency_s along its path)

i.e. the busiest link sets the pace and the slowest message's latency is paid once per step.

Algorithms (bytes are per rank, as nccl-tests counts them):
  all-reduce      ring over `ranks` in the given order: 2(n-1) steps, each rank sends bytes/n
                  to its successor (reduce-scatter then all-gather)
  reduce-scatter  ring: n-1 steps of bytes/n (bytes = each rank's full input)
  all-gather      ring: n-1 steps of bytes/n (bytes = each rank's full output)
  all-to-all      one step: every rank sends bytes_per_pair to every other rank at once (how
                  NCCL posts it: grouped send/recv to all peers)
On a flat ring of link (B, a) this gives the textbook 2(n-1)/n * bytes/B + 2(n-1)*a; on a
switched cluster the ring's node-crossing hops go through NICs, which then bound the time.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence

import networkx as nx

Transfer = tuple[int, int, float]  # (src rank, dst rank, bytes)


def link_loads_bytes(graph: nx.DiGraph, transfers: Iterable[Transfer]) -> tuple[dict[tuple, float], float]:
    """Bytes routed over each edge, and the largest path latency, for one step of transfers."""
    loads: dict[tuple, float] = defaultdict(float)
    latency_s = 0.0
    for src, dst, nbytes in transfers:
        if src == dst or nbytes <= 0:
            continue
        try:
            path = nx.shortest_path(graph, src, dst)
        except (nx.NetworkXNoPath, nx.NodeNotFound) as exc:
            raise ValueError(f"no route from rank {src} to rank {dst} in topology {graph.graph.get('name', '?')!r}: {exc}") from None
        path_latency_s = 0.0
        for edge in itertools.pairwise(path):
            loads[edge] += nbytes
            path_latency_s += graph.edges[edge]["latency_s"]
        latency_s = max(latency_s, path_latency_s)
    return dict(loads), latency_s


def step_time_s(graph: nx.DiGraph, transfers: Iterable[Transfer]) -> float:
    loads, latency_s = link_loads_bytes(graph, transfers)
    busiest_s = max((nbytes / _effective_Bps(graph.edges[edge]) for edge, nbytes in loads.items()), default=0.0)
    return busiest_s + latency_s


def all_to_all_time_s(graph: nx.DiGraph, ranks: Sequence[int], bytes_per_pair: float) -> float:
    """Every rank sends `bytes_per_pair` to each other rank of the group, all at once."""
    _check_ranks(graph, ranks)
    return step_time_s(graph, [(src, dst, bytes_per_pair) for src in ranks for dst in ranks if src != dst])


def all_reduce_time_s(graph: nx.DiGraph, ranks: Sequence[int], bytes: float) -> float:
    """Ring all-reduce of a `bytes` buffer on every rank: 2(n-1) steps of bytes/n."""
    n = len(_check_ranks(graph, ranks))
    return 2 * (n - 1) * _ring_step_time_s(graph, ranks, bytes / n)


def reduce_scatter_time_s(graph: nx.DiGraph, ranks: Sequence[int], bytes: float) -> float:
    """Ring reduce-scatter of a `bytes` input per rank (each keeps bytes/n): n-1 steps of bytes/n."""
    n = len(_check_ranks(graph, ranks))
    return (n - 1) * _ring_step_time_s(graph, ranks, bytes / n)


def all_gather_time_s(graph: nx.DiGraph, ranks: Sequence[int], bytes: float) -> float:
    """Ring all-gather into a `bytes` output per rank (each holds bytes/n): n-1 steps of bytes/n."""
    n = len(_check_ranks(graph, ranks))
    return (n - 1) * _ring_step_time_s(graph, ranks, bytes / n)


def alpha_beta_time_s(collective: str, *, n: int, bytes: float, bandwidth_Bps: float, latency_s: float) -> float:
    """Textbook ring alpha-beta cost (Thakur et al. 2005; Patarasuk & Yuan 2009), for checking."""
    steps = {"all_reduce": 2 * (n - 1), "reduce_scatter": n - 1, "all_gather": n - 1}
    if collective not in steps:
        raise ValueError(f"unknown collective {collective!r}; one of {', '.join(steps)}")
    return steps[collective] * (bytes / n / bandwidth_Bps + latency_s)


def _ring_step_time_s(graph: nx.DiGraph, ranks: Sequence[int], chunk_bytes: float) -> float:
    """Every step of a ring moves the same chunk from each rank to its successor, so all cost alike."""
    n = len(ranks)
    if n < 2:
        return 0.0
    return step_time_s(graph, [(ranks[i], ranks[(i + 1) % n], chunk_bytes) for i in range(n)])


def _effective_Bps(edge: dict) -> float:
    return edge["bandwidth_Bps"] * edge.get("efficiency", 1.0)


def _check_ranks(graph: nx.DiGraph, ranks: Sequence[int]) -> Sequence[int]:
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks repeat: {list(ranks)}; list each rank once")
    for rank in ranks:
        if rank not in graph or graph.nodes[rank].get("kind") != "device":
            raise ValueError(f"rank {rank!r} is not a device of topology {graph.graph.get('name', '?')!r}")
    return ranks
