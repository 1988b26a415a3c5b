"""Expert-parallel index math, checked without a process group by simulating the P ranks."""

from __future__ import annotations

import pytest
import torch

from moespec.distributed.all_to_all import bytes_to_others
from moespec.distributed.expert_parallel import regroup_by_local_expert, shuffle_routes


def test_regroup_orders_rows_by_local_expert_then_source():
    # 2 sources, 3 local experts. Source 0 sent [2, 0, 1] rows, source 1 sent [1, 2, 0].
    counts_PL = torch.tensor([[2, 0, 1], [1, 2, 0]])
    # Arrival order labels (source, expert): s0e0 s0e0 s0e2 | s1e0 s1e1 s1e1
    labels = ["00", "00", "02", "10", "11", "11"]
    order = regroup_by_local_expert(counts_PL).tolist()
    assert [labels[i] for i in order] == ["00", "00", "10", "11", "11", "02"]


def test_regroup_random_counts_is_a_permutation_grouping_experts():
    generator = torch.Generator().manual_seed(0)
    counts_PL = torch.randint(0, 5, (4, 3), generator=generator)
    order = regroup_by_local_expert(counts_PL)
    assert sorted(order.tolist()) == list(range(int(counts_PL.sum())))
    expert_of_row = torch.arange(3).repeat(4).repeat_interleave(counts_PL.flatten())
    assert torch.equal(expert_of_row[order], torch.sort(expert_of_row).values)


def test_shuffle_routes_send_exactly_t_over_p_to_every_rank():
    n_ranks, tokens = 4, 8
    routes = [shuffle_routes(7, rank=r, n_ranks=n_ranks, tokens_per_rank=tokens) for r in range(n_ranks)]
    global_tokens = torch.arange(n_ranks * tokens)  # token g = r*T + j carries value g
    sent = [list(torch.split(global_tokens[r * tokens : (r + 1) * tokens][route.send_order_T], route.splits))
            for r, route in enumerate(routes)]  # fmt: skip
    received = [torch.cat([sent[p][q] for p in range(n_ranks)]) for q in range(n_ranks)]  # simulated all-to-all
    for q, route in enumerate(routes):
        assert sorted(route.send_order_T.tolist()) == list(range(tokens))  # a permutation of my tokens
        assert route.splits == [tokens // n_ranks] * n_ranks
        assert received[q].shape[0] == tokens
        for p in range(n_ranks):  # T/P from every source
            assert ((received[q] // tokens) == p).sum() == tokens // n_ranks
    assert sorted(torch.cat(received).tolist()) == global_tokens.tolist()  # every token lands once
    assert bytes_to_others(routes[0].splits, my_rank=0, row_bytes=2) == tokens * (n_ranks - 1) // n_ranks * 2
    # The way back: rank q returns its group in arrival order, p puts rows by its send order.
    back = [torch.split(received[q], routes[q].splits) for q in range(n_ranks)]
    for p, route in enumerate(routes):
        home = torch.cat([back[q][p] for q in range(n_ranks)])
        restored = torch.empty_like(home).index_copy(0, route.send_order_T, home)
        assert torch.equal(restored, global_tokens[p * tokens : (p + 1) * tokens])


def test_shuffle_routes_are_the_same_draw_on_every_rank_and_new_per_seed():
    a = shuffle_routes(3, rank=1, n_ranks=2, tokens_per_rank=6)
    assert torch.equal(a.send_order_T, shuffle_routes(3, rank=1, n_ranks=2, tokens_per_rank=6).send_order_T)
    assert not torch.equal(a.send_order_T, shuffle_routes(4, rank=1, n_ranks=2, tokens_per_rank=6).send_order_T)


def test_shuffle_routes_refuse_tokens_not_divisible_by_ranks():
    with pytest.raises(ValueError, match=r"tokens per rank \(6\) to be a multiple of the expert-parallel degree \(4\)"):
        shuffle_routes(0, rank=0, n_ranks=4, tokens_per_rank=6)


def test_bytes_to_others_excludes_own_chunk():
    assert bytes_to_others([3, 5, 7], my_rank=1, row_bytes=4) == (3 + 7) * 4
