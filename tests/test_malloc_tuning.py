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
    "faults = []\n"
    "for step in range(6):  # a 64 MiB block per step, freed at once, as a training loop does\n"
    "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "    torch.empty(64 << 18).fill_(1.0)\n"
    "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    "print(json.dumps({'tuned': tuned, 'faults': faults}))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_a_64_mib_block_is_reused_without_page_faults():
    """Above glibc's 32 MiB mmap cap too: a dropless layer's [T*k, D] rows are that big. The
    first step faults its block in; one of the next two may take a second block of fresh pages
    (torch asks for 64-byte aligned memory, a little more than the hole a freed block leaves
    when it did not merge with the heap's top, which depends on where the top falls); from
    then on the steps alternate between those blocks and fault nothing. glibc as shipped maps
    and faults in a fresh block at every step."""
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
    assert min(seen["plain"]["faults"][1:]) > pages // 2  # glibc as shipped: mmap'd afresh, every page touched again
    assert sum(seen["tuned"]["faults"][1:3]) < pages + pages // 16  # at most one more fresh block
    assert max(seen["tuned"]["faults"][3:]) < pages // 16  # steady: no page faulted again
