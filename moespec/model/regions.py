"""Named regions of a training step, as torch.profiler sees them (`moespec::<name>`).

The profiler attributes time to these names: forward ops by the region around them, backward
ops by the forward op that created them (autograd's sequence numbers), and the all-to-alls,
whose backward is ours, by a region opened inside their backward. Regions never nest, so
every op has at most one. `record_function` costs about a microsecond when no profiler runs.
"""

from __future__ import annotations

import torch

PREFIX = "moespec::"
REGIONS = ("attention", "dense_ffn", "router", "permute", "dispatch_a2a", "experts", "combine_a2a",
           "shared_experts", "grad_sync", "optimizer")  # fmt: skip


def region(name: str) -> torch.profiler.record_function:
    """`with region("router"): ...` marks the ops inside as the router's."""
    return torch.profiler.record_function(PREFIX + name)
