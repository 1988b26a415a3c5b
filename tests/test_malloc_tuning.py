"""glibc malloc tuning (moespec/malloc_tuning.py): applied on Linux/glibc, left alone when the
user chose their own MALLOC_* settings."""

from __future__ import annotations

import sys

import pytest

from moespec import malloc_tuning


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_applies_on_glibc(monkeypatch):
    for name in [k for k in malloc_tuning.os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert malloc_tuning.keep_freed_memory() is True


def test_respects_the_users_own_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert malloc_tuning.keep_freed_memory() is False


FAULTS = (
    "import json, resource, sys, torch\n"
    "from moespec import malloc_tuning\n"
    "tuned = malloc_tuning.keep_freed_memory() if sys.argv[1] == 'tuned' else False\n"
    "torch.empty(64 << 18).fill_(1.0)  # a 64 MiB block, freed at once\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "torch.empty(64 << 18).fill_(1.0)  # the same size again, as the next step asks\n"
    "print(json.dumps({'tuned': tuned, 'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_a_64_mib_block_is_reused_without_page_faults():
    """Above glibc's 32 MiB mmap cap too: a dropless layer's [T*k, D] rows are that big."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    seen = {}
    for mode in ("plain", "tuned"):
        done = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, timeout=120, check=True)
        seen[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    pages = (64 << 20) // 4096
    assert seen["tuned"]["tuned"] is True
    assert seen["plain"]["faults"] > pages // 2  # glibc as shipped: mmap'd afresh, every page touched again
    assert seen["tuned"]["faults"] < pages // 16
