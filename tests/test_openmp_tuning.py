"""OpenMP spin cap (moespec/openmp_tuning.py): set by `import moespec` before torch loads, for
this process and the ranks it starts; a user's own setting is kept. Each case runs in a fresh
interpreter, as the variable only matters before torch's first import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = (
    "import json, os, sys\n"
    "import moespec\n"
    "from moespec.openmp_tuning import SPIN_COUNT\n"
    "print(json.dumps({'spin': os.environ.get('GOMP_SPINCOUNT'), 'torch_loaded': 'torch' in sys.modules, 'cap': SPIN_COUNT}))\n"
)


def probe(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_import_caps_the_spin_before_torch_loads():
    seen = probe()
    assert seen["spin"] == seen["cap"] == "10000"
    assert seen["torch_loaded"] is False  # so libgomp, loaded with torch later, reads it


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": "250"}, {"OMP_WAIT_POLICY": "active"}])
def test_a_users_own_policy_is_kept(env):
    seen = probe(**env)
    assert seen["spin"] == env.get("GOMP_SPINCOUNT")  # theirs, or still unset under OMP_WAIT_POLICY


def test_ranks_started_by_moespec_inherit_it():
    code = "import moespec, subprocess, sys; subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"GOMP_SPINCOUNT\"])'], check=True)"
    base = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "10000"
