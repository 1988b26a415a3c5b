"""The simulator: hardware as data (backends/*.yaml), its topology as a graph, and cost terms.

Pure Python (networkx, no torch): `import moespec.sim` stays fast and runs anywhere.
"""

from __future__ import annotations

from moespec.sim.backend import (
    Backend,
    DeviceSpec,
    LinkSpec,
    load_backend,
    shipped_backends,
)
from moespec.sim.collectives import (
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    alpha_beta_time_s,
    reduce_scatter_time_s,
)
from moespec.sim.topology import build_topology, ring_topology

__all__ = [
    "Backend",
    "DeviceSpec",
    "LinkSpec",
    "all_gather_time_s",
    "all_reduce_time_s",
    "all_to_all_time_s",
    "alpha_beta_time_s",
    "build_topology",
    "load_backend",
    "reduce_scatter_time_s",
    "ring_topology",
    "shipped_backends",
]
