"""PNG plots written next to the profile's JSON report (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

from moespec.files import write_atomic


def _figure_bytes(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def predicted_parts_s(report: dict) -> dict[str, float]:
    """The prediction's step split into the parts the model has (milliseconds apart)."""
    time = report["predicted"]["time"]
    parts = {f"matmul: {name.replace('_', ' ')}": s for name, s in report["predicted"]["compute_s_by_part"].items()}
    parts |= {"elementwise": time["elementwise_s"], "host overhead": time["overhead_s"], "all-to-all": time["a2a_s"],
              "tp all-reduces": time["tp_comm_s"], "pipeline sends": time["pp_comm_s"], "pipeline bubble": time["bubble_s"],
              "grad all-reduce (exposed)": time["exposed_allreduce_s"], "optimizer": time["optimizer_s"]}  # fmt: skip
    return {name: s for name, s in parts.items() if s > 0}


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # 1. Time breakdown: predicted parts beside measured regions, one stacked bar each.
    fig, ax = plt.subplots(figsize=(11, 3.4))
    bars = {"predicted": predicted_parts_s(report),
            "measured": {k.replace("_", " "): v for k, v in report["measured"]["region_s"].items() if v > 0}}  # fmt: skip
    colours = plt.get_cmap("tab20").colors
    handles = []
    for row, (label, parts) in enumerate(bars.items()):
        left, total = 0.0, sum(parts.values()) * 1e3
        for i, (name, seconds) in enumerate(sorted(parts.items(), key=lambda item: -item[1])):
            ms = seconds * 1e3
            bar = ax.barh(row, ms, left=left, color=colours[(i + 10 * row) % len(colours)], edgecolor="white",
                          label=f"{label}: {name} ({ms:.2f} ms)")  # fmt: skip
            handles.append(bar)
            if ms > 0.12 * total:
                ax.text(left + ms / 2, row, name, ha="center", va="center", fontsize=7)
            left += ms
    ax.set_yticks(range(len(bars)), list(bars))
    ax.set_xlabel("ms per optimizer step")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"{report['name']}: step time, predicted ({report['backend']}) vs measured (world {report['world']})")
    path = out_dir / "time_breakdown.png"
    write_atomic(path, _figure_bytes(fig))
    plt.close(fig)
    written.append(path)
    # 2. Expert load per MoE layer.
    load = report["measured"]["expert_load"]
    if load:
        fig, axes = plt.subplots(1, len(load), figsize=(3 * len(load), 2.8), squeeze=False)
        for ax, (layer, stats) in zip(axes[0], load.items()):
            counts = stats["tokens_per_expert"]
            ax.bar(range(len(counts)), counts, color="tab:blue")
            ax.axhline(stats["mean"], color="black", linestyle="--", linewidth=1)
            ax.set_title(f"layer {layer}: max/mean {stats['max_over_mean']:.2f}", fontsize=9)
            ax.set_xlabel("expert")
        axes[0][0].set_ylabel("tokens routed")
        path = out_dir / "expert_load.png"
        write_atomic(path, _figure_bytes(fig))
        plt.close(fig)
        written.append(path)
    return written
