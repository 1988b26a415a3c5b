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
