"""Shorten how long torch's idle OpenMP threads spin before they sleep (GNU libgomp).

Why: after every parallel op, libgomp's worker threads spin on their core waiting for the
next one, for ~5-10 ms by default (GOMP_SPINCOUNT 300,000 pause loops). The dropless kernel
runs its groups' matmuls on threads of its own (model/group_threads.py); started right after
a parallel op, its worker shares a core with that spinning thread. On the 2-core VM this was
measured on, the layer's first product after a parallel op took 17.0 ms where the same
product took 13.4 ms a moment later, and the dropless layer was 1.25-1.34x the capacity
path at top-1 with 8-10 experts (f-e10k1, g-e8k1). With the spin capped at 10,000 loops (a
fraction of a millisecond: still longer than the gap between two back-to-back ops, so those
never pay a wake-up) it was 1.04-1.07x there (`bench/moe_layer.py`, and `--untuned` for the
default). Any other code that mixes its own threads with torch's gains the same.

libgomp reads the variable once, when torch's library loads, so it is set when moespec is
imported, before torch is (the CLI, the bench, `import moespec` first in a script). Ranks and
workers that moespec starts inherit it. A user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY is
kept. Off Linux, or with another OpenMP runtime, the variable is inert."""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"


def limit_openmp_spin() -> bool:
    """Set GOMP_SPINCOUNT for this process and its children unless the user chose a policy;
    True if it takes effect here (torch not loaded yet)."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return "torch" not in sys.modules
