"""`bench/moe_layer.py`'s layer with one thing changed, same weights and routing: its products
on `torch._grouped_mm` (--engines), on MKL (--gemm-ab), and the A/B columns (`AB`: --chunks-ab,
--gate-up-ab), each a knob turned for the layer's forward and its backward."""

from __future__ import annotations

from unittest import mock

from moespec.model import cpu_gemm, group_matmuls, grouped_experts


class _BackwardUnder:
    """A layer's output whose backward runs under `context()` too: the knobs are read at each
    call, and the step's backward runs outside the layer's forward."""

    def __init__(self, y, context):
        self.y, self.context = y, context

    def backward(self, dy):
        with self.context():
            self.y.backward(dy)


def under(impl, context):
    """The same layer with its forward and backward run under `context()`."""
    fn, module = impl

    def run(x):
        with context():
            return _BackwardUnder(fn(x), context)

    return run, module


def on_grouped_mm(impl):
    """The same layer with its dropless matmuls on `_grouped_mm` instead of the thread engine
    (the engine is chosen in forward and kept for backward)."""
    return under(impl, lambda: mock.patch.dict(group_matmuls.GROUPED_GEMM, {"threads": False}))


def on_mkl(impl):
    """The same layer with the thread engine's products on MKL whatever this process chose
    (the choice is taken in forward and kept for backward, model/cpu_gemm.py)."""
    return under(impl, lambda: cpu_gemm.using("mkl"))


# The A/B columns beside ours_dropless, same weights and routing: flag -> (column, the knob it
# turns); moe_report.AB_LABELS says what each ratio reads as
AB = {
    "chunks_ab": ("dropless_chunks256", lambda: mock.patch.object(cpu_gemm, "CHUNKS", (256,))),
    "gate_up_ab": ("dropless_gate_up_apart", lambda: mock.patch.dict(grouped_experts.GATE_UP, {"max_f": 0})),
}


def on_chunks(impl):
    """The same layer with oneDNN calls of 256 rows (the call sizes before 2026-12-02)."""
    return under(impl, AB["chunks_ab"][1])
