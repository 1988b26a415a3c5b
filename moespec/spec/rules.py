"""The cross-field rules of a spec, each written once, for one spec and for a million designs.

A rule is a predicate over plain values (`violated`), the YAML path it points at, the message a
user reads when one spec breaks it, and a short reason text for the explorer. `violated` uses
only operators that mean the same on Python ints and on numpy arrays (`%`, `//`, `*`, `>`,
`>=`, `!=`, `|`), so `resolve.py` calls it on the scalars of one spec and gets a bool, and
`explore/space.py` calls it on DesignBatch columns and gets a mask: the two views cannot drift.
(No `~` or `not` here: `~True` is -2, and `not` refuses arrays. No numpy or torch import: the
spec layer stays pure Python.)

Inputs are named as the DesignBatch columns are: `experts` is experts.count, `k` the router's
experts per token, `n_groups` / `topk_groups` the sigmoid_bias router's fields.

Which MoE layers a rule concerns is `applies(router)`: a predicate on the layer's resolved
router (a plan.py router dataclass), so a rule about one router type (noisy_topk's k, BASE's
shuffle) is gated the same way in both views. Parallel rules concern every spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

PathT = tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    name: str
    path: PathT  # the field a user should change (resolve.py may point at where it was written)
    short: str  # the explorer's reason text
    inputs: tuple[str, ...]  # argument names of `violated` and `message`, in order
    violated: Callable[..., Any]  # inputs -> bool (scalars) or bool mask (arrays)
    message: Callable[..., str]  # inputs (scalars) -> the message a spec's author reads
    applies: Callable[[Any], bool] | None = None  # MoE rules: does it concern a layer with this router

    def check(self, values: dict) -> Any:
        """`violated` on the inputs taken from `values` (a mapping name -> scalar or array)."""
        return self.violated(*(values[name] for name in self.inputs))

    def explain(self, values: dict) -> str:
        return self.message(*(values[name] for name in self.inputs))


def _tp_heads_message(n_heads: int, n_kv_heads: int, tp: int) -> str:
    # n_kv_heads defaults to n_heads: name the first that fails, one report, not the same twice
    name, heads = ("n_heads", n_heads) if n_heads % tp else ("n_kv_heads", n_kv_heads)
    return f"tp ({tp}) must divide model.{name} ({heads}) to split heads across ranks; pick a divisor"


def _global_batch_message(global_batch: int, micro_batch: int, dp: int) -> str:
    step = micro_batch * dp
    return (f"global_batch ({global_batch}) must be a multiple of micro_batch * dp ({micro_batch} * {dp} = {step}); "
            f"use {max(global_batch // step, 1) * step}")  # fmt: skip


def _base_shuffle_message(micro_batch: int, seq_len: int, ep: int) -> str:
    tokens = micro_batch * seq_len
    return (f"BASE's token shuffle sends T/ep tokens to each expert-parallel rank, so T = parallelism.micro_batch * "
            f"model.seq_len ({micro_batch} * {seq_len} = {tokens}) must be divisible by parallelism.ep ({ep}); "
            f"change micro_batch or seq_len, or set router.shuffle: false")  # fmt: skip


# --- parallelism: every spec ---------------------------------------------------------------

TP_DIVIDES_HEADS = Rule(
    name="tp_divides_heads",
    path=("parallelism", "tp"),
    short="tp does not divide model.n_heads / n_kv_heads",
    inputs=("n_heads", "n_kv_heads", "tp"),
    violated=lambda n_heads, n_kv_heads, tp: (n_heads % tp != 0) | (n_kv_heads % tp != 0),
    message=_tp_heads_message,
)

PP_WITHIN_LAYERS = Rule(
    name="pp_within_layers",
    path=("parallelism", "pp"),
    short="pp exceeds model.n_layers",
    inputs=("pp", "n_layers"),
    violated=lambda pp, n_layers: pp > n_layers,
    message=lambda pp, n_layers: f"pp ({pp}) exceeds model.n_layers ({n_layers}); each stage needs at least one layer",
)

EP_DIVIDES_DP = Rule(
    name="ep_divides_dp",
    path=("parallelism", "ep"),
    short="ep does not divide dp",
    inputs=("dp", "ep"),
    violated=lambda dp, ep: dp % ep != 0,
    message=lambda dp, ep: f"ep ({ep}) must divide dp ({dp}): expert parallelism lives inside data parallelism; set ep to a divisor of dp",
)

GLOBAL_BATCH_MULTIPLE = Rule(
    name="global_batch_multiple",
    path=("parallelism", "global_batch"),
    short="global_batch is not a multiple of micro_batch * dp",
    inputs=("global_batch", "micro_batch", "dp"),
    violated=lambda global_batch, micro_batch, dp: global_batch % (micro_batch * dp) != 0,
    message=_global_batch_message,
)

def _pp_micro_violated(pp, pp_schedule, global_batch, micro_batch, dp):
    n = global_batch // (micro_batch * dp)  # micro-batches per step (the pipeline's)
    rounds = n // pp + (n < pp)  # max(1, n // pp), for scalars and arrays alike
    return (pp > 1) & (((pp_schedule == 1) & (n < pp)) | ((pp_schedule == 2) & (n % rounds != 0)))


def _pp_micro_message(pp, pp_schedule, global_batch, micro_batch, dp) -> str:
    n = global_batch // (micro_batch * dp)
    if pp_schedule == 1:
        return (f"1f1b needs at least pp ({pp}) micro-batches per step, and global_batch / (micro_batch * dp) gives {n}; "
                f"raise global_batch to {pp * micro_batch * dp} or use gpipe")  # fmt: skip
    return (f"interleaved_1f1b runs micro-batches in rounds of pp ({pp}): {n} per step is not a multiple of "
            f"{max(1, n // pp)} rounds; make global_batch / (micro_batch * dp) a multiple of pp")  # fmt: skip


PP_MICRO_BATCHES = Rule(
    name="pp_micro_batches",
    path=("parallelism", "pp_schedule"),
    short="too few micro-batches for the pipeline schedule",
    inputs=("pp", "pp_schedule", "global_batch", "micro_batch", "dp"),  # pp_schedule: a code into spec.stages.PP_SCHEDULES
    violated=_pp_micro_violated,
    message=_pp_micro_message,
)

SP_DIVIDES_SEQUENCE = Rule(
    name="sp_divides_sequence",
    path=("parallelism", "sequence_parallel"),
    short="sequence_parallel: tp does not divide model.seq_len",
    inputs=("sequence_parallel", "tp", "seq_len"),
    violated=lambda sequence_parallel, tp, seq_len: (sequence_parallel != 0) & (tp > 1) & (seq_len % tp != 0),  # != 0: a bool mask from an int column too
    message=lambda sequence_parallel, tp, seq_len: (f"sequence_parallel gives each tp rank seq_len / tp tokens, and tp ({tp}) does not "
                                                    f"divide model.seq_len ({seq_len}); change one, or set it to false"),  # fmt: skip
)

# In resolve.py's order; the explorer gives a design the first rule it breaks.
PARALLEL_RULES = (TP_DIVIDES_HEADS, PP_WITHIN_LAYERS, EP_DIVIDES_DP, GLOBAL_BATCH_MULTIPLE, PP_MICRO_BATCHES, SP_DIVIDES_SEQUENCE)

# --- MoE layers: each rule for the routers it names ------------------------------------------

EP_DIVIDES_EXPERTS = Rule(
    name="ep_divides_experts",
    path=("moe", "experts", "count"),
    short="ep does not divide the expert count",
    inputs=("experts", "ep"),
    violated=lambda experts, ep: experts % ep != 0,
    message=lambda experts, ep: f"experts.count ({experts}) must be divisible by parallelism.ep ({ep}) so each rank holds the same number of experts",
    applies=lambda router: True,
)

K_WITHIN_EXPERTS = Rule(
    name="k_within_experts",
    path=("moe", "router", "k"),
    short="k exceeds the expert count",
    inputs=("k", "experts"),
    violated=lambda k, experts: k > experts,
    message=lambda k, experts: f"k ({k}) exceeds the expert count ({experts}); choose k <= {experts}",
    applies=lambda router: router.type in ("topk", "sigmoid_bias", "sparsemixer"),
)

NOISY_K_BELOW_EXPERTS = Rule(
    name="noisy_k_below_experts",
    path=("moe", "router", "k"),
    short="noisy_topk needs k below the expert count",
    inputs=("k", "experts"),
    violated=lambda k, experts: k >= experts,
    message=lambda k, experts: f"noisy_topk needs k ({k}) below the expert count ({experts}): the load estimator uses the (k+1)-th logit; lower k",
    applies=lambda router: router.type == "noisy_topk",
)

GROUPS_DIVIDE_EXPERTS = Rule(
    name="groups_divide_experts",
    path=("moe", "router", "n_groups"),
    short="sigmoid_bias n_groups does not divide the expert count",
    inputs=("n_groups", "experts"),
    violated=lambda n_groups, experts: experts % n_groups != 0,
    message=lambda n_groups, experts: f"n_groups ({n_groups}) must divide the expert count ({experts}); pick a divisor of {experts}",
    applies=lambda router: router.type == "sigmoid_bias",
)

TOPK_GROUPS_WITHIN_GROUPS = Rule(
    name="topk_groups_within_groups",
    path=("moe", "router", "topk_groups"),
    short="sigmoid_bias topk_groups exceeds n_groups",
    inputs=("topk_groups", "n_groups"),
    violated=lambda topk_groups, n_groups: topk_groups > n_groups,
    message=lambda topk_groups, n_groups: f"topk_groups ({topk_groups}) exceeds n_groups ({n_groups}); choose at most {n_groups}",
    applies=lambda router: router.type == "sigmoid_bias",
)

K_WITHIN_KEPT_GROUPS = Rule(
    name="k_within_kept_groups",
    path=("moe", "router", "k"),
    short="sigmoid_bias k exceeds the experts in the kept groups",
    inputs=("k", "topk_groups", "experts", "n_groups"),
    violated=lambda k, topk_groups, experts, n_groups: k > topk_groups * (experts // n_groups),
    message=lambda k, topk_groups, experts, n_groups: (
        f"k ({k}) exceeds the experts in the kept groups ({topk_groups} x {experts // n_groups}); raise topk_groups or lower k"
    ),
    applies=lambda router: router.type == "sigmoid_bias",
)

BASE_SHUFFLE_DIVIDES = Rule(
    name="base_shuffle_divides",
    path=("parallelism", "micro_batch"),
    short="BASE shuffle: micro_batch * seq_len is not divisible by ep",
    inputs=("micro_batch", "seq_len", "ep"),
    violated=lambda micro_batch, seq_len, ep: (micro_batch * seq_len) % ep != 0,  # ep 1: never
    message=_base_shuffle_message,
    applies=lambda router: router.type == "base" and router.shuffle,
)

# sigmoid_bias's group rules, checked in order; after the first one broken the next say nothing
# new (a k against groups that do not divide E is meaningless).
GROUP_RULES = (GROUPS_DIVIDE_EXPERTS, TOPK_GROUPS_WITHIN_GROUPS, K_WITHIN_KEPT_GROUPS)

# Per MoE layer, in resolve.py's order.
MOE_RULES = (EP_DIVIDES_EXPERTS, K_WITHIN_EXPERTS, NOISY_K_BELOW_EXPERTS, *GROUP_RULES, BASE_SHUFFLE_DIVIDES)

RULES = PARALLEL_RULES + MOE_RULES
