"""Searching spaces too large to enumerate (issue 17): the searched front is judged against the
exact front of a space small enough to enumerate (hypervolume), the search is seeded, the CLI
picks search from the space's size, and a 9.1e11-design sweep is searched in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import moocore  # the search extra (pymoo and its moocore) is part of `make test`'s install
import numpy as np
import pytest
from cli_here import run_here

from moespec.explore import explore, load_sweep, to_costs
from moespec.explore.search import search

ROOT = Path(__file__).resolve().parents[1]
MILLION = ROOT / "specs" / "sweeps" / "h100-million.yaml"
TRILLION = ROOT / "specs" / "sweeps" / "h100-trillion.yaml"


def costs_of(result) -> np.ndarray:
    sweep = result.sweep
    values = np.column_stack([result.front.figures[o.name] for o in sweep.objectives])
    return to_costs(values, np.array([o.direction == "max" for o in sweep.objectives]))


@pytest.fixture(scope="module")
def exact():
    return explore(load_sweep(MILLION))


def test_one_percent_of_the_space_finds_the_front_by_hypervolume(exact):
    found = search(exact.sweep, budget=exact.designs // 100, seed=0)
    assert found.search["evaluated"] <= exact.designs // 100 and found.designs == found.search["distinct"]
    reference = costs_of(exact)
    low, high = reference.min(axis=0), reference.max(axis=0)

    def volume(costs):
        scaled = (costs - low) / np.where(high > low, high - low, 1.0)
        return moocore.hypervolume(np.minimum(scaled, 1.1), ref=np.full(costs.shape[1], 1.1))

    assert volume(costs_of(found)) / volume(reference) >= 0.99  # measured 0.998 (bench/explore_search.py)
    # every searched front design is a real feasible design with the exhaustive run's figures
    rows = {row["design"]: row for row in exact.sample.rows() + exact.front.rows()}
    for row in found.front.rows():
        if row["design"] in rows:
            assert row["tokens_per_s"] == rows[row["design"]]["tokens_per_s"]
    on_exact = set(exact.front.ids.tolist())
    assert len(on_exact & set(found.front.ids.tolist())) > 0.5 * len(exact.front)


def test_the_search_is_seeded():
    sweep = load_sweep(MILLION)
    first, again, other = (search(sweep, budget=3000, seed=s) for s in (4, 4, 5))
    assert np.array_equal(first.front.ids, again.front.ids)
    assert not np.array_equal(first.front.ids, other.front.ids)


def test_explore_sizes_the_space_first_and_searches_a_trillion_designs():
    done = run_here("explore", TRILLION, "--budget", "20000", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["search"]["space"] == 910_046_527_488 and document["search"]["evaluated"] == 20_000
    assert document["designs"] == document["search"]["distinct"] and len(document["front"]) > 10
    from moespec.cli.explore_cmd import choose_mode

    budget, note = choose_mode(load_sweep(TRILLION), budget=None, exhaustive=False, seed=0)
    assert budget == 1_000_000 and "days to evaluate every one" in note
    assert choose_mode(load_sweep(TRILLION), budget=None, exhaustive=True, seed=0) == (None, "")
    assert choose_mode(load_sweep(MILLION), budget=None, exhaustive=False, seed=0)[0] is None  # ~1 s whole


def test_impossible_requests_are_refused_from_the_arithmetic():
    done = run_here("explore", MILLION, "--chunk", "100000000")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "GiB" in done.stderr, done.stderr
    done = run_here("explore", MILLION, "--budget", "10", "--exhaustive")
    assert done.returncode == 2 and "give one" in done.stderr
