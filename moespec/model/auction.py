"""Balanced token-to-expert assignment for BASE layers (Lewis et al. 2021), by auction.

Shape legend: T tokens in one routing group, E experts, M = T // E slots per expert; U tokens
bidding in a round, J experts receiving bids, C = M + (most bids one expert got) candidate
columns, V unassigned tokens, P experts on an augmenting path.

The problem. Choose `expert_index_T` maximising `sum_t scores_TE[t, expert_index_T[t]]` such that
every expert receives exactly M tokens. It is a linear assignment problem between the T tokens
and the T = E * M expert slots; scipy solves it exactly on the [T, T] matrix with every expert
column repeated M times, in O(T^3) time. We work on the [T, E] matrix and E prices.

Why an auction "for similar objects" (Bertsekas & Castanon 1989), with one price per expert.
The M slots of an expert are interchangeable, so expert e has one price `price_E[e]` and a
token's value for it is `scores[t, e] - price_E[e]`. Priced slot by slot instead, bidders would
queue for the single cheapest slot and prices would creep up by `eps` per round (a price war
among identical objects). The invariant is eps-complementary slackness (eps-CS): every held
token is within `eps` of its best expert,

    scores[t, e(t)] - price_E[e(t)] >= max_e (scores[t, e] - price_E[e]) - eps.

Once every token is held every expert is full, and weak duality with the dual
`min sum_t max_e (scores[t, e] - price_E[e]) + M * sum_e price_E[e]` gives

    sum_t scores[t, expert_index[t]] >= optimum - T * eps.

One bidding round (Jacobi: all unassigned tokens bid at once, no loop per token or expert):
  1. A bidder's willingness to pay for its best expert j is the highest price at which j is
     still within eps of its second-best expert: `scores[t, j] - max_{e != j} value[t, e] + eps`
     (Bertsekas' bid `price_j + v1 - v2 + eps`).
  2. Each expert that receives bids recomputes the willingness of its current holders at the
     current prices ("proxy bidding") and keeps the M most willing of holders and bidders
     (ties: incumbents first, then bidders by token index). If full, its price becomes the
     M-th highest willingness, so every kept token satisfies eps-CS and the outbid ones now
     prefer another expert by at least eps. Without the proxy step an expert would evict one
     holder per bid and the evicted holder would bid straight back: M rounds per price step.
Prices never fall, so tokens held elsewhere keep eps-CS. The M-th highest willingness comes
from `topk` on an [J, C] table (holders, then bids), not from a sort of all candidates: float
sorts are the slowest op here on CPU.

Why epsilon scaling and an augmenting-path finish. With a fixed small eps the prices climb in
steps of about eps, so we bid first with a coarse eps and divide it by `_EPS_FACTOR`, keeping
the prices and releasing only the tokens that break eps-CS at the new eps. A coarse phase need
not finish: it only serves to get the prices close, so it stops once few tokens bid. In the
final phase the last few bidders each follow a long chain of evictions through the experts
(one hop per round) before reaching a free slot. There we switch to the successive shortest
augmenting path of the Hungarian method on the E-node expert graph (`_augment_all`; one
shortest-path search serves several paths, `auction_host.augment_all`); every augmentation
keeps eps-CS and places one token, so the solver always ends exactly balanced and within the
bound, and `max_rounds` only caps the bidding.

The epsilon rule (eps=None). Adding a constant to a token's row does not change the problem,
so we measure `spread = max_t (max_e scores[t, e] - min_e scores[t, e])` and take
`eps = spread / 4096`: the total is within `T * spread / 4096` of the optimum, i.e. on average
a token loses at most 1/4096 of the spread, whatever T is (on router-like scores the measured
gap is below 1e-5 of the total, bench/base_solver.py). The BASE authors' solver is far coarser:
one phase at eps = (max - min of all scores) / 50 (fairseq, clib/libbase/balanced_assignment.cpp).
A coarse eps was tried here (spread / 256: T 4096, E 256 in 18 ms against 28, two phases
against three, gap 9e-5) and dropped: the assignment is then one of many within the bound,
picked by the bidding's path, and float noise in the scores (a matmul's summation order on
another rank count) changes it. Expert-parallel BASE then trained differently from the same
model on one process (tests/test_distributed.py). At spread / 4096 the near-optimal
assignment is close to unique, and the two agree. The spec's `auction_eps` sets another. A spread of 0 means every row is
constant and every balanced assignment is optimal: we return the blocked one, t -> t // M. Rows are shifted to max 0 before solving,
so float32 keeps about `2**-24 * spread` of precision; an `eps` below `spread * 2**-16` is
computed in float64. The prices are the same for the shifted and the original scores.

Ties are broken by index everywhere (first maximal expert, incumbents before bidders, then
slot or token order) and only stable or order-free reductions are used: deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from moespec.model import auction_host, auction_kernels

# eps=None means eps = spread * _DEFAULT_EPS_FRACTION (module docstring).
_DEFAULT_EPS_FRACTION = 2.0**-12
# Epsilon scaling: the first phase bids with eps = spread * _EPS_START_FRACTION, and each phase
# divides eps by _EPS_FACTOR down to the final eps (spread/64, /1024, /4096 by default).
# Tuned on router-like scores, T=4096..16384, E=64..256 (bench/base_solver.py): finer starts
# make the first phase crawl, larger factors release more tokens at each new phase.
_EPS_START_FRACTION = 1.0 / 64.0
_EPS_FACTOR = 16.0
# A coarse phase hands over to the next once at most T * _COARSE_DONE_FRACTION tokens bid.
_COARSE_DONE_FRACTION = 1.0 / 16.0
# The final phase switches from bidding rounds to augmenting paths once at most
# _AUGMENT_BELOW tokens bid, or when the number of bidders has not fallen for _STALL_ROUNDS
# rounds: an augmentation costs about as much as a round and always places a token.
_AUGMENT_BELOW = 8
_STALL_ROUNDS = 3
# float32 keeps prices to about spread * 2**-24; smaller eps than this computes in float64.
_FLOAT32_EPS_FLOOR = 2.0**-16


@dataclass(frozen=True)
class AuctionResult:
    """What the auction found, with the numbers needed to state its guarantee."""

    expert_index_T: torch.Tensor  # [T] long: each expert exactly T // E times
    price_E: torch.Tensor  # [E] compute dtype: expert prices, a dual certificate (docstring)
    rounds: int  # Jacobi bidding rounds, all phases
    augmentations: int  # tokens placed by augmenting paths in the final phase
    searches: int  # shortest-path searches those paths took (several paths per search)
    phases: int  # epsilon-scaling phases
    eps: float  # final epsilon: the total is within T * eps of the optimum

    @property
    def optimality_bound(self) -> float:
        """Upper bound on `optimum - achieved total`."""
        return self.expert_index_T.numel() * self.eps


def balanced_assignment(
    scores_TE: torch.Tensor, *, eps: float | None = None, max_rounds: int = 10_000
) -> torch.Tensor:
    """Return expert_index_T (long, [T]) so that every expert gets exactly T // E tokens and
    sum_t scores[t, expert_index[t]] is maximal within T * eps (auction guarantee).

    Requires T % E == 0 (pad the group first). Runs under torch.no_grad on the device of
    `scores_TE`, any float dtype (computed in float32, or float64 for float64 input or a tiny
    eps). `eps=None` picks `spread / 4096` (module docstring); `max_rounds` caps the bidding
    rounds, after which augmenting paths finish the job, so the guarantee always holds.
    """
    return auction_assignment(scores_TE, eps=eps, max_rounds=max_rounds).expert_index_T


@torch.no_grad()
def auction_assignment(
    scores_TE: torch.Tensor, *, eps: float | None = None, max_rounds: int = 10_000,
    price_init_E: torch.Tensor | None = None,
) -> AuctionResult:
    """Like `balanced_assignment`, and returns the prices, round counts and the eps used.

    price_init_E: start from these prices (a BASE router's from its previous step) instead of
    zeros, with the same epsilon schedule. The auction is correct from any prices (every slot
    is filled at the end, and eps-CS gives the same bound); prices near the new optimum leave
    fewer tokens contested in each phase. Measured gain is small: 0.78-1.09x the cold time on
    router-like scores of fresh tokens each step (bench/base_solver.py --warm), since most
    rounds settle the new tokens, not the prices. If the argmax is already balanced under the
    prices, the first round places every token and each phase ends at once."""
    _check_arguments(scores_TE, eps, max_rounds)
    T, E = scores_TE.shape
    device = scores_TE.device
    if E == 1 or T == 0:  # nothing to choose
        return AuctionResult(
            expert_index_T=torch.zeros(T, dtype=torch.long, device=device),
            price_E=torch.zeros(E, dtype=torch.float32, device=device),
            rounds=0, augmentations=0, searches=0, phases=0, eps=0.0,  # exact: one way to assign
        )
    M = T // E
    wide = torch.float64 if scores_TE.dtype == torch.float64 else torch.float32
    work_TE, spread = _shifted_scores(scores_TE, wide)
    if spread == 0:  # every row constant: all balanced assignments tie, take the blocked one
        return AuctionResult(
            expert_index_T=torch.arange(T, device=device) // M,
            price_E=torch.zeros(E, dtype=wide, device=device),
            rounds=0, augmentations=0, searches=0, phases=0, eps=0.0,
        )
    eps_final = spread * _DEFAULT_EPS_FRACTION if eps is None else float(eps)
    if work_TE.dtype == torch.float32 and eps_final < spread * _FLOAT32_EPS_FLOOR:
        work_TE, _ = _shifted_scores(scores_TE, torch.float64)

    warm = price_init_E is not None and bool(torch.isfinite(price_init_E).all())
    if warm:
        price_E = price_init_E.detach().to(device=device, dtype=work_TE.dtype).clone()
        price_E -= price_E.min()  # only differences between prices matter
    else:
        price_E = torch.zeros(E, dtype=work_TE.dtype, device=device)
    holder_EM = torch.full((E, M), -1, dtype=torch.long, device=device)  # token in slot, or -1
    expert_T = torch.full((T,), -1, dtype=torch.long, device=device)  # holding expert, or -1
    eps_k = max(spread * _EPS_START_FRACTION, eps_final)
    rounds = augmentations = searches = phases = 0
    # On CPU the rounds run on the host, on numpy views of the same tensors (auction_host: dispatch cost).
    # Compiled where the kernels were built (auction_kernels), the same round to the bit.
    release = functools.partial(_release_unhappy, work_TE, price_E, holder_EM, expert_T)
    if device.type == "cpu" and auction_host.HOST_ROUNDS["enabled"]:
        arrays = (work_TE.numpy(), price_E.numpy(), holder_EM.numpy(), expert_T.numpy())
        bidders = functools.partial(auction_host.unassigned, arrays[3])
        bid_round = functools.partial(auction_host.bid_round, *arrays)
        augment_all = functools.partial(auction_host.augment_all, *arrays, shortest_paths=_shortest_paths)
        if auction_kernels.available():
            bid_round, release = auction_kernels.bind(*arrays)
    else:
        bidders = functools.partial(_unassigned, expert_T)
        bid_round = functools.partial(_bid_round, work_TE, price_E, holder_EM, expert_T)
        augment_all = functools.partial(_augment_all, work_TE, price_E, holder_EM, expert_T)
    while True:
        phases += 1
        final = eps_k <= eps_final
        bidders_history: list[int] = []
        while True:
            bidder_U = bidders()  # [U], ascending token index
            U = len(bidder_U)
            if U == 0:
                break
            if not final and (U <= T * _COARSE_DONE_FRACTION or rounds >= max_rounds):
                break
            stalled = len(bidders_history) >= _STALL_ROUNDS and bidders_history[-_STALL_ROUNDS] == U
            if final and (U <= _AUGMENT_BELOW or stalled or rounds >= max_rounds):
                placed, searched = augment_all(eps_k)
                augmentations, searches = augmentations + placed, searches + searched
                break
            bidders_history.append(U)
            bid_round(bidder_U, eps_k)
            rounds += 1
        if final:
            break
        eps_k = max(eps_k / _EPS_FACTOR, eps_final)
        if rounds >= max_rounds:  # out of rounds: straight to the final eps
            eps_k = eps_final
        release(eps_k)

    return AuctionResult(
        expert_index_T=expert_T, price_E=price_E, rounds=rounds,
        augmentations=augmentations, searches=searches, phases=phases, eps=eps_k,
    )


def _check_arguments(scores_TE: torch.Tensor, eps: float | None, max_rounds: int) -> None:
    if scores_TE.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores_TE.shape)}")
    T, E = scores_TE.shape
    if E == 0:
        raise ValueError("scores must have at least one expert column (E >= 1)")
    if T % E != 0:
        raise ValueError(
            f"balanced assignment needs T divisible by E: T={T} tokens, E={E} experts "
            f"(T % E = {T % E}); pad the routing group to a multiple of E"
        )
    if not scores_TE.is_floating_point():
        raise ValueError(f"scores must be a float tensor, got {scores_TE.dtype}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")


def _shifted_scores(scores_TE: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Scores in `dtype` with every row shifted to max 0, and the largest row spread."""
    work_TE = scores_TE.detach().to(dtype)
    work_TE = work_TE - work_TE.amax(dim=1, keepdim=True)
    spread = float(-work_TE.min())  # inf or nan if any score is
    if not spread < float("inf"):
        raise ValueError("scores contain inf or nan; the auction needs finite affinities")
    return work_TE, spread


def _willingness(
    scores_TE: torch.Tensor, price_E: torch.Tensor, token_N: torch.Tensor,
    expert_N: torch.Tensor, eps: float,
) -> torch.Tensor:
    """Highest price at which expert_N[n] stays within eps of token_N[n]'s best other expert:
    `scores[t, j] - max_{e != j} (scores[t, e] - price_E[e]) + eps`, shape [N]."""
    scores_NE = scores_TE.index_select(0, token_N)
    return _willingness_of(scores_NE, scores_NE - price_E, expert_N, eps)


def _willingness_of(scores_NE: torch.Tensor, value_NE: torch.Tensor, expert_N: torch.Tensor, eps: float) -> torch.Tensor:
    """`_willingness` from the rows' scores and values (value_NE is overwritten)."""
    value_NE.scatter_(1, expert_N.unsqueeze(1), float("-inf"))
    return scores_NE.gather(1, expert_N.unsqueeze(1)).squeeze(1) - value_NE.amax(dim=1) + eps


def _unassigned(expert_T: torch.Tensor) -> torch.Tensor:
    return (expert_T < 0).nonzero().squeeze(1)


def _bid_round(
    scores_TE: torch.Tensor, price_E: torch.Tensor, holder_EM: torch.Tensor,
    expert_T: torch.Tensor, bidder_U: torch.Tensor, eps: float,
) -> None:
    """One Jacobi round: all bidders bid for their best expert, each expert that receives bids
    keeps its M most willing tokens among holders and bidders, and reprices if full."""
    E, M = holder_EM.shape
    device = holder_EM.device
    scores_UE = scores_TE.index_select(0, bidder_U)  # the bidders' rows, gathered once
    value_UE = scores_UE - price_E
    target_U = value_UE.argmax(dim=1)  # first maximum
    bid_U = _willingness_of(scores_UE, value_UE, target_U, eps)

    # Lay the candidates of the J contested experts out as [J, C]: M holder slots, then the
    # bids in token order (a stable sort by expert; integer sorts are cheap).
    bids_E = torch.bincount(target_U, minlength=E)
    contested_J = bids_E.nonzero().squeeze(1)
    J = contested_J.numel()
    row_E = torch.zeros(E, dtype=torch.long, device=device)
    row_E[contested_J] = torch.arange(J, device=device)
    by_target_U = torch.sort(target_U, stable=True).indices
    target_sorted_U = target_U[by_target_U]
    first_bid_E = torch.cumsum(bids_E, 0) - bids_E  # position of an expert's first bid
    column_U = M + torch.arange(bidder_U.numel(), device=device) - first_bid_E[target_sorted_U]
    C = M + int(bids_E.max())
    token_JC = torch.full((J, C), -1, dtype=torch.long, device=device)
    token_JC[:, :M] = holder_EM[contested_J]
    token_JC[row_E[target_sorted_U], column_U] = bidder_U[by_target_U]
    willing_JC = torch.full((J, C), float("-inf"), dtype=price_E.dtype, device=device)
    willing_JC[row_E[target_sorted_U], column_U] = bid_U[by_target_U]
    held_JM = token_JC[:, :M] >= 0
    willing_JC[:, :M][held_JM] = _willingness(  # holders bid again at today's prices
        scores_TE, price_E, token_JC[:, :M][held_JM],
        contested_J.unsqueeze(1).expand(J, M)[held_JM], eps,
    )

    # Keep the M most willing: all above the M-th value, then ties in column order.
    kth_J = willing_JC.topk(M, dim=1).values[:, -1]
    real_JC = token_JC >= 0
    above_JC = willing_JC > kth_J.unsqueeze(1)
    tie_JC = real_JC & (willing_JC == kth_J.unsqueeze(1))
    room_J = M - above_JC.sum(dim=1)
    keep_JC = above_JC | (tie_JC & (torch.cumsum(tie_JC, dim=1) <= room_J.unsqueeze(1)))

    new_holder_JM = torch.full((J, M), -1, dtype=torch.long, device=device)
    row_K, column_K = keep_JC.nonzero(as_tuple=True)  # [K] kept candidates
    slot_K = torch.cumsum(keep_JC, dim=1)[row_K, column_K] - 1
    new_holder_JM[row_K, slot_K] = token_JC[row_K, column_K]
    holder_EM[contested_J] = new_holder_JM
    expert_T[token_JC[real_JC]] = -1
    expert_T[token_JC[row_K, column_K]] = contested_J[row_K]
    full_J = keep_JC.sum(dim=1) == M  # kth_J is then the least willing kept token
    price_E[contested_J[full_J]] = torch.maximum(price_E[contested_J[full_J]], kth_J[full_J])


def _release_unhappy(
    scores_TE: torch.Tensor, price_E: torch.Tensor, holder_EM: torch.Tensor,
    expert_T: torch.Tensor, eps: float,
) -> None:
    """At a tighter eps, unassign the held tokens that break eps-CS; prices stay. Compared with
    the best of all experts, not of the others: where its own expert is the best, a token is
    happy either way (own - eps < own), so the masking of its own column is not needed."""
    value_TE = scores_TE - price_E
    own_value_T = value_TE.gather(1, expert_T.clamp(min=0).unsqueeze(1)).squeeze(1)
    unhappy_T = (expert_T >= 0) & (own_value_T < value_TE.amax(dim=1) - eps)
    holder_EM.masked_fill_(unhappy_T[holder_EM.clamp(min=0)] & (holder_EM >= 0), -1)
    expert_T.masked_fill_(unhappy_T, -1)


def _augment_all(
    scores_TE: torch.Tensor, price_E: torch.Tensor, holder_EM: torch.Tensor,
    expert_T: torch.Tensor, eps: float,
) -> tuple[int, int]:
    """Place every unassigned token, by shortest augmenting paths over the E experts.

    Edge j -> k: the cheapest holder t of j moves to k, at reduced cost
    `value[t, j] - value[t, k] + eps >= 0` (eps-CS). That cost splits into a price-free part
    and the prices, `(s[t, j] - s[t, k]) + price[k] - price[j] + eps`, so the matrix
    `gap_EE[j, k] = min over holders t of j of (s[t, j] - s[t, k])` is computed once and only
    the rows of the experts that paths changed are refreshed, once per search. The source edge to
    k is the unassigned token with the least regret `max_e value[u, e] - value[u, k]`.
    Bellman-Ford on the dense [E, E] costs (`_shortest_paths`) gives distances d_E; a path ends
    at an expert f with a free slot. Raising price_E by max(d_f - d_E, 0) keeps every reduced
    cost >= 0 (so eps-CS for every token: check the four cases of d_j, d_k against d_f), and
    the tokens that moved end exactly happy. `auction_host.augment_all` does it, several paths
    per search; on another device on host copies (a few searches, each synced to the host for
    its stopping tests anyway). Returns (tokens placed, searches)."""
    arrays = tuple(t.cpu().numpy().copy() for t in (scores_TE, price_E, holder_EM, expert_T))  # copies on CPU too: tests see the copy back
    placed, searches = auction_host.augment_all(*arrays, eps=eps, shortest_paths=_shortest_paths)
    for t, a in zip((price_E, holder_EM, expert_T), arrays[1:]):
        t.copy_(torch.from_numpy(a))
    return placed, searches


def _shortest_paths(cost_EE: np.ndarray, dist_E: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Bellman-Ford from the source distances dist_E over the dense [E, E] costs, relaxing
    only out of the F experts whose distance changed last time (all of them at first); a
    shortest path has at most E - 1 hops. Returns the distances and each expert's predecessor
    (-1: reached from the source). On the host, in numpy, on every device: about a dozen
    passes of a few ops on at most [E, E], each an order of magnitude cheaper there than a
    torch op's dispatch (and on a GPU each pass would sync on its stopping test anyway); the
    same float32 sums and first-minimum ties as torch, so the same paths."""
    E = dist_E.shape[0]
    dist_E = dist_E.copy()
    pred_E = np.full(E, -1, dtype=np.int64)
    frontier_F = np.arange(E)
    for hop in range(E):
        via_FE = dist_E[:, None] + cost_EE if hop == 0 else dist_E[frontier_F, None] + cost_EE[frontier_F]
        relaxed_E = via_FE.min(axis=0)
        better_B = np.flatnonzero(relaxed_E < dist_E)
        if better_B.size == 0:
            break
        pred_E[better_B] = frontier_F[via_FE[:, better_B].argmin(axis=0)]  # first minimum
        dist_E[better_B] = relaxed_E[better_B]
        frontier_F = better_B
    return dist_E, pred_E.tolist()
