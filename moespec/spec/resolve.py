"""Schema-valid spec data -> `SpecPlan`, with the cross-field rules checked once, here.

Defaults are read from the schema (`definition_defaults`), so the documented default and the
used default cannot differ. Every semantic error names the YAML path that should change, both
values involved, and the fix; errors are collected, never asserted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moespec.spec.errors import PathT, SpecError, SpecErrors
from moespec.spec import rules
from moespec.spec.stages import PP_SCHEDULES
from moespec.spec.plan import (
    EncoderPlan,
    MLAPlan,
    ROUTER_TYPES,
    CapacityPlan,
    ExpertsPlan,
    LayerPlan,
    ModelPlan,
    MoELayerPlan,
    ParallelPlan,
    SpecPlan,
)
from moespec.spec.schema import definition_defaults, load_schema
from moespec.spec.yaml_source import Locations


@dataclass
class _Errors:
    locations: Locations
    found: dict[tuple[str, str], SpecError] = field(default_factory=dict)

    def add(self, path: PathT, message: str) -> None:
        error = self.locations.error(path, message)
        self.found.setdefault((error.path, message), error)  # one report per place, not per layer


def _with_defaults(definition: str, raw: dict | None) -> dict:
    """Defaults of a schema definition overlaid with what the spec wrote (floats like 2.0 in
    integer fields become ints, which the schema allows)."""
    properties = load_schema()["$defs"][definition]["properties"]
    merged = {**definition_defaults(definition), **(raw or {})}
    for key, value in merged.items():
        types = properties.get(key, {}).get("type", [])
        if isinstance(value, float) and "integer" in (types if isinstance(types, list) else [types]):
            merged[key] = int(value)
    return merged


def resolve(data: dict, locations: Locations) -> SpecPlan:
    errors = _Errors(locations)
    model = _model(data["model"], errors)
    parallel = _parallel(data.get("parallelism") or {}, model, errors)
    layers = _stack_layers(data.get("moe"), model, parallel, errors, model.n_layers)
    if model.host == "lstm":
        layers = tuple(dataclasses.replace(layer, d_ff=0) if layer.moe is None else layer for layer in layers)  # no dense FFN
        for key, value in (("recompute", parallel.recompute != "none"), ("tp", parallel.tp > 1), ("pp", parallel.pp > 1)):
            if value:
                errors.add(("parallelism", key), f"{key} is not defined for an LSTM host (its layers are recurrences, not attention blocks); remove it")
    if model.encoder is not None and parallel.recompute == "selective":
        errors.add(("parallelism", "recompute"), "selective recomputation replays the fused attention kernel, which T5's biased attention does not use; use none or full")
    if parallel.tp > 1:  # a column split cuts the width in tp equal parts (DTensor's shards of a local tensor)
        if any(layer.moe is None for layer in layers) and model.d_ff % parallel.tp:
            errors.add(("model", "d_ff"), f"tp ({parallel.tp}) must divide model.d_ff ({model.d_ff}) to split the dense FFNs; pick a multiple of tp")
        widths = {layer.moe.experts.shared_count * layer.moe.experts.shared_d_ff for layer in layers if layer.moe is not None}
        for width in sorted(w for w in widths if w % parallel.tp):
            errors.add(("moe", "experts", "shared_d_ff"), f"tp ({parallel.tp}) must divide the shared experts' width "
                       f"(shared_count * shared_d_ff = {width}) to split them; pick a multiple of tp")  # fmt: skip
    if model.encoder is not None:  # the encoder's blocks first, numbered through the model
        encoder = _stack_layers(data.get("moe"), model, parallel, errors, model.encoder.n_layers, stack="encoder")
        offset = model.encoder.n_layers
        layers = encoder + tuple(dataclasses.replace(layer, index=layer.index + offset) for layer in layers)
    if errors.found:
        raise SpecErrors(errors.found.values())
    return SpecPlan(
        version=int(data["version"]),
        name=data["name"],
        description=data.get("description", ""),
        model=model,
        layers=layers,
        parallel=parallel,
    )


def _stack_layers(moe: dict | None, model: ModelPlan, parallel: ParallelPlan, errors: _Errors, n_layers: int,
                  stack: str = "decoder") -> tuple[LayerPlan, ...]:  # fmt: skip
    """One stack's blocks, numbered from 0; moe.placement applies to each stack alike."""
    if moe is None:
        return tuple(LayerPlan(index=i, kind="dense", d_ff=model.d_ff, moe=None, stack=stack) for i in range(n_layers))
    if stack == "encoder" and moe.get("overrides"):
        errors.add(("moe", "overrides"), "moe.overrides is not defined for encoder-decoder models (its layer numbers would name blocks of both stacks); remove it")
    shape = dataclasses.replace(model, n_layers=n_layers)
    return tuple(dataclasses.replace(layer, stack=stack) for layer in _layers(moe, shape, parallel, errors))


def _encoder(m: dict, errors: _Errors) -> EncoderPlan | None:
    """The encoder of an encoder-decoder, and the keys it excludes or needs."""
    relative = m["positions"] == "relative"
    if m["encoder"] is None:
        if relative:
            errors.add(("model", "positions"), "positions: relative (T5's bias) is defined for encoder-decoder models; add model.encoder or use rope")
        if m["relative_attention"] is not None:
            errors.add(("model", "relative_attention"), "relative_attention applies to positions: relative; remove it")
        return None
    raw = m["encoder"]
    for path, length in ((("model", "encoder", "seq_len"), raw["seq_len"]), (("model", "seq_len"), m["seq_len"])):
        if length < 3:  # T5's arithmetic: a raw window of 2 corrupts to 3 inputs and 3 targets (data/span_corruption.py)
            errors.add(path, f"{length} tokens cannot hold span corruption (a kept token, a sentinel and EOS; the targets a sentinel, a hidden token and EOS); use at least 3")
    if not relative:
        errors.add(("model", "positions"), f"an encoder-decoder uses T5's relative position bias; set positions: relative (got {m['positions']})")
    excluded = {
        "mla": m["mla"] is not None, "sliding_window": m["sliding_window"] is not None, "nope_layers": bool(m["nope_layers"]),
        "attention_sinks": m["attention_sinks"], "qk_norm": m["qk_norm"] != "none", "qkv_bias": m["qkv_bias"], "out_bias": m["out_bias"],
        "lm_head_bias": m["lm_head_bias"], "n_kv_heads": m["n_kv_heads"] not in (None, m["n_heads"]),
    }  # fmt: skip
    for key, present in excluded.items():
        if present:
            errors.add(("model", key), f"{key} is not defined for encoder-decoder models (T5 attention: q, k, v, o without biases, every head its own keys); remove it")
    return EncoderPlan(n_layers=raw["n_layers"], seq_len=raw["seq_len"], noise_density=float(raw.get("noise_density", 0.15)),
                       mean_span=float(raw.get("mean_span", 3.0)))  # fmt: skip


# What an LSTM host has no use for (an attention's shape, positions, norms): refused when written.
LSTM_REFUSED = ("n_heads", "n_kv_heads", "head_dim", "positions", "rope_theta", "rope_fraction", "nope_layers", "attention_sinks",
                "sliding_window", "qk_norm", "qkv_bias", "out_bias", "norm", "norm_eps", "norm_bias", "mla", "encoder",
                "relative_attention", "lm_head_bias")  # fmt: skip


def _lstm_model(raw: dict, errors: _Errors) -> ModelPlan:
    """Shazeer et al. 2017's host: LSTM layers of d_model units, no attention, norms or positions."""
    for key in LSTM_REFUSED:
        if key in raw:
            errors.add(("model", key), f"{key} has no meaning in an LSTM host (no attention, positions or norms); remove it")
    m = _with_defaults("model", raw)
    d = m["d_model"]
    return ModelPlan(
        vocab_size=m["vocab_size"], d_model=d, n_layers=m["n_layers"], n_heads=1, n_kv_heads=1, head_dim=d, d_ff=m["d_ff"] or 4 * d,
        activation=m["activation"], norm="rmsnorm", norm_eps=1e-5, positions="none", rope_theta=10000.0, tied_embeddings=m["tied_embeddings"],
        seq_len=m["seq_len"], dropout=float(m["dropout"]), qkv_bias=False, init_std=float(m["init_std"]), norm_bias=False, host="lstm",
    )  # fmt: skip


def _model(raw: dict, errors: _Errors) -> ModelPlan:
    if raw.get("host") == "lstm":
        return _lstm_model(raw, errors)
    m = _with_defaults("model", raw)
    n_heads, d_model = m["n_heads"], m["d_model"]
    n_kv_heads = m["n_kv_heads"] or n_heads
    if n_heads % n_kv_heads:
        errors.add(("model", "n_kv_heads"), f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}) for grouped-query attention; pick a divisor of {n_heads}")
    head_dim, mla = m["head_dim"], None
    if m["mla"] is not None:  # latent attention sets the head widths itself
        mla = _mla(m, n_heads, errors)
        n_kv_heads, head_dim = n_heads, mla.qk_nope_head_dim + mla.qk_rope_head_dim
    elif head_dim is None:
        if d_model % n_heads:
            errors.add(("model", "n_heads"), f"n_heads ({n_heads}) does not divide d_model ({d_model}); pick n_heads dividing d_model or set model.head_dim")
        head_dim = max(d_model // n_heads, 1)
    if mla is None and m["positions"] == "rope" and head_dim % 2:
        where = ("model", "head_dim") if m["head_dim"] is not None else ("model", "n_heads")
        errors.add(where, f"RoPE rotates pairs of channels, so head_dim ({head_dim}) must be even; change head_dim or use positions: learned")
    if "rope_theta" in raw and m["positions"] != "rope":
        errors.add(("model", "rope_theta"), f"rope_theta applies to positions: rope; remove it (positions: {m['positions']})")
    fraction = float(m["rope_fraction"])
    if fraction != 1.0:
        rotated = head_dim * fraction
        if mla is not None:
            errors.add(("model", "rope_fraction"), "rope_fraction does not apply under mla (its qk_rope_head_dim says which channels rotate); remove it")
        elif m["positions"] != "rope":
            errors.add(("model", "rope_fraction"), "rope_fraction applies to positions: rope; remove it or use rope")
        elif rotated != int(rotated) or int(rotated) % 2 or int(rotated) == 0:
            errors.add(("model", "rope_fraction"), f"head_dim ({head_dim}) * rope_fraction ({fraction:g}) = {rotated:g} must be a positive even integer of channels")
    window, window_layers = None, ()
    if m["sliding_window"] is not None:
        window = m["sliding_window"]["size"]
        listed = m["sliding_window"].get("layers")
        window_layers = tuple(range(m["n_layers"])) if listed is None else tuple(sorted(set(listed)))
        for position, index in enumerate(listed or []):
            if index >= m["n_layers"]:
                errors.add(("model", "sliding_window", "layers", position), f"layer {index} is out of range for n_layers {m['n_layers']}; use 0..{m['n_layers'] - 1}")
    nope = tuple(sorted(set(m["nope_layers"] or ())))
    for position, index in enumerate(m["nope_layers"] or []):
        if index >= m["n_layers"]:
            errors.add(("model", "nope_layers", position), f"layer {index} is out of range for n_layers {m['n_layers']}; use 0..{m['n_layers'] - 1}")
    if nope and m["positions"] != "rope":
        errors.add(("model", "nope_layers"), "nope_layers removes RoPE from layers; it needs positions: rope")
    if nope and mla is not None:
        errors.add(("model", "nope_layers"), "nope_layers is not defined for latent attention (mla); remove it")
    if mla is not None and (m["attention_sinks"] or window is not None):
        key = "attention_sinks" if m["attention_sinks"] else "sliding_window"
        errors.add(("model", key), f"{key} is not defined for latent attention (mla) yet; remove it")
    if m["norm_bias"] is not None and m["norm"] == "rmsnorm":
        errors.add(("model", "norm_bias"), "norm_bias applies to LayerNorm; rmsnorm has no bias: remove norm_bias or use norm: layernorm")
    return ModelPlan(
        vocab_size=m["vocab_size"],
        d_model=d_model,
        n_layers=m["n_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=m["d_ff"] or 4 * d_model,
        activation=m["activation"],
        norm=m["norm"],
        norm_eps=float(m["norm_eps"]),
        positions=m["positions"],
        rope_theta=float(m["rope_theta"]),
        tied_embeddings=m["tied_embeddings"],
        seq_len=m["seq_len"],
        dropout=float(m["dropout"]),
        qkv_bias=m["qkv_bias"],
        init_std=float(m["init_std"]),
        out_bias=m["out_bias"],
        qk_norm=m["qk_norm"],
        norm_bias=m["norm"] == "layernorm" and m["norm_bias"] is not False,
        lm_head_bias=m["lm_head_bias"],
        mla=mla,
        rope_fraction=fraction,
        nope_layers=nope,
        attention_sinks=m["attention_sinks"],
        window=window,
        window_layers=window_layers,
        encoder=_encoder(m, errors),
        relative_buckets=int((m["relative_attention"] or {}).get("buckets", 32)),
        relative_max_distance=int((m["relative_attention"] or {}).get("max_distance", 128)),
    )


def _mla(m: dict, n_heads: int, errors: _Errors) -> MLAPlan:
    """The latent-attention block, and the model keys it replaces refused by name."""
    raw = m["mla"]
    mla = MLAPlan(q_lora_rank=raw.get("q_lora_rank"), kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"],
                  qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"])  # fmt: skip
    clashes = {
        "head_dim": (m["head_dim"] is not None, "is qk_nope_head_dim + qk_rope_head_dim under mla; remove it"),
        "n_kv_heads": (m["n_kv_heads"] not in (None, n_heads), "must equal n_heads under mla (every head reads the one latent); remove it"),
        "qkv_bias": (m["qkv_bias"], "has no q/k/v projections to sit on under mla; remove it"),
        "qk_norm": (m["qk_norm"] != "none", "is not defined for latent attention (its latents have their own norms); remove it"),
        "positions": (m["positions"] != "rope", "must be rope under mla (its keys carry a rotary part)"),
    }  # fmt: skip
    for key, (bad, why) in clashes.items():
        if bad:
            errors.add(("model", key), f"{key} {why}")
    if mla.qk_rope_head_dim % 2:
        errors.add(("model", "mla", "qk_rope_head_dim"), f"RoPE rotates pairs of channels, so qk_rope_head_dim ({mla.qk_rope_head_dim}) must be even")
    return mla


def _parallel(raw: dict, model: ModelPlan, errors: _Errors) -> ParallelPlan:
    p = _with_defaults("parallelism", raw)
    dp, ep, tp, pp, micro = p["dp"], p["ep"], p["tp"], p["pp"], p["micro_batch"]
    global_batch = p["global_batch"] or micro * dp
    values = {"dp": dp, "ep": ep, "tp": tp, "pp": pp, "micro_batch": micro, "global_batch": global_batch,
              "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "n_layers": model.n_layers,
              "sequence_parallel": p["sequence_parallel"], "seq_len": model.seq_len}  # fmt: skip
    for rule in (rules.EP_DIVIDES_DP, rules.TP_DIVIDES_HEADS, rules.PP_WITHIN_LAYERS, rules.GLOBAL_BATCH_MULTIPLE, rules.SP_DIVIDES_SEQUENCE):
        if rule.check(values):
            errors.add(rule.path, rule.explain(values))
    _pipeline_checks(p, model, pp, global_batch // (micro * dp) if global_batch % (micro * dp) == 0 else None, errors)
    _tensor_parallel_checks(p, model, tp, errors)
    return ParallelPlan(
        dp=dp, ep=ep, tp=tp, pp=pp, micro_batch=micro, global_batch=global_batch,
        precision=p["precision"], zero_stage=p["zero_stage"], recompute=p["recompute"],
        pp_schedule=p["pp_schedule"], pp_layers=tuple(p["pp_layers"]) if p["pp_layers"] else None,
        sequence_parallel=p["sequence_parallel"],
    )  # fmt: skip


def _pipeline_checks(p: dict, model: ModelPlan, pp: int, n_micro: int | None, errors: _Errors) -> None:
    """What torch's schedules and our stage split need; each a one-line error naming the key."""
    schedule, written = p["pp_schedule"], p["pp_layers"]
    stages = pp * (2 if schedule == "interleaved_1f1b" else 1)
    blocks = model.n_layers
    if pp == 1:
        if written:
            errors.add(("parallelism", "pp_layers"), "pp_layers splits pipeline stages, and parallelism.pp is 1; remove it or raise pp")
        return
    if model.encoder is not None or model.host == "lstm":
        errors.add(("parallelism", "pp"), "pipeline parallelism runs decoder-only transformers; set pp to 1")
        return
    if pp > blocks:  # rules.PP_WITHIN_LAYERS says so
        return
    if written:
        if len(written) != stages:
            errors.add(("parallelism", "pp_layers"), f"pp_layers has {len(written)} entries but the pipeline has {stages} stages "
                       f"(pp {pp}{' x 2 for interleaved_1f1b' if stages != pp else ''}); give one block count per stage")  # fmt: skip
        elif sum(written) != blocks:
            errors.add(("parallelism", "pp_layers"), f"pp_layers sums to {sum(written)} blocks but the model has {blocks}; make the counts add up")
    elif stages > blocks:  # interleaved only: pp <= blocks here
        errors.add(("parallelism", "pp_schedule"), f"interleaved_1f1b runs 2 * pp = {stages} stages but the model has {blocks} blocks; "
                   "use 1f1b or gpipe, or fewer stages")  # fmt: skip
    if p["zero_stage"] > 1:
        errors.add(("parallelism", "zero_stage"), f"ZeRO stages 2 and 3 (FSDP2) are not combined with pipeline parallelism (parallelism.pp {pp}); "
                   "use zero_stage 0 or 1")  # fmt: skip
    if p["precision"] == "fp16":
        errors.add(("parallelism", "precision"), "fp16 needs loss scaling, which the pipeline schedules do not apply; use bf16 or fp32 with pp > 1")
    if n_micro is None:
        return
    values = {"pp": pp, "pp_schedule": PP_SCHEDULES.index(schedule), "global_batch": n_micro * p["micro_batch"] * p["dp"],
              "micro_batch": p["micro_batch"], "dp": p["dp"]}  # fmt: skip
    if rules.PP_MICRO_BATCHES.check(values):
        errors.add(rules.PP_MICRO_BATCHES.path, rules.PP_MICRO_BATCHES.explain(values))


def _tensor_parallel_checks(p: dict, model: ModelPlan, tp: int, errors: _Errors) -> None:
    """What the column/row split (distributed/tensor_parallel.py) cannot run, refused by name."""
    if p["sequence_parallel"] and tp == 1:  # (the sequence's divisibility is rules.SP_DIVIDES_SEQUENCE)
        errors.add(("parallelism", "sequence_parallel"), "sequence_parallel splits the sequence over the tp ranks, and parallelism.tp is 1; "
                   "raise tp or remove it")  # fmt: skip
    if tp == 1:
        return
    refused = (
        (model.encoder is not None, ("parallelism", "tp"), "tensor parallelism runs decoder-only transformers"),
        (model.mla is not None, ("model", "mla"), "tensor parallelism does not split MLA's latent projections"),
        (model.qk_norm == "full", ("model", "qk_norm"), "qk_norm full normalises across all heads, which tensor parallelism splits; use per_head"),
        (model.dropout > 0, ("model", "dropout"), "dropout under tensor parallelism would draw the same masks on every tp rank; set it to 0"),
        (p["zero_stage"] > 0, ("parallelism", "zero_stage"), "ZeRO stages above 0 are not combined with tensor parallelism; use zero_stage 0"),
    )
    for bad, path, message in refused:
        if bad:
            errors.add(path, f"{message} (parallelism.tp {tp}); or set tp to 1")


def _moe_indices(raw: dict, n_layers: int, errors: _Errors) -> list[int]:
    placement = _with_defaults(f"placement_{raw['type']}", raw)
    kind, path = placement["type"], ("moe", "placement")
    first_dense = placement.get("first_dense", 0)
    if first_dense >= n_layers:
        errors.add(path + ("first_dense",), f"first_dense ({first_dense}) leaves no MoE layer in {n_layers} layers; use a value below {n_layers}")
    if kind == "all":
        return list(range(first_dense, n_layers))
    if kind == "every":
        every, offset = placement["every"], placement["offset"]
        if offset >= n_layers:
            errors.add(path + ("offset",), f"offset ({offset}) is past the last layer ({n_layers - 1}); use an offset below {n_layers}")
        return [i for i in range(max(first_dense, offset), n_layers) if (i - offset) % every == 0]
    if kind == "middle":
        return [n_layers // 2]
    indices = []
    for position, index in enumerate(placement["layers"]):
        if index >= n_layers:
            errors.add(path + ("layers", position), f"layer {index} is out of range for n_layers {n_layers}; use 0..{n_layers - 1}")
        else:
            indices.append(index)
    return sorted(indices)


@dataclass
class _LayerSources:
    """Where one MoE layer's router/experts/capacity come from (paths for error messages)."""

    router: dict
    router_path: PathT
    experts: dict
    experts_paths: dict[str, PathT]  # field -> path where it was written
    capacity_raw: list[tuple[PathT, dict]]  # capacity mappings written for this layer, in order


def _layers(raw: dict, model: ModelPlan, parallel: ParallelPlan, errors: _Errors) -> tuple[LayerPlan, ...]:
    reported = len(errors.found)
    moe_indices = _moe_indices(raw.get("placement") or {"type": "all"}, model.n_layers, errors)
    if not moe_indices and len(errors.found) == reported:  # else the placement error already says why
        errors.add(("moe", "placement"), f"this placement makes no layer MoE in {model.n_layers} layers; change it or remove the moe section")
    base_experts = raw.get("experts") or {}
    base_capacity = [(("moe", "capacity"), raw["capacity"])] if raw.get("capacity") is not None else []
    sources = {
        index: _LayerSources(
            router=raw.get("router") or {"type": "topk"},
            router_path=("moe", "router"),
            experts=dict(base_experts),
            experts_paths={key: ("moe", "experts", key) for key in base_experts},
            capacity_raw=list(base_capacity),
        )
        for index in moe_indices
    }
    overridden: dict[int, int] = {}
    for number, override in enumerate(raw.get("overrides") or []):
        path = ("moe", "overrides", number)
        if not any(key in override for key in ("router", "experts", "capacity")):
            errors.add(path, "this override changes nothing; add router, experts or capacity, or remove it")
        for position, index in enumerate(override["layers"]):
            where = path + ("layers", position)
            if index >= model.n_layers:
                errors.add(where, f"layer {index} is out of range for n_layers {model.n_layers}; use 0..{model.n_layers - 1}")
                continue
            if index not in sources:
                errors.add(where, f"layer {index} is dense under moe.placement (MoE layers: {_short(moe_indices)}); add it to the placement or drop it here")
                continue
            if index in overridden:
                errors.add(where, f"layer {index} is already overridden by moe.overrides[{overridden[index]}]; merge the two overrides")
                continue
            overridden[index] = number
            layer = sources[index]
            if "router" in override:
                layer.router, layer.router_path = override["router"], path + ("router",)
            for key, value in (override.get("experts") or {}).items():
                layer.experts[key] = value
                layer.experts_paths[key] = path + ("experts", key)
            if override.get("capacity") is not None:
                layer.capacity_raw.append((path + ("capacity",), override["capacity"]))
    layers = []
    for index in range(model.n_layers):
        if index in sources:
            moe = _moe_layer(sources[index], model, parallel, errors)
            layers.append(LayerPlan(index=index, kind="moe", d_ff=model.d_ff, moe=moe))
        else:
            layers.append(LayerPlan(index=index, kind="dense", d_ff=model.d_ff, moe=None))
    return tuple(layers)


def _short(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")


def _moe_layer(src: _LayerSources, model: ModelPlan, parallel: ParallelPlan, errors: _Errors) -> MoELayerPlan:
    ex = _with_defaults("experts", src.experts)
    count_path = src.experts_paths.get("count", ("moe", "experts", "count"))
    count = ex["count"]
    if ex["shared_count"] == 0:
        for key in ("shared_d_ff", "shared_gate"):
            if key in src.experts_paths and ex[key] not in (None, False):
                errors.add(src.experts_paths[key], f"{key} is set but shared_count is 0; set experts.shared_count or remove {key}")
    d_ff = ex["d_ff"] or model.d_ff
    experts = ExpertsPlan(
        count=count, d_ff=d_ff, shared_count=ex["shared_count"],
        shared_d_ff=ex["shared_d_ff"] or d_ff, shared_gate=ex["shared_gate"], bias=ex["bias"], gate_input=ex["gate_input"],
    )  # fmt: skip

    router_raw = src.router
    router_type = router_raw["type"]
    router = ROUTER_TYPES[router_type](**_with_defaults(f"router_{router_type}", router_raw))
    if experts.gate_input and (router.experts_per_token != 1 or router_type in ("base", "expert_choice")):
        where = src.experts_paths.get("gate_input", ("moe", "experts", "gate_input"))
        errors.add(where, f"gate_input scales a token's one expert input; the {router_type} router gives {router.experts_per_token} per token or chooses by expert: use a top-1 token-choice router")
    k_path = src.router_path + ("k",) if "k" in router_raw else src.router_path
    values = {"experts": count, "k": router.experts_per_token, "ep": parallel.ep, "micro_batch": parallel.micro_batch,
              "seq_len": model.seq_len, "n_groups": getattr(router, "n_groups", 1), "topk_groups": getattr(router, "topk_groups", 1)}  # fmt: skip
    where = {rules.EP_DIVIDES_EXPERTS: count_path, rules.K_WITHIN_EXPERTS: k_path, rules.NOISY_K_BELOW_EXPERTS: k_path,
             rules.GROUPS_DIVIDE_EXPERTS: src.router_path + ("n_groups",), rules.TOPK_GROUPS_WITHIN_GROUPS: src.router_path + ("topk_groups",),
             rules.K_WITHIN_KEPT_GROUPS: src.router_path + ("k",), rules.BASE_SHUFFLE_DIVIDES: rules.BASE_SHUFFLE_DIVIDES.path}  # fmt: skip
    for rule in rules.MOE_RULES:
        if rule.applies(router) and rule.check(values):
            errors.add(where[rule], rule.explain(values))
            if rule in rules.GROUP_RULES:
                break  # the later group rules are meaningless once one fails (and BASE's is not for this router)

    capacity = None
    if router_type == "base":
        # A moe-level capacity is for the other layers when only an override makes this one BASE.
        global_router = src.router_path == ("moe", "router")
        for path, _ in src.capacity_raw:
            if path == ("moe", "capacity") and not global_router:
                continue
            errors.add(path, "BASE layers have no capacity: balanced assignment gives every expert exactly T/E tokens; remove this capacity section for BASE layers")
    else:
        capacity = _capacity(src, router_type, errors)
    return MoELayerPlan(router=router, experts=experts, capacity=capacity)


def _capacity(src: _LayerSources, router_type: str, errors: _Errors) -> CapacityPlan:
    merged: dict = {}
    written: dict[str, PathT] = {}
    for path, raw in src.capacity_raw:
        merged.update(raw)
        written.update({key: path + (key,) for key in raw})
    cap = _with_defaults("capacity", merged)
    factor, eval_factor = float(cap["factor"]), float(cap["eval_factor"])
    if cap["dropless"]:
        if router_type == "expert_choice":
            errors.add(written["dropless"], "expert_choice always fills C = T * factor / E slots per expert, so it cannot be dropless; remove dropless")
        for key in ("factor", "eval_factor"):
            if key in written:
                errors.add(written[key], f"dropless capacity has no {key}: expert groups take every routed token; remove {key} or set dropless: false")
        factor = eval_factor = None
    return CapacityPlan(
        factor=factor, eval_factor=eval_factor, min_capacity=cap["min_capacity"],
        drop_policy=cap["drop_policy"], dropless=cap["dropless"],
    )  # fmt: skip
