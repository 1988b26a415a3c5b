"""Plan -> spec: write a resolved plan back as spec YAML that resolves to the same plan.

Used to prove the spec language round-trips and, by the explorer, to emit designs as ready
specs. Every value is written explicitly (no reliance on defaults), so an emitted spec means
the same thing even if a future version changes a default.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import yaml

from moespec.spec.plan import MoELayerPlan, SpecPlan
from moespec.spec.yaml_source import FLOAT_12

SCHEMA_COMMENT = "# yaml-language-server: $schema=../schemas/moespec.schema.json\n"


def _router_dict(moe: MoELayerPlan) -> dict:
    return dataclasses.asdict(moe.router)


def _experts_dict(moe: MoELayerPlan) -> dict:
    experts = dataclasses.asdict(moe.experts)
    if not moe.experts.shared_count:  # shared fields without shared experts are an error
        del experts["shared_d_ff"], experts["shared_gate"]
    return experts


def _capacity_dict(moe: MoELayerPlan) -> dict | None:
    cap = moe.capacity
    if cap is None:
        return None
    if cap.dropless:
        return {"dropless": True, "min_capacity": cap.min_capacity, "drop_policy": cap.drop_policy}
    return dataclasses.asdict(cap)


def _model_dict(plan: SpecPlan) -> dict:
    model = dataclasses.asdict(plan.model)
    if plan.model.norm != "layernorm":  # RMSNorm has no bias: the key is refused there
        del model["norm_bias"]
    model["nope_layers"] = list(model["nope_layers"]) or None
    window, layers = model.pop("window"), model.pop("window_layers")
    model["sliding_window"] = None if window is None else {"size": window, "layers": list(layers)}
    if plan.model.mla is not None:  # latent attention sets these itself; the keys are refused beside it
        del model["head_dim"], model["n_kv_heads"], model["rope_fraction"]
    else:
        del model["mla"]
    if plan.model.positions != "rope":  # refused beside other positions
        del model["rope_theta"]
    buckets, distance = model.pop("relative_buckets"), model.pop("relative_max_distance")
    model["relative_attention"] = {"buckets": buckets, "max_distance": distance} if plan.model.positions == "relative" else None
    if plan.model.host == "lstm":  # no attention, positions or norms: those keys are refused beside it
        from moespec.spec.resolve import LSTM_REFUSED

        model = {key: value for key, value in model.items() if key not in LSTM_REFUSED}
    return model


def _placement(plan: SpecPlan) -> dict:
    """The blocks that are MoE: listed, or for an encoder-decoder (whose placement applies to
    each stack's blocks, numbered from 0 in each) the rule both stacks follow."""
    if plan.model.encoder is None:
        return {"type": "layers", "layers": [layer.index for layer in plan.moe_layers]}
    stacks = [plan.encoder_layers, plan.decoder_layers]
    local = [[i for i, layer in enumerate(stack) if layer.moe is not None] for stack in stacks]
    if local[0] == local[1]:
        return {"type": "layers", "layers": local[0]}
    for every in range(1, max(len(stack) for stack in stacks) + 1):
        for offset in range(every):
            if all(indices == [i for i in range(offset, len(stack)) if (i - offset) % every == 0] for indices, stack in zip(local, stacks)):
                return {"type": "every", "every": every, "offset": offset}
    raise ValueError(f"{plan.name}: the encoder's MoE blocks {local[0]} and the decoder's {local[1]} follow no one placement")


def plan_to_spec(plan: SpecPlan) -> dict:
    """The spec mapping for `plan`: the most common MoE layer config at moe level, the rest as overrides."""
    spec: dict = {
        "version": plan.version,
        "name": plan.name,
        "description": plan.description,
        "model": _model_dict(plan),
        "parallelism": {
            field.name: getattr(plan.parallel, field.name) for field in dataclasses.fields(plan.parallel)
        },
    }
    moe_layers = plan.moe_layers
    if not moe_layers:
        return spec
    # A BASE layer carries no capacity, so it cannot be the moe-level config when another
    # layer needs capacity; prefer the most common non-BASE config.
    counts = Counter(layer.moe for layer in moe_layers)
    non_base = [moe for moe in counts if moe.capacity is not None]
    common = max(non_base or counts, key=lambda moe: counts[moe])
    moe: dict = {
        "placement": _placement(plan),
        "experts": _experts_dict(common),
        "router": _router_dict(common),
    }
    if common.capacity is not None:
        moe["capacity"] = _capacity_dict(common)
    overrides = []
    for config in sorted({layer.moe for layer in moe_layers} - {common}, key=lambda m: str(m)):
        override: dict = {"layers": [layer.index for layer in moe_layers if layer.moe == config]}
        override["router"] = _router_dict(config)
        override["experts"] = _experts_dict(config)
        if config.capacity is not None:
            override["capacity"] = _capacity_dict(config)
        overrides.append(override)
    if overrides:
        moe["overrides"] = overrides
    spec["moe"] = moe
    return spec


class _SpecDumper(yaml.SafeDumper):
    """Quotes strings that our loader would read as numbers (it reads YAML 1.2 exponent floats
    such as `1e5`, which PyYAML's 1.1 resolver would leave unquoted)."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "'" if FLOAT_12.fullmatch(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_SpecDumper.add_representer(str, _represent_str)


def plan_to_yaml(plan: SpecPlan) -> str:
    body = yaml.dump(plan_to_spec(plan), Dumper=_SpecDumper, sort_keys=False, default_flow_style=None, width=100)
    return SCHEMA_COMMENT + body
