"""Side by side: llm-analysis (PyPI `llm-analysis`, cli99) against moespec on the same MoE shapes.

For each spec (Mixtral-8x7B and Qwen1.5-MoE-A2.7B by default), one run prints:
- the true parameter count, total and active, read off moespec's compiled model on the meta
  device (`count_parameters(build_model(plan, device="meta"), plan)`);
- moespec's simulator prediction of the same (`simulate(plan, backend)`), which must equal it;
- llm-analysis's figures for the same model shape: total and active parameters, forward FLOPs
  per token of one MoE/MLP block, FLOPs of one micro-step, and its training step time at two
  expert-parallel degrees (to show whether it moves with EP), beside moespec's step time;
- the ratio llm-analysis / true for every count.

    python bench/vs_llm_analysis.py [--specs A.yaml B.yaml] [--backend dgx-h100]
                                    [--llm-analysis-path /tmp/llma] [--json]

llm-analysis is kept out of the project's environment (it pins transformers/huggingface-hub,
which would drag torch-adjacent packages around). Install it beside, with no dependencies;
it imports with only `fire` (and fire's `six`, `termcolor`); transformers is optional to it:

    pip download --no-deps llm-analysis      # METADATA: fire, huggingface-hub, transformers
    pip install --target /tmp/llma --no-deps llm-analysis "fire==0.5.0" six termcolor

If it cannot be imported from --llm-analysis-path (or the environment), its column is
skipped, said so on stderr and as `"llm_analysis": {"skipped": "..."}` in --json.

How our spec maps onto llm-analysis 0.2.2's ModelConfig (what it cannot express):
- d_model -> hidden_dim, n_layers -> num_layers, n_heads -> n_head, n_kv_heads ->
  num_key_value_heads (GQA is supported, but it assumes head_dim = hidden_dim / n_head), vocab
  -> vocab_size, seq_len -> max_seq_len, experts.count -> moe_num_experts, k -> moe_top_k,
  experts.d_ff -> ffn_embed_dim (expansion_ratio passed too: 14336/4096 is not an integer and
  its ModelConfig asserts divisibility otherwise).
- NOT expressible: gated FFNs (SwiGLU has 3 matrices; it always counts 2. The training flag
  `mlp_gated_linear_units` only changes activation memory); shared experts (Qwen's 5632-wide
  shared expert and its gate are absent); qkv bias; an untied LM head (its parameter total
  always counts one shared embedding table); and per-layer MoE placement (every layer is MoE).
- Its MLP forward FLOPs are a constant 16 * hidden_dim^2 per token per layer, whatever
  ffn_embed_dim, moe_top_k or moe_num_experts are; its router FLOPs are not counted.
- Its training step time is FLOPs / (tp * pp * peak * flops_efficiency) times gradient
  accumulation: no all-to-all, no all-reduce, and ep_size does not enter it (ep_size only
  divides expert weight/grad/optimizer memory).
Hardware: llm-analysis gets a GPUConfig built from the same moespec backend (peak bf16 FLOPs,
HBM bandwidth, memory, NVLink), and flops/HBM efficiencies equal to the backend's, so the
two time models start from the same numbers. Precision bf16 -> dtype w16a16e16; ZeRO stage and
recompute map one to one (none/selective/full).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from moespec.model.build import build_model
from moespec.model.counting import count_parameters
from moespec.sim.backend import load_backend
from moespec.sim.counts import step_flops_by_part
from moespec.sim.model import simulate
from moespec.spec import load_plan

DEFAULT_SPECS = ("specs/mixtral-8x7b.yaml", "specs/qwen1.5-moe-a2.7b.yaml")
# Two expert-parallel degrees per spec (each divides the expert count and the world of 8).
DEFAULT_EPS = {"mixtral-8x7b": (2, 8), "qwen1.5-moe-a2.7b": (2, 4)}


def import_llm_analysis(path: str):
    """(module, None) or (None, why). Its logger ('__name__', stderr) is quietened first, so the
    import-time 'transformers is not installed' warning and its INFO report do not print."""
    logging.getLogger("__name__").setLevel(logging.ERROR)
    if path and Path(path).is_dir() and path not in sys.path:
        sys.path.insert(0, path)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from llm_analysis import analysis, config  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a dependency (fire) missing, or its own import failing
        return (
            None,
            f"cannot import llm_analysis from {path!r} or the environment: {type(exc).__name__}: {exc}",
        )
    return analysis, None


def with_parallel(plan, *, world: int, ep: int):
    """The spec on `world` devices: dp = world (tp = pp = 1 here), the given ep, the spec's
    micro-batch; the global batch rounded to a multiple of micro_batch * dp."""
    p = plan.parallel
    dp = world // (p.tp * p.pp)
    per_step = p.micro_batch * dp
    global_batch = max(p.global_batch // per_step, 1) * per_step
    return dataclasses.replace(
        plan, parallel=dataclasses.replace(p, dp=dp, ep=ep, global_batch=global_batch)
    )


def true_counts(plan) -> dict:
    counts = count_parameters(build_model(plan, device="meta"), plan)
    return {
        "total": counts.total,
        "active": counts.active,
        "embedding": counts.embedding,
        "lm_head": counts.lm_head,
    }


def moe_fwd_flops_per_token(plan) -> int:
    """Forward matmul FLOPs per token of one MoE block's FFN side (router + k routed experts +
    shared experts), from the exact counts: (block - attention) / 3, one sequence."""
    one = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, micro_batch=1, recompute="none"))
    parts = step_flops_by_part(one)
    ffn = sum(parts.get(name, 0) for name in ("router", "experts_capacity", "experts_dropless", "shared_experts"))
    return ffn // len(plan.moe_layers) // 3 // plan.model.seq_len


def moespec_side(plan, backend, eps) -> dict:
    per_ep = {}
    for ep in eps:
        report = simulate(
            with_parallel(plan, world=backend.num_devices, ep=ep), backend
        )
        mem = report["memory_per_device"]
        per_ep[ep] = {
            "dp": report["dp"], "global_batch": report["global_batch"],
            "step_s": report["time"]["step_s"], "compute_s": report["time"]["compute_s"],
            "a2a_s": report["time"]["a2a_s"], "exposed_allreduce_s": report["time"]["exposed_allreduce_s"],
            "state_bytes_per_gpu": mem["weights_bytes"] + mem["grads_bytes"] + mem["optimizer_bytes"],
            "fits": mem["fits"],
        }  # fmt: skip
    return {
        "params": {k: report["params"][k] for k in ("total", "active")},
        "step_flops_per_rank_microstep": report["step_flops_per_rank_microstep"],
        "moe_fwd_flops_per_token_per_layer": moe_fwd_flops_per_token(plan),
        "per_ep": per_ep,
    }


def llm_analysis_side(la, plan, backend, eps) -> dict:
    from llm_analysis.config import (
        DtypeConfig,
        GPUConfig,
        ModelConfig,
        ParallelismConfig,
    )

    m, p = plan.model, plan.parallel
    moe = plan.moe_layers[0].moe
    if p.precision not in ("bf16", "fp16"):
        raise ValueError(
            f"llm-analysis models 16-bit (or int) GEMMs only; the spec trains in {p.precision}"
        )
    model = ModelConfig(
        name=plan.name, num_layers=m.n_layers, n_head=m.n_heads, hidden_dim=m.d_model,
        vocab_size=m.vocab_size, max_seq_len=m.seq_len, num_key_value_heads=m.n_kv_heads,
        ffn_embed_dim=moe.experts.d_ff, expansion_ratio=moe.experts.d_ff / m.d_model,
        moe_num_experts=moe.experts.count, moe_top_k=moe.router.experts_per_token,
    )  # fmt: skip
    dev, link = backend.device, backend.intra_node
    gpu_kwargs = {
        "name": dev.kind, "mem_per_GPU_in_GB": dev.memory_bytes / 2**30,  # it multiplies by 1024**3
        "hbm_bandwidth_in_GB_per_sec": dev.memory_bandwidth_Bps / 1e9,
        "intra_node_bandwidth_in_GB_per_sec": link.bandwidth_Bps / 1e9, "intra_node_min_message_latency": link.latency_s,
        "peak_fp16_TFLOPS": dev.peak_flops_per_s[p.precision] / 1e12,
    }  # fmt: skip
    if backend.inter_node is not None:
        gpu_kwargs["inter_node_bandwidth_in_GB_per_sec"] = (
            backend.inter_node.bandwidth_Bps / 1e9
        )
    gpu = GPUConfig(**gpu_kwargs)
    dtype = DtypeConfig(name="w16a16e16")
    recompute = {"none": la.ActivationRecomputation.NONE, "selective": la.ActivationRecomputation.SELECTIVE,
                 "full": la.ActivationRecomputation.FULL}[p.recompute]  # fmt: skip
    gated = m.activation in ("swiglu", "geglu")
    per_ep, first = {}, None
    for ep in eps:
        run = with_parallel(plan, world=backend.num_devices, ep=ep).parallel
        parallel = ParallelismConfig(
            tp_size=run.tp, pp_size=run.pp, dp_size=run.dp, ep_size=ep
        )
        analysis = la.LLMAnalysis(model, gpu, dtype, parallel, flops_efficiency=backend.matmul_efficiency,
                                  hbm_memory_efficiency=backend.memory_efficiency)  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):
            summary = analysis.training(
                batch_size_per_gpu=run.micro_batch, global_batch_size=run.global_batch, seq_len=m.seq_len,
                activation_recomputation=recompute, ds_zero=la.DSZeRO(p.zero_stage), mlp_gated_linear_units=gated,
            )  # fmt: skip
        first = first or (analysis, summary)
        per_ep[ep] = {
            "dp": run.dp, "global_batch": summary["global_batch_size"],
            "gradient_accumulation_steps": summary["gradient_accumulation_steps"],
            "step_s": summary["latency_per_iter"],
            "state_bytes_per_gpu": summary["(weight+op_state+grad)_memory_per_gpu"],
            "memory_left_per_gpu": summary["memory_left_per_gpu"],
        }  # fmt: skip
    analysis, summary = first
    fwd = analysis.get_num_flops_fwd_total(p.micro_batch, m.seq_len)
    return {
        "version": _version(),
        "params": {
            "total": int(summary["num_params_total"]),
            "active": int(summary["num_active_params_total"]),
        },
        "step_flops_per_rank_microstep_fwd_bwd": int(
            fwd + analysis.get_num_flops_bwd_total(p.micro_batch, m.seq_len)
        ),
        "step_flops_per_rank_microstep_with_recompute": int(
            summary["num_flops_total_per_micro_batch"]
        ),
        "moe_fwd_flops_per_token_per_layer": int(
            analysis.get_num_flops_fwd_per_layer_mlp(1, 1)
        ),
        "per_ep": per_ep,
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llm-analysis")
    except Exception:  # noqa: BLE001 - metadata is nice to have
        return "unknown"


def compare(spec: str, backend, la, eps) -> dict:
    plan = load_plan(REPO / spec if not Path(spec).is_absolute() else spec)
    eps = tuple(eps or DEFAULT_EPS.get(plan.name, (1, plan.parallel.ep)))
    for ep in eps:
        n_experts = plan.moe_layers[0].moe.experts.count
        if ep < 1 or n_experts % ep or backend.num_devices % ep:
            raise SystemExit(
                f"{plan.name}: ep {ep} must divide the {n_experts} experts and the {backend.num_devices} devices"
            )
    true = true_counts(plan)
    ours = moespec_side(plan, backend, eps)
    for key in ("total", "active"):
        if ours["params"][key] != true[key]:
            raise AssertionError(
                f"{plan.name}: simulate's {key} params {ours['params'][key]} != compiled model's {true[key]}"
            )
    row = {"spec": plan.name, "backend": backend.name, "world": backend.num_devices, "eps": list(eps),
           "true_params": true, "moespec": ours}  # fmt: skip
    if la is None:
        return row
    try:
        theirs = llm_analysis_side(la, plan, backend, eps)
    except Exception as exc:  # noqa: BLE001 - API drift in another llm-analysis version: report, don't crash
        row["llm_analysis"] = {"skipped": f"{type(exc).__name__}: {exc}"}
        return row
    theirs["ratio_to_true"] = {
        "params_total": theirs["params"]["total"] / true["total"],
        "params_active": theirs["params"]["active"] / true["active"],
        "moe_fwd_flops_per_token_per_layer": theirs["moe_fwd_flops_per_token_per_layer"] / ours["moe_fwd_flops_per_token_per_layer"],
        "step_flops_fwd_bwd": theirs["step_flops_per_rank_microstep_fwd_bwd"] / ours["step_flops_per_rank_microstep"],
    }  # fmt: skip
    theirs["ratio_to_moespec_step_s"] = {
        str(ep): theirs["per_ep"][ep]["step_s"] / ours["per_ep"][ep]["step_s"]
        for ep in eps
    }
    row["llm_analysis"] = theirs
    return row


def _num(x: float) -> str:
    return f"{x / 1e9:,.3f}B" if x >= 1e9 else f"{x / 1e6:,.2f}M"


def _line(label: str, true: float, ours: float, theirs: float | None, fmt=_num) -> None:
    text = f"   {label:<46}{fmt(true):>18}{fmt(ours):>18}"
    if theirs is not None:
        text += f"{fmt(theirs):>18}{theirs / true:>10.3f}"
    print(text)


def print_table(rows: list[dict], skipped: str | None) -> None:
    if skipped:
        print(f"llm-analysis column SKIPPED: {skipped}\n")
    for row in rows:
        true, ours, theirs = row["true_params"], row["moespec"], row.get("llm_analysis")
        have = theirs is not None and "skipped" not in theirs
        print(
            f"== {row['spec']} on {row['backend']} ({row['world']} devices, dp {row['world']}, ep in {row['eps']})"
        )
        if theirs is not None and not have:
            print(f"   llm-analysis column SKIPPED: {theirs['skipped']}")
        head = f"   {'figure':<46}{'true (compiled)':>18}{'moespec sim':>18}"
        head += f"{'llm-analysis':>18}{'llm/true':>10}" if have else ""
        print(head)

        pick = (lambda get, t=theirs: get(t)) if have else (lambda get: None)
        _line(
            "params, total",
            true["total"],
            ours["params"]["total"],
            pick(lambda t: t["params"]["total"]),
        )
        _line(
            "params, active per token",
            true["active"],
            ours["params"]["active"],
            pick(lambda t: t["params"]["active"]),
        )
        mflops = ours["moe_fwd_flops_per_token_per_layer"]
        _line(
            "MoE block fwd FLOPs / token / layer",
            mflops,
            mflops,
            pick(lambda t: t["moe_fwd_flops_per_token_per_layer"]),
        )
        sflops = ours["step_flops_per_rank_microstep"]
        _line(
            "FLOPs / rank / micro-step (fwd+bwd)",
            sflops,
            sflops,
            pick(lambda t: t["step_flops_per_rank_microstep_fwd_bwd"]),
            fmt=lambda x: f"{x / 1e12:,.1f}T",
        )
        if have:
            rec = theirs["step_flops_per_rank_microstep_with_recompute"]
            print(
                f"   {'  llm-analysis incl. its recompute':<46}{'':>18}{'':>18}{rec / 1e12:>17,.1f}T"
            )
        print(
            f"   {'step time':<46}{'':>18}{'moespec sim':>18}"
            + (f"{'llm-analysis':>18}{'llm/sim':>10}" if have else "")
        )
        for ep in row["eps"]:
            o = ours["per_ep"][ep]
            label = f"  ep {ep} (sim: all-to-all {o['a2a_s'] * 1e3:,.0f} ms of it)"
            text = f"   {label:<46}{'':>18}{o['step_s']:>17,.3f}s"
            if have:
                l = theirs["per_ep"][ep]
                text += f"{l['step_s']:>17,.3f}s{l['step_s'] / o['step_s']:>10.3f}"
            print(text)
        print(
            f"   {'weights+grads+optimizer per GPU':<46}{'':>18}{'moespec sim':>18}"
            + (f"{'llm-analysis':>18}{'llm/sim':>10}" if have else "")
        )
        for ep in row["eps"]:
            o = ours["per_ep"][ep]
            label = f"  ep {ep}" + (
                "" if o["fits"] else " (sim: does not fit with activations)"
            )
            text = (
                f"   {label:<46}{'':>18}{o['state_bytes_per_gpu'] / 2**30:>15,.1f}GiB"
            )
            if have:
                l = theirs["per_ep"][ep]
                text += f"{l['state_bytes_per_gpu'] / 2**30:>15,.1f}GiB{l['state_bytes_per_gpu'] / o['state_bytes_per_gpu']:>10.3f}"
            print(text)
        print(
            "   (true params: sum(numel) of the model built on meta; true FLOPs: moespec's exact counts, which the\n"
            "    tests hold equal to torch's FlopCounterMode on the compiled model; neither includes recompute)"
        )
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    parser.add_argument(
        "--backend",
        default="dgx-h100",
        help="moespec backend; llm-analysis gets the same GPU figures",
    )
    parser.add_argument(
        "--eps",
        type=int,
        nargs=2,
        default=None,
        help="two expert-parallel degrees (default per spec)",
    )
    parser.add_argument(
        "--llm-analysis-path",
        default="/tmp/llma",
        help="a `pip install --target` dir holding llm_analysis",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document with both sides"
    )
    args = parser.parse_args(argv)

    backend = load_backend(args.backend)
    la, skipped = import_llm_analysis(args.llm_analysis_path)
    if skipped:
        print(f"llm-analysis column skipped: {skipped}", file=sys.stderr)
    rows = [compare(spec, backend, la, args.eps) for spec in args.specs]
    if args.json:
        doc = {"backend": backend.name, "llm_analysis": {"skipped": skipped} if skipped else {"path": args.llm_analysis_path},
               "rows": rows}  # fmt: skip
        json.dump(doc, sys.stdout, indent=2, default=str)
        print()
    else:
        print_table(rows, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
