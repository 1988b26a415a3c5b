/* The BASE auction's augmenting paths (auction_host.augment_all), compiled; loaded with ctypes by
 * moespec/model/auction_kernels.py beside the bidding round of _auction_c.c.
 *
 * Why compiled. After the rounds, the last tokens (and all filler rows of a group padded to a
 * multiple of E) are placed by shortest augmenting paths. In numpy a path was ~10 small array
 * ops and a search ~20 more besides Bellman-Ford: at E 112-200 with 80-100 filler rows, 6-10 ms
 * of a 9-16 ms solve, most of it dispatch.
 *
 * It is auction_host.augment_all step for step, to the bit (the same float sums in the same
 * order: build with -ffp-contract=off; first minima; the nearest free slots in a stable order;
 * a path taken only through experts no earlier path of its search changed); the method is in
 * that function's docstring. tests/test_auction_kernels.py asserts identical assignments,
 * prices and counts. A template for one KTYPE: _auction_c.c includes it once per float type,
 * so the two build as one library (setup.py compiles _auction_c.c alone). */

/* For rows R of the holder table (expert_R[r] holds holder_RM[r]): gap_RE[r, e] the least score
 * lost moving one of its holders to e, min_m s[t_m, expert_R[r]] - s[t_m, e]; +inf where a row
 * has no holder (auction_host._move_gaps, the same float differences). */
static void K(move_gaps)(const KTYPE *restrict scores_TE, int64_t E, const int64_t *holder_RM, int64_t R,
                          int64_t M, const int64_t *expert_R, KTYPE *restrict gap_RE)
{
    for (int64_t r = 0; r < R; r++) {
        KTYPE *restrict gap_E = gap_RE + r * E;
        for (int64_t e = 0; e < E; e++) gap_E[e] = INFINITY;
        for (int64_t m = 0; m < M; m++) {
            int64_t t = holder_RM[r * M + m];
            if (t < 0) continue;
            const KTYPE *restrict row = scores_TE + t * E;
            KTYPE own = row[expert_R[r]];
            for (int64_t e = 0; e < E; e++) {
                KTYPE g = own - row[e];
                gap_E[e] = g < gap_E[e] ? g : gap_E[e]; /* minps: exact, no NaN here */
            }
        }
    }
}

/* Bellman-Ford from the source distances dist_E over the dense [E, E] costs, relaxing only out
 * of the experts whose distance fell in the previous pass (auction._shortest_paths, pass for
 * pass: each pass reads the previous pass's distances, first minimum in frontier order).
 * Updates dist_E, fills pred_E (-1: from the source). scratch: [2 * E] int64. Returns 0, or -1
 * if out of memory. */
static int K(shortest_paths)(const KTYPE *restrict cost_EE, int64_t E, KTYPE *restrict dist_E,
                              int64_t *pred_E, int64_t *scratch)
{
    int64_t *frontier = scratch, *next = scratch + E;
    KTYPE *restrict relaxed_E = malloc((size_t)E * 2 * sizeof(KTYPE));
    if (!relaxed_E) return -1;
    KTYPE *restrict from_E = relaxed_E + E; /* the previous pass's distances */
    int64_t F = E;
    for (int64_t e = 0; e < E; e++) {
        frontier[e] = e;
        pred_E[e] = -1;
    }
    for (int64_t hop = 0; hop < E; hop++) {
        memcpy(from_E, dist_E, (size_t)E * sizeof(KTYPE));
        for (int64_t e = 0; e < E; e++) relaxed_E[e] = INFINITY;
        for (int64_t i = 0; i < F; i++) { /* the minima, unconditional stores: vectorized */
            KTYPE d = from_E[frontier[i]];
            const KTYPE *restrict cost_E = cost_EE + frontier[i] * E;
            for (int64_t e = 0; e < E; e++) {
                KTYPE v = d + cost_E[e];
                relaxed_E[e] = v < relaxed_E[e] ? v : relaxed_E[e];
            }
        }
        int64_t B = 0;
        for (int64_t e = 0; e < E; e++) {
            if (!(relaxed_E[e] < dist_E[e])) continue;
            for (int64_t i = 0; i < F; i++) { /* the first frontier expert attaining it */
                if (from_E[frontier[i]] + cost_EE[frontier[i] * E + e] == relaxed_E[e]) {
                    pred_E[e] = frontier[i];
                    break;
                }
            }
            dist_E[e] = relaxed_E[e];
            next[B++] = e;
        }
        if (B == 0) break;
        memcpy(frontier, next, (size_t)B * sizeof(int64_t));
        F = B;
    }
    free(relaxed_E);
    return 0;
}

/* np.maximum(x, 0) as numpy computes it (x >= 0 ? x : 0, so -0.0 stays -0.0). */
static inline KTYPE K(at_least_zero)(KTYPE x) { return x >= 0 ? x : 0; }

/* An expert and its reach, sorted ascending by reach, ties by expert: numpy's stable argsort.
 * The pair carries its own key, so the sort needs no global (ctypes lets threads run). */
typedef struct {
    KTYPE reach;
    int64_t expert;
} K(reach_t);

static int K(by_reach)(const void *a, const void *b)
{
    const K(reach_t) *x = a, *y = b;
    if (x->reach < y->reach) return -1;
    if (y->reach < x->reach) return 1;
    return (x->expert > y->expert) - (x->expert < y->expert);
}

/* regret_VE[v, e] = max_e' value[v, e'] - value[v, e], value = score - price, for the
 * unassigned tokens' rows (the numpy: value.max(axis=1, keepdims=True) - value). */
static void K(regrets)(const KTYPE *restrict scores_TE, int64_t E, const KTYPE *restrict price_E,
                       const int64_t *unassigned_V, int64_t V, KTYPE *restrict regret_VE)
{
    for (int64_t v = 0; v < V; v++) {
        const KTYPE *restrict row = scores_TE + unassigned_V[v] * E;
        KTYPE *restrict regret_E = regret_VE + v * E;
        KTYPE best = -INFINITY;
        for (int64_t e = 0; e < E; e++) {
            regret_E[e] = row[e] - price_E[e];
            best = regret_E[e] > best ? regret_E[e] : best;
        }
        for (int64_t e = 0; e < E; e++) regret_E[e] = best - regret_E[e];
    }
}

/* Place every unassigned token by shortest augmenting paths, several per search. Updates
 * price_E, holder_EM and expert_T; counts_2 gets (tokens placed, searches). Returns 0, -1 out of
 * memory, -2 no free slot reachable or a cycle in the path tree (never for a valid state). */
int K(moespec_augment_all)(const KTYPE *restrict scores_TE, int64_t T, int64_t E, KTYPE *restrict price_E,
                           int64_t *holder_EM, int64_t M, int64_t *expert_T, KTYPE eps, int64_t *counts_2)
{
    int status = -1;
    int64_t placed = 0, searches = 0;
    KTYPE *gap_EE = malloc((size_t)(E * E) * sizeof(KTYPE));
    KTYPE *cost_EE = malloc((size_t)(E * E) * sizeof(KTYPE));
    KTYPE *dist_E = malloc((size_t)(2 * E) * sizeof(KTYPE)), *reach_E = dist_E + E;
    KTYPE *regret_VE = NULL; /* [V, E], sized by the first search: V only falls */
    K(reach_t) *order_E = malloc((size_t)E * sizeof(K(reach_t)));
    int64_t *ints = malloc((size_t)(7 * E + 3 * (E + 1)) * sizeof(int64_t));
    int64_t *tokens = malloc((size_t)(2 * T) * sizeof(int64_t));
    uint8_t *flags = malloc((size_t)(E + T));
    if (!gap_EE || !cost_EE || !dist_E || !order_E || !ints || !tokens || !flags) goto done;
    int64_t *pred_E = ints, *scratch = ints + E, *source_E = ints + 3 * E, *free_E = ints + 4 * E;
    int64_t *all_E = ints + 5 * E, *left_E = ints + 6 * E;
    int64_t *back_P = ints + 7 * E, *path_P = back_P + (E + 1), *slot_P = path_P + (E + 1); /* P <= E + 1 */
    int64_t *arriving_P = back_P; /* back_P is spent once path_P is written */
    int64_t *unassigned_V = tokens, *sink_S = tokens + T; /* S <= V <= T */
    uint8_t *stale_E = flags, *waiting_V = flags + E;

    for (int64_t e = 0; e < E; e++) all_E[e] = e;
    K(move_gaps)(scores_TE, E, holder_EM, E, M, all_E, gap_EE);
    for (;;) {
        int64_t V = 0;
        for (int64_t t = 0; t < T; t++)
            if (expert_T[t] < 0) unassigned_V[V++] = t;
        if (V == 0) break;
        if (!regret_VE && !(regret_VE = malloc((size_t)(V * E) * sizeof(KTYPE)))) goto done;
        for (int64_t j = 0; j < E; j++) /* reduced costs ((gap + price[k]) - price[j]) + eps, at least 0 */
            for (int64_t k = 0; k < E; k++) {
                KTYPE c = gap_EE[j * E + k] + price_E[k];
                c = c - price_E[j];
                cost_EE[j * E + k] = K(at_least_zero)(c + eps);
            }
        K(regrets)(scores_TE, E, price_E, unassigned_V, V, regret_VE);
        for (int64_t e = 0; e < E; e++) { /* the least regret into each expert: first minimum */
            int64_t source = 0;
            for (int64_t v = 1; v < V; v++)
                if (regret_VE[v * E + e] < regret_VE[source * E + e]) source = v;
            source_E[e] = source;
            dist_E[e] = regret_VE[source * E + e];
        }
        if (K(shortest_paths)(cost_EE, E, dist_E, pred_E, scratch) != 0) goto done;
        searches++;
        for (int64_t e = 0; e < E; e++) {
            free_E[e] = 0;
            for (int64_t m = 0; m < M; m++) free_E[e] += holder_EM[e * M + m] < 0;
            reach_E[e] = free_E[e] > 0 ? dist_E[e] : INFINITY;
            order_E[e].reach = reach_E[e];
            order_E[e].expert = e;
        }
        qsort(order_E, (size_t)E, sizeof(K(reach_t)), K(by_reach));
        int64_t S = 0; /* the V nearest free slots, finite ones only */
        for (int64_t i = 0; i < E && S < V; i++) {
            int64_t e = order_E[i].expert;
            if (!isfinite(reach_E[e])) break;
            for (int64_t f = 0; f < free_E[e] && S < V; f++) sink_S[S++] = e;
        }
        if (S == 0) {
            status = -2;
            goto done;
        }
        KTYPE level = dist_E[sink_S[S - 1]];
        for (int64_t e = 0; e < E; e++) price_E[e] += K(at_least_zero)(level - dist_E[e]);
        K(regrets)(scores_TE, E, price_E, unassigned_V, V, regret_VE); /* at the raised prices */

        memset(stale_E, 0, (size_t)E);
        memset(waiting_V, 1, (size_t)V);
        memcpy(left_E, free_E, (size_t)E * sizeof(int64_t));
        for (int64_t n = 0; n < S; n++) {
            int64_t sink = sink_S[n];
            if (left_E[sink] == 0) continue;
            int64_t P = 0, node = pred_E[sink];
            back_P[P++] = sink; /* the sink back to k_0 */
            while (node >= 0 && !stale_E[node]) {
                back_P[P++] = node;
                node = pred_E[node];
                if (P > E) {
                    status = -2;
                    goto done;
                }
            }
            if (node >= 0) continue; /* through an expert an earlier path of this search changed */
            for (int64_t i = 0; i < P; i++) path_P[i] = back_P[P - 1 - i];
            int64_t entering = -1;
            if (n == 0) { /* the nearest free slot's path, as one search alone would take */
                entering = source_E[path_P[0]];
            } else {
                int moves_ok = 1;
                for (int64_t i = 0; i + 1 < P && moves_ok; i++) {
                    KTYPE g = gap_EE[path_P[i] * E + path_P[i + 1]] + price_E[path_P[i + 1]];
                    moves_ok = g - price_E[path_P[i]] <= 0;
                }
                if (!moves_ok) continue;
                for (int64_t v = 0; v < V && entering < 0; v++) /* the first that fits */
                    if (waiting_V[v] && regret_VE[v * E + path_P[0]] <= eps) entering = v;
                if (entering < 0) continue;
            }
            for (int64_t i = 0; i + 1 < P; i++) { /* each move's cheapest holder (_cheapest_slots) */
                int64_t j = path_P[i], k = path_P[i + 1], slot = 0;
                KTYPE least = INFINITY;
                for (int64_t m = 0; m < M; m++) {
                    int64_t t = holder_EM[j * M + m];
                    KTYPE g = t < 0 ? INFINITY : scores_TE[t * E + j] - scores_TE[t * E + k];
                    if (g < least) {
                        least = g;
                        slot = m;
                    }
                }
                slot_P[i] = slot;
            }
            for (int64_t m = 0; m < M; m++) /* the sink's first free slot */
                if (holder_EM[sink * M + m] < 0) {
                    slot_P[P - 1] = m;
                    break;
                }
            arriving_P[0] = unassigned_V[entering];
            for (int64_t i = 1; i < P; i++) arriving_P[i] = holder_EM[path_P[i - 1] * M + slot_P[i - 1]];
            for (int64_t i = 0; i < P; i++) {
                holder_EM[path_P[i] * M + slot_P[i]] = arriving_P[i];
                expert_T[arriving_P[i]] = path_P[i];
                stale_E[path_P[i]] = 1;
            }
            waiting_V[entering] = 0;
            left_E[sink]--;
            placed++;
        }
        for (int64_t e = 0; e < E; e++) /* the changed experts' move gaps */
            if (stale_E[e]) K(move_gaps)(scores_TE, E, holder_EM + e * M, 1, M, &e, gap_EE + e * E);
    }
    status = 0;
done:
    counts_2[0] = placed;
    counts_2[1] = searches;
    free(gap_EE);
    free(cost_EE);
    free(dist_E);
    free(regret_VE);
    free(order_E);
    free(ints);
    free(tokens);
    free(flags);
    return status;
}
