"""Unseen shapes for the newer hosts: saved activations and op counts of T5 encoder-decoders,
LSTM hosts and SparseMixer against the real model's traces, on shapes and key combinations the
constants (sim/activations.py, sim/ops.py) were not fitted on. Prints one line per case.
Run: python bench/unseen_hosts.py (about a minute on 2 cores)."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_activation_bytes import traced_saved_bytes, predicted_saved_bytes
from moespec.spec import plan_from_text
from moespec.profiling.optrace import trace_step_ops
from moespec.sim import ops
from moespec.sim.design import DesignBatch
def host(p):
    b = DesignBatch.from_plans([p]); parts = [b] if b.encoder is None else [b, b.encoder]
    return sum(float(ops.other_ops(x)[0][0]) + float(ops.other_ops(x)[1][0]) - float(x.table.per_design(x.table.count * ops.dropless_kernel_ops(x, x.table)[1], 1)[0]) for x in parts) * p.parallel.grad_accum
cases = {
 "t5 d96 6h gelu 3+1 noisy-top2 enc48/dec20 bf16": ("t5", "model: {vocab_size: 320, d_model: 96, n_layers: 1, n_heads: 6, d_ff: 160, activation: gelu, positions: relative, tied_embeddings: false, seq_len: 20, encoder: {n_layers: 3, seq_len: 48}}\nmoe: {placement: {type: all}, experts: {count: 6, d_ff: 64}, router: {type: noisy_topk, k: 2}, capacity: {factor: 1.5}}\nparallelism: {micro_batch: 3, precision: bf16}"),
 "t5 d48 hd16 geglu 2+2 sparsemixer dropless layernorm": ("t5", "model: {vocab_size: 300, d_model: 48, n_layers: 2, n_heads: 2, head_dim: 16, d_ff: 96, activation: geglu, norm: layernorm, positions: relative, relative_attention: {buckets: 16, max_distance: 32}, tied_embeddings: true, seq_len: 12, encoder: {n_layers: 2, seq_len: 40}}\nmoe: {placement: {type: every, every: 2, offset: 0}, experts: {count: 8, d_ff: 32}, router: {type: sparsemixer, k: 2}, capacity: {dropless: true}}\nparallelism: {micro_batch: 2}"),
 "lstm d80 3 layers s24 moe after 0,2 sigmoid_bias dropless": ("lstm", "model: {host: lstm, vocab_size: 256, d_model: 80, n_layers: 3, d_ff: 96, activation: swiglu, seq_len: 24}\nmoe: {placement: {type: layers, layers: [0, 2]}, experts: {count: 4}, router: {type: sigmoid_bias, k: 2}, capacity: {dropless: true}}\nparallelism: {micro_batch: 4}"),
 "lstm d32 1 layer s48 switch capacity tied dropout": ("lstm", "model: {host: lstm, vocab_size: 256, d_model: 32, n_layers: 1, d_ff: 64, activation: relu, seq_len: 48, tied_embeddings: true, dropout: 0.1}\nmoe: {placement: {type: all}, experts: {count: 8}, router: {type: switch}, capacity: {factor: 1.0}}\nparallelism: {micro_batch: 2}"),
 "decoder sparsemixer E16 k4 d96 bf16": ("dec", "model: {vocab_size: 256, d_model: 96, n_layers: 2, n_heads: 4, d_ff: 192, seq_len: 40}\nmoe: {placement: {type: all}, experts: {count: 16, d_ff: 48}, router: {type: sparsemixer, k: 4, jitter_eps: 0.3}, capacity: {factor: 2.0}}\nparallelism: {micro_batch: 3, precision: bf16}"),
}
for name, (kind, body) in cases.items():
    p = plan_from_text(f"version: 1\nname: u\n{body}\n", "u")
    traced = traced_saved_bytes(p)
    pred = predicted_saved_bytes(p)
    t = trace_step_ops(p)["other"]; h = host(p)
    print(f"{name:55s} saved {pred/traced-1:+.2%}  ops {h/t-1:+.1%}")
