"""The Python API for users who bring their own training loop: everything `moespec train` does,
as functions. `import moespec` exposes these names lazily (torch loads on first use).

    import moespec
    plan = moespec.load_spec("specs/tiny-topk.yaml")
    model = moespec.build_model(plan, seed=0)
    setup = moespec.prepare_training(model, plan, lr=3e-3)
    split = moespec.load_tokens("tokens.bin", vocab_size=plan.model.vocab_size, window=plan.model.seq_len + 1)
    for step in range(1, 101):
        windows = moespec.step_windows(plan, split.train, step=step, seed=0, micros=range(moespec.micro_batches(plan)),
                                       batch=plan.parallel.micro_batch, seq_len=plan.model.seq_len)
        loss, ce, aux = moespec.train_step(setup, plan, windows)
        if step % 50 == 0:
            moespec.save_checkpoint(setup, plan, "ckpt", step=step)

Under torchrun, `init_distributed(plan)` joins the group and `prepare_training(..., dist_ctx=ctx)`
lays the model out (ep, tp, pp, DDP/FSDP2); take micro-batches
`range(ctx.dp_rank * n, (ctx.dp_rank + 1) * n)` with `n = micro_batches(plan, ctx)`.
"""

from __future__ import annotations

from pathlib import Path

from moespec.checkpoint import CheckpointError, load as _load, save as _save
from moespec.data.tokens import TokenFileError, load_token_split as load_tokens
from moespec.distributed.context import init_distributed, micro_batches_per_step, shutdown
from moespec.model.build import build_model
from moespec.spec import load_plan as load_spec
from moespec.train import TrainingSetup, batch_loss, evaluate_loss, prepare_training, step_windows, train, train_step

__all__ = [
    "CheckpointError", "TokenFileError", "TrainingSetup", "batch_loss", "build_model", "evaluate_loss", "init_distributed",
    "load_checkpoint", "load_spec", "load_tokens", "micro_batches", "prepare_training", "save_checkpoint", "shutdown",
    "step_windows", "train", "train_step",
]  # fmt: skip


def micro_batches(plan, dist_ctx=None) -> int:
    """Micro-batches one rank runs per optimizer step (global_batch / micro_batch in one process)."""
    return micro_batches_per_step(plan, dist_ctx)


def save_checkpoint(setup: TrainingSetup, plan, directory: str | Path, *, step: int, data: dict | None = None) -> Path:
    """Write model, AdamW state and RNG of every rank to `directory/step-N` (all ranks call it)."""
    return _save(setup, plan, Path(directory), step=step, data=data or {})


def load_checkpoint(setup: TrainingSetup, plan, path: str | Path) -> int:
    """Fill `setup` from a checkpoint (any layout of the same model); returns its step."""
    return int(_load(setup, plan, Path(path))["step"])
