"""Every shipped spec validates, resolves as documented, and round-trips through emit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moespec.spec import load_plan, plan_from_text
from moespec.spec.emit import plan_to_yaml
from moespec.spec.plan import ROUTER_TYPES
from moespec.spec.schema import definition_defaults, load_schema

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))


def test_there_are_examples_for_every_router_type():
    routers = {layer.moe.router.type for path in SPECS for layer in load_plan(path).moe_layers}
    assert routers == set(ROUTER_TYPES)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_example_validates_and_round_trips(path):
    plan = load_plan(path)
    assert path.read_text().startswith("# yaml-language-server: $schema=")
    assert plan.name == path.stem
    emitted = plan_to_yaml(plan)
    assert plan_from_text(emitted, f"emitted-{path.name}") == plan
    # The JSON form is plain data that survives a dump/load.
    assert json.loads(json.dumps(plan.to_dict())) == plan.to_dict()


def test_layer_kinds_follow_the_placement():
    base = load_plan(Path("specs/tiny-base.yaml"))
    assert [layer.kind for layer in base.layers] == ["dense", "dense", "moe", "dense"]  # middle of 4
    assert base.layers[2].moe.capacity is None  # BASE: balanced, no capacity
    deepseek = load_plan(Path("specs/deepseek-moe-16b.yaml"))
    assert deepseek.layers[0].kind == "dense" and all(layer.kind == "moe" for layer in deepseek.layers[1:])
    switch = load_plan(Path("specs/switch-base-8.yaml"))
    # every other block of each stack, numbered through the model (the encoder's 12 first)
    assert [layer.index for layer in switch.moe_layers] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert [layer.stack for layer in switch.moe_layers] == ["encoder"] * 6 + ["decoder"] * 6
    mixed = load_plan(Path("specs/tiny-mixed.yaml"))
    assert [layer.moe.router.type for layer in mixed.moe_layers] == ["switch", "topk", "base"]
    assert mixed.layers[2].moe.capacity.drop_policy == "probability"
    assert mixed.layers[2].moe.capacity.factor == 1.25  # merged from the moe level
    assert mixed.layers[3].moe.experts.d_ff == 128 and mixed.layers[1].moe.experts.d_ff == 64


def test_defaults_are_the_schema_defaults():
    plan = plan_from_text(
        "version: 1\nname: d\nmodel: {vocab_size: 10, d_model: 8, n_layers: 2, n_heads: 2}\nmoe: {}\n"
    )
    model = plan.model
    assert (model.n_kv_heads, model.head_dim, model.d_ff) == (2, 4, 32)  # derived: n_heads, D/H, 4D
    assert model.activation == load_schema()["$defs"]["model"]["properties"]["activation"]["default"]
    layer = plan.layers[0].moe
    assert layer.router.type == "topk" and layer.experts.count == 8 and layer.experts.d_ff == 32
    assert plan.parallel.global_batch == plan.parallel.micro_batch * plan.parallel.dp
    # Dataclass defaults (used by code that builds plans directly) equal the schema's.
    for name, cls in ROUTER_TYPES.items():
        assert definition_defaults(f"router_{name}") == {
            key: getattr(cls(), key) for key in definition_defaults(f"router_{name}")
        }, name


def test_capacity_formula():
    plan = load_plan(Path("specs/tiny-topk.yaml"))
    cap = plan.layers[1].moe.capacity
    # T = 8 * 64 = 512 tokens, k = 2, E = 4, cf 1.25 -> ceil(2 * 512 / 4 * 1.25) = 320
    assert cap.capacity(512, 2, 4) == 320
    assert cap.capacity(512, 2, 4, training=False) == 512  # eval factor 2.0
    assert cap.capacity(4, 1, 4) == 4  # min_capacity 4 wins over ceil(1 * 4 / 4 * 1.25) = 2


def test_every_schema_property_is_documented():
    def walk(node, where):
        if isinstance(node, dict):
            for key, prop in node.get("properties", {}).items():
                assert "description" in prop, f"{where}.{key} has no description"
                assert "default" in prop, f"{where}.{key} has no default"
            for key, child in node.items():
                if key != "if":  # `if` holds discriminator tests, not documented properties
                    walk(child, f"{where}.{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{where}[{index}]")

    walk(load_schema(), "schema")


def test_emitted_yaml_is_plain_yaml():
    text = plan_to_yaml(load_plan(Path("specs/tiny-mixed.yaml")))
    assert yaml.safe_load(text)["moe"]["overrides"]


def test_emit_quotes_strings_that_look_like_numbers():
    plan = load_plan(Path("specs/tiny-topk.yaml"))
    import dataclasses

    odd = dataclasses.replace(plan, name="1e5", description="2.5e-3")
    assert plan_from_text(plan_to_yaml(odd)) == odd
