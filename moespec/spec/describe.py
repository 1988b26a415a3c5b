"""Short human summaries of plan pieces, shared by `show`, `compile` and later reports."""

from __future__ import annotations

import dataclasses

from moespec.spec.plan import CapacityPlan, ExpertsPlan, LayerPlan, RouterPlan, SpecPlan


def router_summary(router: RouterPlan) -> str:
    """'topk k=2 norm aux=0.01' : the type plus every field that differs from its default."""
    defaults = type(router)()
    changed = [
        f"{field.name}={getattr(router, field.name)}"
        for field in dataclasses.fields(router)
        if field.name != "type" and getattr(router, field.name) != getattr(defaults, field.name)
    ]
    k = f" k={router.k}" if hasattr(router, "k") and "k=" not in " ".join(changed) else ""
    return f"{router.type}{k}" + (" " + " ".join(changed) if changed else "")


def experts_summary(experts: ExpertsPlan) -> str:
    text = f"{experts.count} x {experts.d_ff}"
    if experts.shared_count:
        text += f" + {experts.shared_count} shared x {experts.shared_d_ff}"
        text += " (gated)" if experts.shared_gate else ""
    return text


def capacity_summary(capacity: CapacityPlan | None, *, tokens: int, experts_per_token: int, n_experts: int) -> str:
    if capacity is None:
        return f"balanced: {-(-tokens // n_experts)}/expert"
    if capacity.dropless:
        return "dropless"
    slots = capacity.capacity(tokens, experts_per_token, n_experts)
    return f"cf {capacity.factor:g}/{capacity.eval_factor:g} C={slots} ({capacity.drop_policy})"


def layer_row(plan: SpecPlan, layer: LayerPlan) -> tuple[str, str, str, str, str]:
    """(index, kind, router, experts or FFN width, capacity) for one layer."""
    stack = "" if plan.model.encoder is None else f" ({layer.stack[:3]})"  # an encoder-decoder's blocks: enc or dec
    if layer.moe is None:
        return str(layer.index), "dense" + stack, "-", "lstm" if plan.model.host == "lstm" else f"ffn {layer.d_ff}", "-"
    moe = layer.moe
    kind = ("moe (base)" if moe.router.type == "base" else "moe") + stack
    capacity = capacity_summary(
        moe.capacity,
        tokens=plan.tokens_of(layer),
        experts_per_token=moe.router.experts_per_token,
        n_experts=moe.experts.count,
    )
    return str(layer.index), kind, router_summary(moe.router), experts_summary(moe.experts), capacity


def grouped_rows(plan: SpecPlan) -> list[tuple[str, str, str, str, str]]:
    """Layer rows with runs of identical layers collapsed ('1-31 (x16)'), so 60-layer models fit."""
    rows: list[list] = []
    for layer in plan.layers:
        row = layer_row(plan, layer)
        if rows and rows[-1][1:] == list(row[1:]) and _same_stride(rows[-1], layer.index):
            rows[-1][0].append(layer.index)
        else:
            rows.append([[layer.index], *row[1:]])
    out = []
    for indices, *rest in rows:
        label = str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"
        if len(indices) > 1 and indices[-1] - indices[0] + 1 != len(indices):
            label += f" every {indices[1] - indices[0]}"
        out.append((label, *rest))
    return out


def _same_stride(row: list, index: int) -> bool:
    indices = row[0]
    stride = indices[1] - indices[0] if len(indices) > 1 else index - indices[-1]
    return index - indices[-1] == stride
