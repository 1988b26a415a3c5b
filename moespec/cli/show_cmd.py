"""`moespec show SPEC`: the resolved plan, every default filled in and every layer explicit."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moespec.cli.common import console, emit_json, load_plan_or_exit


def show_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved plan as one JSON document."),
    every_layer: bool = typer.Option(False, "--every-layer", help="One row per layer instead of grouping runs."),
) -> None:
    """Print the resolved plan: model shape, parallelism and a row per layer (or run of layers)."""
    from moespec.spec.describe import grouped_rows, layer_row

    plan = load_plan_or_exit(spec)
    if as_json:
        emit_json(plan.to_dict())
        return
    m, p = plan.model, plan.parallel
    attention = "MHA" if m.n_kv_heads == m.n_heads else f"GQA {m.n_kv_heads} kv"
    console.print(f"[bold]{plan.name}[/bold]  {plan.description}".rstrip())
    if m.host == "lstm":
        console.print(f"model: LSTM host (Shazeer et al. 2017): {m.n_layers} LSTM layers of {m.d_model} units, expert d_ff {m.d_ff}, "
                      f"{m.activation}, vocab {m.vocab_size}, seq {m.seq_len}, {'tied' if m.tied_embeddings else 'untied'} embeddings")  # fmt: skip
    else:
        console.print(
            f"model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({attention}, head_dim {m.head_dim}), "
            f"d_ff {m.d_ff}, {m.activation}, {m.norm}, {m.positions}, vocab {m.vocab_size}, seq {m.seq_len}, "
            f"{'tied' if m.tied_embeddings else 'untied'} embeddings"
        )
    if m.encoder is not None:
        e = m.encoder
        console.print(f"encoder-decoder: encoder {e.n_layers} blocks over {e.seq_len} input tokens, decoder {m.n_layers} blocks over "
                      f"{m.seq_len} target tokens with cross-attention; span corruption (noise {e.noise_density:g}, mean span {e.mean_span:g}); "
                      f"T5 relative bias ({m.relative_buckets} buckets, max distance {m.relative_max_distance})")  # fmt: skip
    extras = attention_features(m)
    if extras:
        console.print("attention: " + ", ".join(extras))
    console.print(
        f"parallel: world {p.world} = pp {p.pp} x tp {p.tp} x dp {p.dp} (ep {p.ep}), micro_batch {p.micro_batch}, "
        f"global_batch {p.global_batch} (accum {p.grad_accum}), {p.precision}, ZeRO-{p.zero_stage}, recompute {p.recompute}; "
        f"T = {plan.tokens_per_group} tokens per routing group" + (f" (encoder: {plan.parallel.micro_batch * m.encoder.seq_len})" if m.encoder else "")
    )
    table = Table(show_lines=False)
    for column in ("layer", "kind", "router", "experts / ffn", "capacity"):
        table.add_column(column)
    rows = [layer_row(plan, layer) for layer in plan.layers] if every_layer else grouped_rows(plan)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def attention_features(m) -> list[str]:
    """The model keys beyond a plain Llama block, in words (empty for one)."""
    out = []
    if m.mla is not None:
        a = m.mla
        out.append(f"MLA (q_lora_rank {a.q_lora_rank}, kv_lora_rank {a.kv_lora_rank}, qk {a.qk_nope_head_dim}+{a.qk_rope_head_dim} rope, v {a.v_head_dim})")
    if m.qk_norm != "none":
        out.append(f"QK-norm {m.qk_norm.replace('_', '-')}")
    if m.rope_fraction != 1.0:
        out.append(f"RoPE on {m.rope_dim} of {m.head_dim} channels")
    if m.attention_sinks:
        out.append("attention sinks")
    if m.window is not None:
        layers = "every layer" if len(m.window_layers) == m.n_layers else f"layers {list(m.window_layers)}"
        out.append(f"sliding window {m.window} in {layers}")
    biases = [name for name, on in (("q/k/v", m.qkv_bias), ("o_proj", m.out_bias), ("LM head", m.lm_head_bias)) if on]
    if biases:
        out.append("biases on " + ", ".join(biases))
    if m.norm == "layernorm" and not m.norm_bias:
        out.append("LayerNorm without bias")
    return out
