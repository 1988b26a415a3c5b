/* The BASE auction's bidding round and its releases, compiled (loaded with ctypes by
 * moespec/model/auction_kernels.py; built by setup.py, optional: without a C compiler the
 * numpy round in auction_host.py runs instead).
 *
 * Why compiled. A numpy round is ~45 array ops; at BASE's shapes (T 2048-8192, E 16-256) most
 * touch a few thousand numbers, so the round's time was its dispatch: 10-21 ms of a 16-28 ms
 * solve on bench/moe_layer.py's BASE layers. Here a round is one pass over the bidders' rows
 * and one over the contested experts' holders.
 *
 * It is the numpy round (auction_host.bid_round), step for step, to the bit: the same first
 * maximum, the same float sums in the same order (build with -ffp-contract=off, never
 * -ffast-math), bidders grouped by target in token order after the M holder slots, the M-th
 * largest willingness, ties kept in column order, kept tokens packed into the slots in that
 * order. tests/test_auction_kernels.py asserts identical assignments, prices and round counts.
 *
 * The file is its own template: it includes itself twice, once for float and once for double
 * (the auction computes in float64 for float64 scores or a tiny eps), and with each the
 * augmenting paths of _auction_paths.h. */
#ifndef KTYPE

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KTYPE float
#define K(name) name##_f32
#include "_auction_c.c"
#undef KTYPE
#undef K

#define KTYPE double
#define K(name) name##_f64
#include "_auction_c.c"
#undef KTYPE
#undef K

int moespec_auction_abi(void) { return 5; } /* bump when a signature changes */

#else /* the template, for one KTYPE */

/* The k-th smallest of a[0..n) (0-based); a is reordered. Wirth's selection: no allocation,
 * and equal values (the -inf of empty slots, tied bids) stop both scans, so it stays linear. */
static KTYPE K(kth_smallest)(KTYPE *a, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        KTYPE pivot = a[k];
        int64_t i = lo, j = hi;
        do {
            while (a[i] < pivot) i++;
            while (pivot < a[j]) j--;
            if (i <= j) {
                KTYPE swap = a[i];
                a[i] = a[j];
                a[j] = swap;
                i++;
                j--;
            }
        } while (i <= j);
        if (j < k) lo = i;
        if (k < i) hi = j;
    }
    return a[k];
}

/* The best value of a token's row among the experts other than j: max_{e != j} (row[e] - price[e]).
 * Cached per token: the expert o that attained it and bound_T, the best value then among the
 * experts other than j and o. Prices never fall within a solve, so no value rises: while o's
 * value is still >= bound, o attains the maximum, and it is the same float a scan would give.
 * Most holders bid again round after round with few of their alternatives repriced. */
static KTYPE K(best_other)(const KTYPE *row, const KTYPE *price_E, int64_t E, int64_t j,
                           int64_t t, int64_t *other_T, int64_t *own_T, KTYPE *bound_T)
{
    int64_t o = other_T[t];
    if (o >= 0 && own_T[t] == j) {
        KTYPE cached = row[o] - price_E[o];
        if (cached >= bound_T[t]) return cached;
    }
    KTYPE other = -INFINITY, next = -INFINITY;
    o = -1;
    for (int64_t e = 0; e < E; e++) {
        if (e == j) continue;
        KTYPE v = row[e] - price_E[e];
        if (v > other) {
            next = other;
            other = v;
            o = e;
        } else if (v > next) {
            next = v;
        }
    }
    other_T[t] = o;
    own_T[t] = j;
    bound_T[t] = next;
    return other;
}

/* One Jacobi round (auction._bid_round): every bidder bids for its best expert at today's
 * prices, each expert that receives bids keeps its M most willing among holders and bidders,
 * and a full expert's price rises to the M-th willingness. Updates holder_EM, expert_T and
 * price_E in place. Returns 0, or -1 if out of memory (nothing changed then). */
int K(moespec_bid_round)(const KTYPE *scores_TE, int64_t E, KTYPE *price_E, int64_t *holder_EM,
                         int64_t M, int64_t *expert_T, const int64_t *bidder_U, int64_t U, KTYPE eps,
                         int64_t *other_T, int64_t *own_T, KTYPE *bound_T)
{
    int64_t *target_U = malloc((size_t)(U > 0 ? U : 1) * sizeof(int64_t));
    KTYPE *bid_U = malloc((size_t)(U > 0 ? U : 1) * sizeof(KTYPE));
    int64_t *first_E = calloc((size_t)E + 1, sizeof(int64_t)); /* bids of expert e: [first_E[e], first_E[e+1]) */
    int64_t *by_target_U = malloc((size_t)(U > 0 ? U : 1) * sizeof(int64_t));
    int64_t max_bids = 0;
    if (!target_U || !bid_U || !first_E || !by_target_U) goto out_of_memory;

    /* The bids: first maximum of value = score - price, and the best of the others. */
    for (int64_t u = 0; u < U; u++) {
        const KTYPE *row = scores_TE + bidder_U[u] * E;
        KTYPE best = -INFINITY, second = -INFINITY, third = -INFINITY;
        int64_t target = 0, runner_up = -1;
        for (int64_t e = 0; e < E; e++) {
            KTYPE v = row[e] - price_E[e];
            if (v > best) {
                third = second;
                second = best;
                runner_up = target;
                best = v;
                target = e;
            } else if (v > second) {
                third = second;
                second = v;
                runner_up = e;
            } else if (v > third) {
                third = v;
            }
        }
        other_T[bidder_U[u]] = runner_up; /* the cache for the expert it bids for (best_other) */
        own_T[bidder_U[u]] = target;
        bound_T[bidder_U[u]] = third;
        KTYPE gap = row[target] - second;
        target_U[u] = target;
        bid_U[u] = gap + eps;
        first_E[target + 1]++;
    }
    for (int64_t e = 0; e < E; e++) {
        if (first_E[e + 1] > max_bids) max_bids = first_E[e + 1];
        first_E[e + 1] += first_E[e];
    }
    {
        int64_t *next_E = malloc((size_t)E * sizeof(int64_t));
        if (!next_E) goto out_of_memory;
        memcpy(next_E, first_E, (size_t)E * sizeof(int64_t));
        for (int64_t u = 0; u < U; u++) by_target_U[next_E[target_U[u]]++] = u; /* stable: token order */
        free(next_E);
    }

    /* Every contested expert's holders bid again at today's prices, before any price moves. */
    int64_t C = M + max_bids;
    KTYPE *holder_willing_EM = malloc((size_t)(E * M > 0 ? E * M : 1) * sizeof(KTYPE));
    KTYPE *willing_C = malloc((size_t)C * sizeof(KTYPE));
    KTYPE *sorted_C = malloc((size_t)C * sizeof(KTYPE));
    int64_t *token_C = malloc((size_t)C * sizeof(int64_t));
    if (!holder_willing_EM || !willing_C || !sorted_C || !token_C) {
        free(holder_willing_EM);
        free(willing_C);
        free(sorted_C);
        free(token_C);
        goto out_of_memory;
    }
    for (int64_t j = 0; j < E; j++) {
        if (first_E[j + 1] == first_E[j]) continue;
        for (int64_t m = 0; m < M; m++) {
            int64_t t = holder_EM[j * M + m];
            if (t < 0) {
                holder_willing_EM[j * M + m] = -INFINITY;
                continue;
            }
            const KTYPE *row = scores_TE + t * E;
            KTYPE gap = row[j] - K(best_other)(row, price_E, E, j, t, other_T, own_T, bound_T);
            holder_willing_EM[j * M + m] = gap + eps; /* auction._willingness */
        }
    }

    /* Each contested expert keeps the M most willing: all above the M-th, then ties in column
     * order (holder slots, then bids in token order); kept tokens fill the slots in that order. */
    for (int64_t j = 0; j < E; j++) {
        int64_t n_bids = first_E[j + 1] - first_E[j];
        if (n_bids == 0) continue;
        int64_t n = M + n_bids;
        for (int64_t m = 0; m < M; m++) {
            token_C[m] = holder_EM[j * M + m];
            willing_C[m] = holder_willing_EM[j * M + m];
        }
        for (int64_t b = 0; b < n_bids; b++) {
            int64_t u = by_target_U[first_E[j] + b];
            token_C[M + b] = bidder_U[u];
            willing_C[M + b] = bid_U[u];
        }
        memcpy(sorted_C, willing_C, (size_t)n * sizeof(KTYPE));
        KTYPE kth = K(kth_smallest)(sorted_C, n, n - M); /* the M-th largest */
        int64_t room = M;
        for (int64_t c = 0; c < n; c++) room -= willing_C[c] > kth;
        int64_t kept = 0;
        for (int64_t c = 0; c < n; c++) {
            int64_t t = token_C[c];
            if (t < 0) continue;
            int keep = willing_C[c] > kth || (willing_C[c] == kth && room-- > 0);
            if (keep) {
                holder_EM[j * M + kept++] = t;
                expert_T[t] = j;
            } else {
                expert_T[t] = -1;
            }
        }
        for (int64_t m = kept; m < M; m++) holder_EM[j * M + m] = -1;
        if (kept == M && kth > price_E[j]) price_E[j] = kth; /* full: kth is the least willing kept */
    }
    free(holder_willing_EM);
    free(willing_C);
    free(sorted_C);
    free(token_C);
    free(target_U);
    free(bid_U);
    free(first_E);
    free(by_target_U);
    return 0;

out_of_memory:
    free(target_U);
    free(bid_U);
    free(first_E);
    free(by_target_U);
    return -1;
}

/* At a tighter eps, unassign the held tokens that break eps-CS; prices stay
 * (auction._release_unhappy): own value < best value - eps, the best of all experts being the
 * larger of its own and best_other's. Slots of released tokens become -1 where they are (no
 * packing). unhappy_T is scratch [T]. */
void K(moespec_release_unhappy)(const KTYPE *scores_TE, int64_t T, int64_t E, const KTYPE *price_E,
                                int64_t *holder_EM, int64_t M, int64_t *expert_T, KTYPE eps, uint8_t *unhappy_T,
                                int64_t *other_T, int64_t *own_T, KTYPE *bound_T)
{
    for (int64_t t = 0; t < T; t++) {
        int64_t j = expert_T[t];
        unhappy_T[t] = 0;
        if (j < 0) continue;
        const KTYPE *row = scores_TE + t * E;
        KTYPE own = row[j] - price_E[j];
        KTYPE other = K(best_other)(row, price_E, E, j, t, other_T, own_T, bound_T);
        KTYPE best = other > own ? other : own;
        KTYPE bar = best - eps;
        if (own < bar) {
            unhappy_T[t] = 1;
            expert_T[t] = -1;
        }
    }
    for (int64_t s = 0; s < E * M; s++)
        if (holder_EM[s] >= 0 && unhappy_T[holder_EM[s]]) holder_EM[s] = -1;
}

#include "_auction_paths.h" /* the augmenting paths, for the same KTYPE */

#endif
