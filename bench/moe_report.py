"""The report of a `bench/moe_layer.py` run: its table, the worst of each target ratio (as a
ratio of medians and paired by repeat) with its re-measure, and the busy slowdowns, from the
run's JSON document, so that `--show FILE` prints a saved run as the run printed it. Why a
module of its own: the bench measures (shapes, layers, timing, the re-measure); this only
reads what was measured."""

from __future__ import annotations

import statistics


def median_ratio(r: dict, num: str, den: str) -> float:
    return r["median_ms"][num] / r["median_ms"][den]


def paired_ratio(r: dict, num: str, den: str) -> float:
    """The median over repeats of num's step / den's step in the same repeat: the two run
    within a second of each other, so a slow stretch of the machine (this VM's dense FFN moved
    1.5x between runs) lands on both sides of a ratio, where it may land on one side of a
    ratio of medians."""
    return statistics.median(a / b for a, b in zip(r["step_ms"][num], r["step_ms"][den]))


def _worst(results: list[dict], num: str, den: str, where, ratio, times: str) -> tuple[float, str] | None:
    ratios = [(ratio(r, num, den), r["name"]) for r in results if times in r and num in r[times] and den in r[times] and where(r)]
    return max(ratios) if ratios else None


def worst(results: list[dict], num: str, den: str, where=lambda r: True) -> tuple[float, str] | None:
    return _worst(results, num, den, where, median_ratio, "median_ms")


def worst_paired(results: list[dict], num: str, den: str, where=lambda r: True) -> tuple[float, str] | None:
    """As `worst`, by `paired_ratio`; None for runs saved without steps."""
    return _worst(results, num, den, where, paired_ratio, "step_ms")


def _every(r: dict) -> bool:
    return True


def _rows(r: dict) -> int:
    """Rows per expert at even routing: T * k / E."""
    return r["tokens"] * r["k"] // r["E"]


def _many_rows(r: dict) -> bool:
    return _rows(r) >= 512


# The issue-13 targets the run ends with: (label, numerator, denominator, which shapes).
TARGETS = [("dropless / capacity", "ours_dropless", "ours_capacity", _every),
           ("dropless / dense where rows per expert >= 512", "ours_dropless", "dense", _many_rows),
           ("dropless / HF grouped_mm", "ours_dropless", "hf_grouped_mm", _every),
           ("BASE / Switch", "ours_base", "ours_switch", _every)]  # fmt: skip


# The A/B columns beside ours_dropless (moe_layer.AB) and what their ratio reads as
AB_LABELS = {"dropless_chunks256": "oneDNN calls of up to 1024 rows / of 256",
             "dropless_gate_up_apart": "gate and up as one product where d_ff <= 96 / apart"}  # fmt: skip


def confirm_line(checked: dict) -> str:
    """The re-measured figure of one target (a run saved before other targets were re-measured
    holds one dict without a label: dropless / capacity)."""
    label = checked.get("label", "dropless / capacity")
    num, den = next((n, d) for lab, n, d, _ in TARGETS if lab == label)
    ratios = sorted(a / b for a, b in zip(checked["step_ms"][num], checked["step_ms"][den]))
    n = len(ratios)
    return (f"worst {label} re-measured at {checked['name']}: {statistics.median(ratios):.2f}x paired over {n} fresh repeats "
            f"(quartiles {ratios[n // 4]:.2f}x-{ratios[(3 * n) // 4]:.2f}x)")


def render(doc: dict) -> str:
    """The table, worst ratios and busy slowdowns of a run (`--json` output; `--show FILE`)."""
    text = []
    text.append(f"torch {doc['torch']}, {doc['threads']} threads; {doc['step']}; median of {doc['repeats']}; "
                f"load average {doc['load_avg_1min'][0]} -> {doc['load_avg_1min'][1]}")
    if "process_tuning" in doc:
        tuning = doc["process_tuning"]
        text.append(f"process: GOMP_SPINCOUNT {tuning['GOMP_SPINCOUNT']}, malloc keeps freed memory: {tuning['malloc_keeps_freed_memory']}"
                    + (f"; thread engine's fp32 products on {doc['cpu_gemm']}" if "cpu_gemm" in doc else ""))
    names = list(doc["shapes"][0]["median_ms"])
    text.append(f"{'shape':<9} {'D':>4} {'F':>5} {'E':>3} {'K':>2} {'T':>5} {'rows/E':>6}  " + "  ".join(f"{n:>22}" for n in names))
    for r in doc["shapes"]:
        cells = [f"{r['median_ms'][n]:9.1f} ms ({r['ratio_to_dense'][n]:4.2f}x)" for n in names]
        text.append(f"{r['name']:<9} {r['d']:>4} {r['f']:>5} {r['E']:>3} {r['k']:>2} {r['tokens']:>5} {_rows(r):>6}  " + "  ".join(f"{c:>22}" for c in cells))
        for note in r["notes"]:
            text.append(f"   note: {note}")
    checked = doc.get("confirm") or []
    checked = [checked] if isinstance(checked, dict) else checked  # saved before every target was re-measured
    for label, num, den, where in TARGETS:
        found, paired = worst(doc["shapes"], num, den, where), worst_paired(doc["shapes"], num, den, where)
        if found:
            text.append(f"worst {label}: {found[0]:.2f}x at {found[1]}" + (f" (paired by repeat: {paired[0]:.2f}x at {paired[1]})" if paired else ""))
        text.extend(confirm_line(c) for c in checked if c.get("label", "dropless / capacity") == label)
    engines = [r["median_ms"]["ours_dropless"] / r["median_ms"]["dropless_grouped_mm"] for r in doc["shapes"] if "dropless_grouped_mm" in r["median_ms"]]
    if engines:
        text.append(f"thread engine / _grouped_mm (ours_dropless / dropless_grouped_mm): {min(engines):.2f}x to {max(engines):.2f}x")
    if "dropless_mkl" in doc["shapes"][0]["median_ms"]:
        gemm = [paired_ratio(r, "ours_dropless", "dropless_mkl") for r in doc["shapes"]]
        text.append(f"chosen library / MKL (ours_dropless / dropless_mkl, paired by repeat): {min(gemm):.2f}x to {max(gemm):.2f}x")
    for column, label in AB_LABELS.items():
        if column in doc["shapes"][0]["median_ms"]:
            ratios = [(paired_ratio(r, "ours_dropless", column), r["name"]) for r in doc["shapes"]]
            text.append(f"{label} (ours_dropless / {column}, paired by repeat): " + ", ".join(f"{name} {v:.2f}x" for v, name in ratios))
    small = [r for r in doc["shapes"] if not _many_rows(r) and "hf_grouped_mm" in r["median_ms"]]
    if small:
        speedups = [r["median_ms"]["hf_grouped_mm"] / r["median_ms"]["ours_dropless"] for r in small]
        text.append(f"below 512 rows per expert, HF grouped_mm / ours_dropless: at least 1.00x at {sum(v >= 1 for v in speedups)} "
                    f"of {len(small)} shapes, at least 1.25x at {sum(v >= 1.25 for v in speedups)} (lowest {min(speedups):.2f}x)")
    if doc["busy_shapes"]:
        text.append("beside a busy core: slowdown (busy / quiet) per path")
        for quiet, loaded in zip(doc["shapes"], doc["busy_shapes"]):
            slow = {n: loaded["median_ms"][n] / quiet["median_ms"][n] for n in names}
            text.append(f"{quiet['name']:<9} " + "  ".join(f"{n} {v:4.2f}x" for n, v in slow.items()))

        def slowdown(quiet, loaded, name):
            return loaded["median_ms"][name] / quiet["median_ms"][name]

        ratios = [(slowdown(q, b, "ours_dropless") / slowdown(q, b, "ours_capacity"), q["name"]) for q, b in zip(doc["shapes"], doc["busy_shapes"])]
        text.append(f"worst dropless slowdown / capacity slowdown: {max(ratios)[0]:.2f}x at {max(ratios)[1]}")
    return "\n".join(text)
