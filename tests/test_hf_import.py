"""`moespec import`: Hugging Face configs (published values, tests/data/hf_configs) to specs
whose parameter count is the HF model's, exactly; refusals and notes in one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moespec.interop.hf_config import UnsupportedConfig, import_config, read_config
from moespec.sim.counts import predict_params
from moespec.spec import plan_from_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests/data/hf_configs"
# sum(p.numel()) of the HF model built from each config on the meta device (transformers
# 5.24); the published figures for DeepSeek-V2-Lite/V3, gpt-oss-20b, OLMoE, Qwen3,
# Phi-3.5-MoE and dots.llm1 among them.
HF_COUNTS = {
    "mixtral-8x7b": 46_702_792_704, "mixtral-8x22b": 140_630_071_296, "qwen1.5-moe-a2.7b": 14_315_784_192,
    "qwen2-57b-a14b": 57_408_658_944, "qwen3-30b-a3b": 30_532_122_624, "qwen3-235b-a22b": 235_093_634_560,
    "olmoe-1b-7b": 6_919_161_856, "phi-3.5-moe": 41_873_153_344, "granite-3.0-1b-a400m": 1_334_628_352,
    "granite-3.0-3b-a800m": 3_298_793_472, "dbrx": 131_596_523_520, "llama-4-scout": 107_769_861_120,
    "llama-4-maverick": 400_711_848_960, "glm-4.5-air": 106_852_245_504, "glm-4.5": 352_797_814_784,
    "dots.llm1": 142_774_373_888, "deepseek-v3": 671_026_404_352, "deepseek-v2-lite": 15_706_484_224,
    "gpt-oss-20b": 20_914_757_184, "ernie-4.5-21b-a3b": 21_825_437_888,
    "switch-base-8": 619_339_008, "switch-base-128": 7_415_217_408,  # T5 encoder-decoders (SwitchTransformersForConditionalGeneration)
}  # fmt: skip


def imported_plan(name: str):
    import yaml

    from moespec.spec.emit import _SpecDumper

    imported = import_config(read_config(CONFIGS / f"{name}.json"))
    return plan_from_text(yaml.dump(imported.spec, Dumper=_SpecDumper, sort_keys=False), name), imported


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_imported_spec_counts_what_hugging_face_builds(name):
    """Both views: the simulator's count and the compiled model's (built on meta)."""
    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters

    plan, _ = imported_plan(name)
    assert predict_params(plan).total == HF_COUNTS[name]
    assert count_parameters(build_model(plan, device="meta"), plan).total == HF_COUNTS[name]


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_hf_counts_above_are_what_transformers_builds(name):
    """The figures above, re-counted from transformers' own classes on the meta device."""
    transformers = pytest.importorskip("transformers")
    import torch

    config = json.loads((CONFIGS / f"{name}.json").read_text())
    hf_config = transformers.CONFIG_MAPPING[config.pop("model_type")](**{k: v for k, v in config.items() if k != "architectures"})
    auto = transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == HF_COUNTS[name]


def test_families_the_spec_cannot_express_are_refused_naming_the_field(tmp_path):
    """A Switch config whose two stacks place experts differently: one line naming the field."""
    config = json.loads((CONFIGS / "switch-base-8.json").read_text()) | {"num_sparse_decoder_layers": 3}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "moespec", "import", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "num_sparse_decoder_layers:" in done.stderr, done.stderr


def test_fields_that_change_nothing_countable_are_listed_not_dropped(tmp_path):
    config = json.loads((CONFIGS / "granite-3.0-1b-a400m.json").read_text()) | {"my_new_knob": 3}
    imported = import_config(config)
    listed = " ".join(imported.notes)
    for key in ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier"):
        assert f"{key}:" in listed
    assert "my_new_knob: unrecognised field" in listed
    assert not any(note.startswith("vocab_size") for note in imported.notes)  # mapped fields are not notes


def test_sliding_windows_are_mapped_per_layer():
    mixtral = import_config(json.loads((CONFIGS / "mixtral-8x7b.json").read_text()) | {"sliding_window": 1024})
    assert mixtral.spec["model"]["sliding_window"] == {"size": 1024}  # Mistral-style: every layer
    oss = import_config(json.loads((CONFIGS / "gpt-oss-20b.json").read_text()))
    assert oss.spec["model"]["sliding_window"] == {"size": 128, "layers": list(range(0, 24, 2))}
    qwen = json.loads((CONFIGS / "qwen2-57b-a14b.json").read_text()) | {"use_sliding_window": True, "max_window_layers": 20, "sliding_window": 4096}
    assert import_config(qwen).spec["model"]["sliding_window"] == {"size": 4096, "layers": list(range(20, 28))}
    assert "sliding_window" not in import_config(json.loads((CONFIGS / "qwen2-57b-a14b.json").read_text())).spec["model"]
    with pytest.raises(UnsupportedConfig, match=r"^layer_types: attention kinds \['chunked_attention'\]"):
        import_config(json.loads((CONFIGS / "gpt-oss-20b.json").read_text()) | {"layer_types": ["chunked_attention"] * 24})


def test_cli_writes_a_spec_that_validates_and_simulates_to_the_same_count(tmp_path):
    out = tmp_path / "specs" / "olmoe.yaml"
    done = subprocess.run([sys.executable, "-m", "moespec", "import", str(CONFIGS / "olmoe-1b-7b.json"), "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["params_total"] == HF_COUNTS["olmoe-1b-7b"] and report["moe_layers"] == 16
    assert out.read_text().startswith("# Imported from") and not list(out.parent.glob(".*.tmp"))
    sim = subprocess.run([sys.executable, "-m", "moespec", "simulate", str(out), "--backend", "h100-cluster-4n", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["params"]["total"] == HF_COUNTS["olmoe-1b-7b"]


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON (line 1"),
    ('["a list"]', "a config.json is one JSON object"),
    ('{"model_type": "bert"}', "model_type: 'bert' is not a family moespec imports"),
    ('{"model_type": "mixtral", "vocab_size": 10}', "hidden_size: missing from the config"),
], ids=["bad-json", "not-object", "unknown-family", "missing-field"])  # fmt: skip
def test_bad_configs_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    out = tmp_path / "spec.yaml"
    done = subprocess.run([sys.executable, "-m", "moespec", "import", str(tmp_path), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not out.exists()
