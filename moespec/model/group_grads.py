"""The thread engine's gradient buffers (model/grouped_experts.py): the full gradient tensors
that its pieces write their parts of, scratch slots for the partial weight gradients of pieces
split off a group, and their sum in slot order, so that the result does not depend on which
thread ran what. `saved` is the kernel's `_Saved` (x, token_A, gate_A, weights, biases)."""

from __future__ import annotations

import torch

_PARAMETERS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


def scratch_slots(saved) -> int:
    """How many split-off pieces the backward may have: each needs a slot of partial weight
    (and bias) gradients, and all of them together stay within one [A, D] tensor, the gathered
    copy of x that the all-groups path holds and this one never makes."""
    per_slot = sum(t[0].numel() * t.element_size() for t in (*saved.weights, *saved.biases) if t is not None)  # one expert's
    rows_bytes = saved.token_A.shape[0] * saved.x_TD.shape[1] * saved.weights[1].element_size()
    return rows_bytes // max(per_slot, 1)


def per_group_buffers(saved, counts_E: list[int], pieces: list, need_x: bool, need_gate: bool, gate_up: bool = False) -> dict:
    """The gradients' full tensors that the pieces write their parts of (an expert with no rows
    keeps zeros), and "<name>+" scratch slots for split-off pieces' partial gradients. With
    `gate_up` one "w_gu" [E, D, 2F] stands for w_gate and w_up (`_gate_up`)."""
    new = torch.zeros if 0 in counts_E else torch.empty
    x_TD, dtype, n_rows = saved.x_TD, saved.weights[1].dtype, saved.token_A.shape[0]
    slots = sum(p.extra >= 0 for p in pieces)
    shapes = {name: (t.shape, t) for name, t in zip(_PARAMETERS, (*saved.weights, *saved.biases)) if t is not None}
    if gate_up:
        (n_experts, d_model, d_ff), w_up = shapes.pop("w_up")
        shapes["w_gu"] = ((n_experts, d_model, 2 * d_ff), w_up)
        del shapes["w_gate"]
    grads = {}
    for name, (shape, like) in shapes.items():
        grads[name] = new(shape, dtype=like.dtype, device=like.device)
        if slots:
            grads[name + "+"] = like.new_empty(slots, *shape[1:])
    if need_gate and saved.gate_A is not None:
        grads["gate_A"] = torch.empty_like(saved.gate_A)
    if need_x:
        grads["x_AD"] = x_TD.new_empty(n_rows, x_TD.shape[1], dtype=dtype)
    return grads


def add_partials(grads: dict, pieces: list) -> None:
    """Add split-off pieces' partial gradients to their experts', in slot order (index_add_
    on CPU adds in index order): the same sums whichever thread ran which piece."""
    split = [p.expert for p in sorted((p for p in pieces if p.extra >= 0), key=lambda p: p.extra)]
    if not split:
        return
    experts_S = torch.tensor(split, device=grads["w_down"].device)
    for name in [name[:-1] for name in grads if name.endswith("+")]:
        grads[name].index_add_(0, experts_S, grads.pop(name + "+"))
