"""The auction's bidding round (`auction._bid_round`) in numpy, for CPU tensors, and its
augmenting paths (`augment_all`) for every device.

Why a second copy of the round. A round is about 45 small array ops on [U, E] and [J, C]
tables. On CPU a torch op costs 5-15 us of dispatch before it does anything, a numpy op 1-3 us,
and at BASE's shapes (T 2048-8192, E 16-256) most ops touch a few thousand numbers: the
round's time was its dispatch. Timed at T 4096, E 256 (`bench/base_solver.py`), the rounds
were ~55% of a 40 ms solve. The arrays here are numpy views of the caller's CPU tensors
(`Tensor.numpy()` shares memory), so the round updates the same holder table, token map and
prices that the rest of the solver (releases) reads in torch. On other devices the torch round
runs where the scores are, and the augmenting paths run here on host copies.

It is the same round, step for step: the same first-maximum argmax, a stable sort by target,
incumbents before bidders, ties by column; `np.partition` gives the M-th largest willingness as
`topk` does; the float32 sums are taken in the same order. `tests/test_auction.py` asserts that
the two rounds give identical assignments and prices.

Where setup.py built them, compiled kernels (`auction_kernels`: `_auction_c.c`, `_auction_paths.h`)
run this round and `augment_all` instead, to the bit the same and 3-5x faster whole solves
(`bench/base_solver.py --rounds`); numpy is then only the fallback and the reference the tests
hold them to.
"""

from __future__ import annotations

import numpy as np

from moespec.model import auction_kernels

# Tests and benches compare the torch round on CPU with this one by switching it off.
HOST_ROUNDS = {"enabled": True}


def unassigned(expert_T: np.ndarray) -> np.ndarray:
    """The tokens without an expert, ascending (`auction._unassigned`)."""
    return np.flatnonzero(expert_T < 0)


def _willingness_of(scores_NE: np.ndarray, value_NE: np.ndarray, expert_N: np.ndarray, eps: float) -> np.ndarray:
    """`auction._willingness_of`: value_NE is overwritten."""
    rows_N = np.arange(expert_N.size)
    own_N = scores_NE[rows_N, expert_N]
    value_NE[rows_N, expert_N] = -np.inf
    return own_N - value_NE.max(axis=1) + np.asarray(eps, dtype=scores_NE.dtype)


def bid_round(
    scores_TE: np.ndarray, price_E: np.ndarray, holder_EM: np.ndarray,
    expert_T: np.ndarray, bidder_U: np.ndarray, eps: float,
) -> None:
    """`auction._bid_round` on numpy views; updates holder_EM, expert_T and price_E in place."""
    E, M = holder_EM.shape
    U = bidder_U.size
    scores_UE = scores_TE if U == scores_TE.shape[0] else scores_TE.take(bidder_U, axis=0)  # the bidders' rows, gathered once
    value_UE = scores_UE - price_E
    target_U = value_UE.argmax(axis=1)  # first maximum
    bid_U = _willingness_of(scores_UE, value_UE, target_U, eps)

    # The contested experts' candidates as [J, C]: M holder slots, then bids in token order.
    bids_E = np.bincount(target_U, minlength=E)
    contested_J = np.flatnonzero(bids_E)
    J = contested_J.size
    row_E = np.zeros(E, dtype=np.int64)
    row_E[contested_J] = np.arange(J)
    by_target_U = np.argsort(target_U, kind="stable")
    target_sorted_U = target_U[by_target_U]
    first_bid_E = np.cumsum(bids_E) - bids_E
    column_U = M + np.arange(U) - first_bid_E[target_sorted_U]
    row_U = row_E[target_sorted_U]
    C = M + int(bids_E.max())
    token_JC = np.full((J, C), -1, dtype=np.int64)
    token_JC[:, :M] = holder_EM[contested_J]
    token_JC[row_U, column_U] = bidder_U[by_target_U]
    willing_JC = np.full((J, C), -np.inf, dtype=price_E.dtype)
    willing_JC[row_U, column_U] = bid_U[by_target_U]
    holder_JM = token_JC[:, :M]
    held_JM = holder_JM >= 0
    holder_N = holder_JM[held_JM]  # holders bid again at today's prices
    scores_NE = scores_TE.take(holder_N, axis=0)
    expert_N = np.broadcast_to(contested_J[:, None], (J, M))[held_JM]
    willing_JC[:, :M][held_JM] = _willingness_of(scores_NE, scores_NE - price_E, expert_N, eps)

    # Keep the M most willing: all above the M-th value, then ties in column order.
    kth_J = np.partition(willing_JC, C - M, axis=1)[:, C - M]  # the M-th largest
    real_JC = token_JC >= 0
    above_JC = willing_JC > kth_J[:, None]
    tie_JC = real_JC & (willing_JC == kth_J[:, None])
    room_J = M - above_JC.sum(axis=1)
    keep_JC = above_JC | (tie_JC & (np.cumsum(tie_JC, axis=1) <= room_J[:, None]))

    new_holder_JM = np.full((J, M), -1, dtype=np.int64)
    row_K, column_K = np.nonzero(keep_JC)  # [K] kept candidates, row-major
    slot_K = np.cumsum(keep_JC, axis=1)[row_K, column_K] - 1
    new_holder_JM[row_K, slot_K] = token_JC[row_K, column_K]
    holder_EM[contested_J] = new_holder_JM
    expert_T[token_JC[real_JC]] = -1
    expert_T[token_JC[row_K, column_K]] = contested_J[row_K]
    full_J = keep_JC.sum(axis=1) == M  # kth_J is then the least willing kept token
    price_E[contested_J[full_J]] = np.maximum(price_E[contested_J[full_J]], kth_J[full_J])


def augment_all(
    scores_TE: np.ndarray, price_E: np.ndarray, holder_EM: np.ndarray,
    expert_T: np.ndarray, eps: float, shortest_paths,
) -> tuple[int, int]:
    """Place every unassigned token by shortest augmenting paths over the E experts
    (`auction._augment_all` has the method), several per path search. Every device runs this
    one, on the host (`auction._augment_all` copies to it). Returns (tokens placed, searches).

    One search (Bellman-Ford from the unassigned tokens) gives distances d_E and a tree of
    shortest paths. Raising price_E by max(D - d_E, 0) keeps every reduced cost >= 0 for any
    level D (the same four cases as for D = the nearest free expert's distance), and makes
    every tree edge into an expert with d <= D tight. So with D at the V-th nearest free slot
    (V unassigned tokens), the tree paths to those V slots are all augmenting paths at once.
    They may share experts, and a path changes the holders of the experts on it. So after the
    first, a path is taken only if it passes through no expert an earlier path of this search
    changed (its moves are then as searched; each is checked to lose its token no value, so it
    stays within eps of its best), its sink still has a free slot, and a token not yet placed
    is within eps of its best at the path's first expert (the first such enters). The others
    wait for the next search. Checking shared paths against refreshed gaps instead placed no
    more tokens per search (the shared experts' next-cheapest holders would lose value) and
    cost a gap refresh per try.

    Why: a group padded with constant filler rows (T % E != 0, `balanced_expert_index`) left
    up to E - 1 tokens indifferent between experts. They all bid for the same cheapest expert
    and were placed one search each: at T 4001, E 160, 145 searches, 58 ms of the auction
    against 25 ms at T 4000 (bench/base_solver.py --filler). Timed at T 4096, E 256 before
    that, one search and its path were dispatch-bound in torch (~30 small ops besides
    `shortest_paths`): numpy on the host for that reason too."""
    if auction_kernels.available():  # compiled (_auction_paths.h): this, to the bit
        return auction_kernels.augment_all(scores_TE, price_E, holder_EM, expert_T, eps)
    E, M = holder_EM.shape
    eps_c = np.asarray(eps, dtype=scores_TE.dtype)
    gap_EE = _move_gaps(scores_TE, holder_EM, np.arange(E))
    placed = searches = 0
    while True:
        unassigned_V = np.flatnonzero(expert_T < 0)  # [V]
        if unassigned_V.size == 0:
            return placed, searches
        cost_EE = gap_EE + price_E - price_E[:, None] + eps_c  # [j, k]
        np.maximum(cost_EE, 0, out=cost_EE)
        scores_VE = scores_TE.take(unassigned_V, axis=0)
        value_VE = scores_VE - price_E
        regret_VE = value_VE.max(axis=1, keepdims=True) - value_VE
        source_E = regret_VE.argmin(axis=0)  # first minimum
        dist_E, pred = shortest_paths(cost_EE, regret_VE[source_E, np.arange(E)])
        searches += 1
        free_E = (holder_EM < 0).sum(axis=1)
        reach_E = np.where(free_E > 0, dist_E, np.inf)
        by_distance = np.argsort(reach_E, kind="stable")
        sink_S = np.repeat(by_distance, free_E[by_distance])[: unassigned_V.size]  # nearest free slots first
        sink_S = sink_S[np.isfinite(reach_E[sink_S])]
        price_E += np.maximum(dist_E[sink_S[-1]] - dist_E, 0)
        value_VE = scores_VE - price_E  # at the raised prices
        regret_VE = value_VE.max(axis=1, keepdims=True) - value_VE
        waiting_V = np.ones(unassigned_V.size, dtype=bool)
        stale, free = [False] * E, free_E.tolist()  # experts a path of this search changed; free slots
        for n, sink in enumerate(sink_S.tolist()):
            if free[sink] == 0:
                continue
            path, node = [sink], pred[sink]  # k_L = sink, back to k_0
            while node >= 0 and not stale[node]:  # later paths only through unchanged experts:
                path.append(node)  # their moves are as searched
                node = pred[node]
                if len(path) > E:
                    raise RuntimeError("auction: cycle in the shortest-path tree")
            if node >= 0:  # stopped at a changed expert
                continue
            path_P = np.array(path[::-1], dtype=np.int64)
            if n == 0:  # the nearest free slot's path, as one search alone would take
                entering = source_E[path_P[0]]
            else:
                fits_V = waiting_V & (regret_VE[:, path_P[0]] <= eps_c)
                moves_ok = (gap_EE[path_P[:-1], path_P[1:]] + price_E[path_P[1:]] - price_E[path_P[:-1]] <= 0).all()
                if not (moves_ok and fits_V.any()):
                    continue
                entering = int(fits_V.argmax())  # the first that fits
            slot_P = np.append(_cheapest_slots(scores_TE, holder_EM, path_P), np.flatnonzero(holder_EM[sink] < 0)[0])
            arriving_P = np.concatenate([unassigned_V[[entering]], holder_EM[path_P[:-1], slot_P[:-1]]])
            holder_EM[path_P, slot_P] = arriving_P
            expert_T[arriving_P] = path_P
            for k in path:
                stale[k] = True
            waiting_V[entering] = False
            free[sink] -= 1
            placed += 1
        stale_R = np.flatnonzero(stale)  # their move gaps, in one call
        gap_EE[stale_R] = _move_gaps(scores_TE, holder_EM[stale_R], stale_R)


def _move_gaps(scores_TE: np.ndarray, holder_RM: np.ndarray, expert_R: np.ndarray) -> np.ndarray:
    """For rows R of the holder table (expert_R[r] holds holder_RM[r]): [R, E] the least score
    lost moving one of its holders to each expert, `min_m s[t_m, e_r] - s[t_m, k]`; free slots
    never move (+inf). Which holder attains it is found only for the few edges a path takes
    (`_cheapest_slots`): finding it for all [R, M, E] took 2.5 of a 3.8 ms call at R 256,
    M 16, E 256."""
    R, M = holder_RM.shape
    scores_RME = scores_TE.take(np.maximum(holder_RM, 0), axis=0)  # [R, M, E], a copy
    own_RM = scores_RME[np.arange(R)[:, None], np.arange(M), expert_R[:, None]]
    gap_RME = np.subtract(own_RM[:, :, None], scores_RME, out=scores_RME)
    gap_RME[holder_RM < 0] = np.inf
    return gap_RME.min(axis=1)


def _cheapest_slots(scores_TE: np.ndarray, holder_EM: np.ndarray, path_P: np.ndarray) -> np.ndarray:
    """[P - 1] for each move j -> k of the path, the slot of j whose holder loses least moving
    to k: the holder `_move_gaps` took gap [j, k] from (the same float32 differences, first on
    ties; j's holders have not changed since, or the path would not pass through j)."""
    holder_PM = holder_EM[path_P[:-1]]
    held_PM = np.maximum(holder_PM, 0)
    gap_PM = scores_TE[held_PM, path_P[:-1, None]] - scores_TE[held_PM, path_P[1:, None]]
    gap_PM[holder_PM < 0] = np.inf
    return gap_PM.argmin(axis=1)
