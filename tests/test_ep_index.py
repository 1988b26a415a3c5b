"""Expert-parallel index math, checked without a process group by simulating the P ranks."""

from __future__ import annotations

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


def test_shuffle_routes_realise_the_global_permutation():
    n_ranks, tokens = 4, 6
    generator = torch.Generator().manual_seed(1)
    destination_G = torch.randperm(n_ranks * tokens, generator=generator)
    global_tokens = torch.arange(n_ranks * tokens)  # token g carries value g
    routes = [shuffle_routes(destination_G, rank=r, n_ranks=n_ranks, tokens_per_rank=tokens) for r in range(n_ranks)]
    # Simulated all-to-all: chunks each rank sends, split by destination rank.
    sent = []
    for r, route in enumerate(routes):
        mine = global_tokens[r * tokens : (r + 1) * tokens][route.send_order]
        sent.append(list(torch.split(mine, route.send_splits)))
    for q, route in enumerate(routes):
        assert route.recv_splits == [len(sent[p][q]) for p in range(n_ranks)]
        received = torch.cat([sent[p][q] for p in range(n_ranks)])
        shuffled = torch.empty_like(received).index_copy(0, route.recv_position, received)
        expected = torch.empty(n_ranks * tokens, dtype=torch.long).index_copy(0, destination_G, global_tokens)
        assert torch.equal(shuffled, expected[q * tokens : (q + 1) * tokens])


def test_bytes_to_others_excludes_own_chunk():
    assert bytes_to_others([3, 5, 7], my_rank=1, row_bytes=4) == (3 + 7) * 4
