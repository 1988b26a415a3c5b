"""plan_dispatch: the routing-plan index math, on hand-built inputs and against an obvious
Python oracle. No process group and no module involved; all integer math, so every check is
exact (no tolerances)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moespec.model.dispatch import count_per_expert, plan_dispatch

# Four tokens, k = 2, token-major: assignment a = 2 * t + j is token t's j-th choice.
#   a:       0  1  2  3  4  5  6  7
#   token:   0  0  1  1  2  2  3  3
#   expert:  0  1  0  2  1  0  0  1
TOKEN_A = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
EXPERT_A = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1])
PRIORITY_A = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.6, 0.4, 0.95, 0.05])


def test_position_policy_slots_follow_token_order():
    plan = plan_dispatch(EXPERT_A, TOKEN_A, None, n_experts=4, capacity=None)
    # expert 0 gets a0 (t0), a2 (t1), a5 (t2), a6 (t3); expert 1 a1, a4, a7; expert 2 a3.
    assert plan.order_A.tolist() == [0, 2, 5, 6, 1, 4, 7, 3]
    assert plan.expert_sorted_A.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert plan.slot_A.tolist() == [0, 0, 1, 0, 1, 2, 3, 2]
    assert plan.tokens_per_expert_E.tolist() == [4, 3, 1, 0]
    assert plan.kept_A.all() and plan.row_A is None and int(plan.dropped) == 0


def test_position_policy_drops_the_latest_tokens():
    plan = plan_dispatch(EXPERT_A, TOKEN_A, None, n_experts=4, capacity=2)
    # Slots >= 2 go: a5 (t2 in expert 0), a6 (t3 in expert 0), a7 (t3 in expert 1).
    assert plan.kept_A.tolist() == [True, True, True, True, True, False, False, False]
    assert plan.kept_per_expert_E.tolist() == [2, 2, 1, 0]
    assert plan.tokens_per_expert_E.tolist() == [4, 3, 1, 0]  # routed, before dropping
    assert int(plan.dropped) == 3
    # Row expert * C + slot; dropped ones point at the spare row E * C = 8.
    assert plan.row_A.tolist() == [0, 2, 1, 4, 3, 8, 8, 8]


def test_probability_policy_drops_the_least_likely():
    plan = plan_dispatch(EXPERT_A, TOKEN_A, PRIORITY_A, n_experts=4, capacity=2)
    # expert 0 by prob: a6 .95, a0 .9, a2 .5, a5 .4; expert 1: a4 .6, a1 .1, a7 .05.
    assert plan.order_A.tolist() == [6, 0, 2, 5, 4, 1, 7, 3]
    assert plan.slot_A.tolist() == [1, 1, 2, 0, 0, 3, 0, 2]
    assert plan.kept_A.tolist() == [True, True, False, True, True, False, True, False]
    assert int(plan.dropped) == 3
    assert plan.row_A.tolist() == [1, 3, 8, 4, 2, 8, 0, 8]


def test_probability_ties_keep_assignment_order():
    expert_A = torch.tensor([1, 1, 1, 1])
    plan = plan_dispatch(expert_A, torch.arange(4), torch.tensor([0.5, 0.7, 0.5, 0.7]), n_experts=2, capacity=3)
    assert plan.order_A.tolist() == [1, 3, 0, 2]
    assert plan.kept_A.tolist() == [True, True, False, True]


def test_send_counts_dropless_follow_expert_owners():
    # E = 4 experts; counts per expert [4, 3, 1, 0].
    ep2 = plan_dispatch(EXPERT_A, TOKEN_A, None, n_experts=4, capacity=None, ep_size=2)
    assert ep2.send_counts_P.tolist() == [7, 1]  # rank 0 owns experts 0-1, rank 1 experts 2-3
    ep4 = plan_dispatch(EXPERT_A, TOKEN_A, None, n_experts=4, capacity=None, ep_size=4)
    assert ep4.send_counts_P.tolist() == [4, 3, 1, 0]


def test_send_counts_with_capacity_are_the_fixed_buffer():
    ep2 = plan_dispatch(EXPERT_A, TOKEN_A, None, n_experts=4, capacity=3, ep_size=2)
    assert ep2.send_counts_P.tolist() == [6, 6]  # C * E / P rows per rank, padding included
    ep4 = plan_dispatch(EXPERT_A, TOKEN_A, None, n_experts=4, capacity=3, ep_size=4)
    assert ep4.send_counts_P.tolist() == [3, 3, 3, 3]


def test_ep_size_must_divide_experts():
    with pytest.raises(ValueError, match=r"n_experts \(4\) must be a multiple of ep_size \(3\)"):
        plan_dispatch(EXPERT_A, TOKEN_A, None, n_experts=4, capacity=None, ep_size=3)


def test_expert_choice_layout_keeps_everything_at_its_capacity():
    # Expert-major A = E * C with every expert holding exactly C tokens: nothing to drop.
    token_EC = torch.tensor([[3, 0], [1, 3], [2, 0]])
    expert_A = torch.arange(3).repeat_interleave(2)
    plan = plan_dispatch(expert_A, token_EC.reshape(-1), None, n_experts=3, capacity=2)
    assert plan.kept_A.all() and int(plan.dropped) == 0
    assert plan.slot_A.tolist() == [1, 0, 0, 1, 1, 0]  # within an expert, token order


def test_capacity_mode_runs_on_meta():
    """No host reads in capacity mode: the full-size check of big models depends on it."""
    expert_A = torch.randint(0, 64, (4096 * 8,), device="meta")
    token_A = torch.arange(4096, device="meta").repeat_interleave(8)
    priority_A = torch.rand(4096 * 8, device="meta")
    for priority in (None, priority_A):
        plan = plan_dispatch(expert_A, token_A, priority, n_experts=64, capacity=640, ep_size=8)
        assert plan.row_A.shape == (4096 * 8,) and plan.send_counts_P.shape == (8,)


def oracle(expert, token, priority, n_experts, capacity):
    """Obvious per-expert ranking: (token, a) or (-priority, a), first C kept."""
    slot, kept = {}, set()
    for e in range(n_experts):
        mine = [a for a in range(len(expert)) if expert[a] == e]
        mine.sort(key=(lambda a: (token[a], a)) if priority is None else (lambda a: (-priority[a], a)))
        for rank, a in enumerate(mine):
            slot[a] = rank
            if capacity is None or rank < capacity:
                kept.add(a)
    return [slot[a] for a in range(len(expert))], kept


@settings(max_examples=60, deadline=None)
@given(
    n_tokens=st.integers(1, 24),
    n_experts=st.sampled_from([1, 2, 4, 8]),
    capacity=st.one_of(st.none(), st.integers(1, 6)),
    use_priority=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_oracle(n_tokens, n_experts, capacity, use_priority, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(2, n_experts)
    expert_TK = torch.rand(n_tokens, n_experts, generator=gen).topk(k, dim=1).indices  # distinct per token
    expert_A = expert_TK.reshape(-1)
    token_A = torch.arange(n_tokens).repeat_interleave(k)
    # Coarse priorities so that ties happen and their order is checked too.
    priority_A = (torch.randint(0, 4, (n_tokens * k,), generator=gen) / 4.0) if use_priority else None
    plan = plan_dispatch(expert_A, token_A, priority_A, n_experts=n_experts, capacity=capacity)
    priority = None if priority_A is None else priority_A.tolist()
    slot, kept = oracle(expert_A.tolist(), token_A.tolist(), priority, n_experts, capacity)
    assert plan.slot_A.tolist() == slot
    assert set(torch.nonzero(plan.kept_A).flatten().tolist()) == kept
    assert int(plan.dropped) == len(expert_A) - len(kept)
    assert plan.tokens_per_expert_E.tolist() == count_per_expert(expert_A, n_experts).tolist()
    # The sorted order lists each expert's group in slot order.
    assert plan.slot_A[plan.order_A].tolist() == [s for e in range(n_experts) for s in sorted(
        s for a, s in enumerate(slot) if expert_A[a] == e)]
