"""The training loop, as a library function a notebook can call (the `train` command is a
thin wrapper around it), and the one-step forward/backward check that `compile --check` runs.

loss = cross-entropy of next-byte prediction + the MoE layers' auxiliary losses (already
coefficient-weighted by the routers). After every optimizer step `update_router_biases`
nudges the aux-loss-free routers (DeepSeek-V3's sigmoid_bias) towards balance; it is a no-op
for the others. Everything a step produced is returned as a record, nothing is logged
globally. Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from moespec.data.corpus import BYTE_VOCAB, CorpusSplit, get_batch, load_split
from moespec.model.types import ModelAux
from moespec.spec.plan import SpecPlan


@dataclass
class StepRecord:
    step: int  # 1-based optimizer step
    loss: float  # cross-entropy + aux, what was minimised
    ce_loss: float
    aux_loss: float
    tokens_per_expert: dict[int, list[int]]  # MoE layer index -> [E] tokens routed (before dropping)
    dropped_fraction: dict[int, float]  # MoE layer index -> share of assignments over capacity
    val_loss: float | None = None  # cross-entropy on the validation split, on eval steps

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "loss": self.loss,
            "ce_loss": self.ce_loss,
            "aux_loss": self.aux_loss,
            "val_loss": self.val_loss,
            "tokens_per_expert": {str(k): v for k, v in self.tokens_per_expert.items()},
            "dropped_fraction": {str(k): v for k, v in self.dropped_fraction.items()},
        }


@dataclass
class TrainResult:
    records: list[StepRecord]
    initial_val_loss: float  # before the first step, same validation batches as later
    final_val_loss: float
    tokens_per_expert_total: dict[int, list[int]] = field(default_factory=dict)  # summed over steps
    resumed_from: int = 0  # the checkpoint's step when the run resumed; records start after it

    @property
    def first_loss(self) -> float:
        return self.records[0].ce_loss

    @property
    def last_loss(self) -> float:
        return self.records[-1].ce_loss


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32 (also under bf16 autocast). logits [B, S, V], targets [B, S]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def draw_batch(plan: SpecPlan, ids: torch.Tensor, *, batch: int, seq_len: int, generator: torch.Generator, device=None):
    """One micro-batch of the plan's objective: next-token windows [B, S+1] for a decoder, T5's
    span corruption (inputs [B, S_enc], decoder inputs and targets [B, S]) for an
    encoder-decoder, whose lengths are the spec's."""
    if plan.model.encoder is None:
        window = get_batch(ids, batch=batch, seq_len=seq_len, generator=generator)  # [B, S+1]
        return window if device is None else window.to(device)
    from moespec.data.span_corruption import SpanBatch, get_span_batch

    enc = plan.model.encoder
    spans = get_span_batch(ids, batch=batch, inputs_length=enc.seq_len, targets_length=plan.model.seq_len, vocab_size=plan.model.vocab_size,
                           generator=generator, noise_density=enc.noise_density, mean_span=enc.mean_span)  # fmt: skip
    if device is None:
        return spans
    return SpanBatch(*(t.to(device) for t in (spans.inputs_BS, spans.decoder_inputs_BT, spans.targets_BT)))


def batch_loss(model: torch.nn.Module, batch, precision: str = "fp32"):
    """(logits, cross-entropy, ModelAux) of one micro-batch from `draw_batch` (the forward under
    the precision's autocast, the loss in float32)."""
    device = next(iter(model.parameters())).device
    with autocast_for(precision, device):
        if isinstance(batch, torch.Tensor):
            logits, aux = model(batch[:, :-1])  # [B, S, V]
        else:
            logits, aux = model(batch.inputs_BS, batch.decoder_inputs_BT)  # [B, T, V]
    targets = batch[:, 1:] if isinstance(batch, torch.Tensor) else batch.targets_BT  # padded targets are -100
    return logits, lm_loss(logits, targets), aux


def autocast_for(precision: str, device: torch.device):
    """bf16/fp16 autocast per `parallel.precision`; fp32 runs as is. Router math stays
    float32 inside the routers whatever this says (REFERENCE.md sec. 1)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(
    model: torch.nn.Module,
    plan: SpecPlan,
    *,
    steps: int,
    lr: float = 3e-3,
    batch: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    eval_every: int = 0,
    eval_batches: int = 4,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    split: CorpusSplit | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    dist_ctx=None,
    checkpoints=None,
    data_label: str = "shipped corpus",
) -> TrainResult:
    """Train `model` (built from `plan`) on the shipped byte corpus for `steps` AdamW steps.

    Each step accumulates gradients over the micro-batches that make up
    `parallel.global_batch` (`micro_batches_per_step`: grad_accum per rank under a dist_ctx,
    global_batch / micro_batch in one process). batch overrides the micro-batch size only
    (default plan.parallel.micro_batch) and seq_len defaults to plan.model.seq_len, so the
    routing group is the plan's T. `parallel.recompute` is applied to `model` first.
    tp or pp > 1 raise DistributedConfigError. `eval_every=0` evaluates only before and after.
    `on_step` sees every record as it is made (the CLI's progress bar); a record's losses and
    loads are those train_step returns for the step.

    dist_ctx (a `moespec.distributed.context.DistContext`): `model` is built from the same
    seed on every rank (whole, or with this rank's experts only) and laid out here
    (`prepare_training`); each dp rank trains on its share of the step's micro-batches
    (`step_windows`: the data is the same whatever the layout), dense gradients are averaged
    by DDP, expert gradients over their expert-data-parallel group, the gradient norm is
    clipped globally, and records carry the mean loss and the summed loads of all ranks.

    checkpoints (`moespec.checkpoint.CheckpointConfig`): resume from a checkpoint (then `steps`
    is the step to end at, as Megatron's train-iters) and save every `save_every` steps and
    after the last; `data_label` names the data stream in the checkpoint.
    """
    from moespec.distributed import data_parallel as dp_utils
    from moespec.distributed.context import check_executable, micro_batches_per_step
    from moespec.distributed.parallelize import apply_recompute

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_executable(plan, dist_ctx)
    if split is None:
        check_vocab(plan)  # the byte corpus; a user's token file was checked against the vocabulary on load
    if seq_len and plan.model.encoder is not None and seq_len != plan.model.seq_len:
        raise ValueError("an encoder-decoder trains at the spec's lengths (model.encoder.seq_len, model.seq_len); drop the sequence-length override")
    batch = batch or plan.parallel.micro_batch
    seq_len = seq_len or plan.model.seq_len
    split = split or load_split()
    device = next(model.parameters()).device
    n_micro = micro_batches_per_step(plan, dist_ctx)
    first_micro = 0 if dist_ctx is None else dist_ctx.dp_rank * n_micro  # tp and pp ranks of one replica: the same
    apply_recompute(model, plan.parallel.recompute)  # before wrapping, as torchtitan applies AC before FSDP
    setup = prepare_training(model, plan, dist_ctx=dist_ctx, lr=lr, weight_decay=weight_decay, micro_batch=batch)
    model = setup.model
    start = 0
    if checkpoints is not None and checkpoints.resume is not None:
        from moespec import checkpoint as ckpt

        start = int(ckpt.load(setup, plan, checkpoints.resume)["step"])
        if start >= steps:
            raise ckpt.CheckpointError(f"{checkpoints.resume}: the checkpoint is at step {start}; --steps {steps} must be more to train on")

    def evaluate() -> float:
        if setup.pipeline is not None:
            from moespec.distributed.pipeline import evaluate_pipeline

            return evaluate_pipeline(setup.pipeline, plan, split.val, batch=batch, seq_len=seq_len, n_batches=eval_batches, seed=seed)
        return evaluate_loss(model, plan, split.val, batch=batch, seq_len=seq_len, n_batches=eval_batches, seed=seed)

    initial_val = evaluate()
    records: list[StepRecord] = []
    totals: dict[int, torch.Tensor] = {}
    model.train()
    for step in range(start + 1, steps + 1):
        windows = step_windows(plan, split.train, step=step, seed=seed, micros=range(first_micro, first_micro + n_micro),
                               batch=batch, seq_len=seq_len, device=device)  # fmt: skip
        loss, ce, aux = train_step(setup, plan, windows, grad_clip=grad_clip)
        if dist_ctx is not None:
            loss, ce, aux = dp_utils.global_step_view(loss, ce, aux, dist_ctx)
        record = _record(step, loss, ce, aux)
        for stats in aux.moe:
            totals[stats.layer] = totals.get(stats.layer, 0) + stats.tokens_per_expert_E.detach().cpu()
        if eval_every and step % eval_every == 0 and step != steps:
            record.val_loss = evaluate()
            model.train()
        if step == steps:
            record.val_loss = evaluate()
        if not all(map(_finite, (record.loss, record.ce_loss, record.aux_loss))):
            raise FloatingPointError(f"loss became {record.loss} at step {step}; lower --lr")
        records.append(record)
        if checkpoints is not None and checkpoints.save_dir is not None:
            if step == steps or (checkpoints.save_every and step % checkpoints.save_every == 0):
                from moespec import checkpoint as ckpt

                ckpt.save(setup, plan, checkpoints.save_dir, step=step, data={"source": data_label, "seed": seed, "batch": batch})
        if on_step is not None:
            on_step(record)
    model.eval()
    return TrainResult(
        records=records,
        initial_val_loss=initial_val,
        final_val_loss=records[-1].val_loss,
        tokens_per_expert_total={layer: [int(v) for v in counts.tolist()] for layer, counts in sorted(totals.items())},
        resumed_from=start,
    )


def step_windows(plan: SpecPlan, ids, *, step: int, seed: int, micros: range, batch: int, seq_len: int, device=None) -> list:
    """The micro-batches `micros` of optimizer step `step`: micro-batch j of a step is drawn from
    a generator seeded by (seed, step, j) alone, so a step's data does not depend on how many
    ranks share it (rank r of dp takes j in [r * n, (r + 1) * n)) nor on where a run resumed."""
    return [draw_batch(plan, ids, batch=batch, seq_len=seq_len, generator=micro_generator(seed, step, j), device=device) for j in micros]


def micro_generator(seed: int, step: int, micro: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


@dataclass
class TrainingSetup:
    """What one rank needs to take optimizer steps: `model` runs forward (DDP- or FSDP2-wrapped
    under a DistContext), `bare_model` is the module itself (its experts, its router biases)."""

    model: torch.nn.Module
    bare_model: torch.nn.Module
    optimizers: list
    scaler: torch.amp.GradScaler
    dist_ctx: object | None
    pipeline: object | None = None  # a distributed.pipeline.Pipeline when pp > 1
    whole_model: torch.nn.Module | None = None  # the model as built: its parameter names are the checkpoint's


def prepare_training(model: torch.nn.Module, plan: SpecPlan, *, dist_ctx=None, lr: float = 3e-3,
                     weight_decay: float = 0.1, micro_batch: int | None = None) -> TrainingSetup:  # fmt: skip
    """Lay the model out over the ranks (`parallelize`: its E/ep experts, the tensor-parallel
    split), cut it into this rank's pipeline stages when pp > 1, wrap it for data parallelism
    (FSDP2 turns parameters into shards), and build AdamW. With tp or pp > 1 there is no DDP
    wrapper: `model_parallel` reduces."""
    from moespec.distributed import data_parallel as dp_utils
    from moespec.distributed.model_parallel import is_model_parallel

    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=plan.parallel.precision == "fp16")
    wrapped, pipeline, whole = model, None, model
    if dist_ctx is not None:
        from moespec.distributed.parallelize import parallelize

        parallelize(model, plan, dist_ctx)  # experts sharded over ep, attention and FFNs over tp
    if is_model_parallel(dist_ctx):
        from moespec.distributed.context import micro_batches_per_step

        if dist_ctx.pp_size > 1:
            from moespec.distributed.pipeline import Pipeline

            pipeline = Pipeline(model, plan, dist_ctx, micro_batches_per_step(plan, dist_ctx), micro_batch or plan.parallel.micro_batch)
            model = wrapped = pipeline.container
    elif dist_ctx is not None:
        wrapped = dp_utils.wrap_data_parallel(model, dist_ctx, zero_stage=plan.parallel.zero_stage)
    optimizers = dp_utils.build_optimizers(model, plan, dist_ctx, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    return TrainingSetup(wrapped, model, optimizers, scaler, dist_ctx, pipeline, whole)


def train_step(setup: TrainingSetup, plan: SpecPlan, windows: list[torch.Tensor], *, grad_clip: float = 1.0):
    """One optimizer step over len(windows) micro-batches (gradient accumulation; DDP syncs on
    the last only). windows: each a `draw_batch` micro-batch. Returns (loss, ce, aux) of the whole step
    on this rank: losses averaged over the micro-batches (what the gradient is of), expert
    loads summed, dropped fractions averaged (`merge_step_aux`)."""
    from moespec.distributed import data_parallel as dp_utils
    from moespec.model.regions import region
    from moespec.model.routers import update_router_biases

    model, bare, ctx = setup.model, setup.bare_model, setup.dist_ctx
    for optimizer in setup.optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss, ce, aux = merge_step_aux(accumulate_gradients(setup, plan, windows))
    with region("grad_sync"):
        for optimizer in setup.optimizers:
            setup.scaler.unscale_(optimizer)
        if ctx is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        elif ctx.tp_size > 1 or ctx.pp_size > 1:
            from moespec.distributed import model_parallel as mp_utils

            mp_utils.sync_gradients(setup)
            mp_utils.clip_grad_norm_model_parallel(bare, grad_clip, ctx, skip=mp_utils.tied_copies(setup.pipeline))
        else:
            dp_utils.reduce_expert_gradients(bare, ctx, average=False)  # the mean is taken in the clip's multiply
            dp_utils.clip_grad_norm_distributed(bare, grad_clip, ctx, expert_scale=1.0 / ctx.dp_size)
    with region("optimizer"):
        for optimizer in setup.optimizers:
            setup.scaler.step(optimizer)
        setup.scaler.update()
        update_router_biases(bare, process_group=None if ctx is None else ctx.dp_group)
    return loss, ce, aux


def accumulate_gradients(setup: TrainingSetup, plan: SpecPlan, windows: list) -> list[tuple]:
    """Forward and backward of every micro-batch of a step (through the pipeline schedule
    when pp > 1), gradients accumulated as (1/n) * sum of (cross-entropy + aux); per
    micro-batch (loss, ce, ModelAux)."""
    model = setup.model
    if setup.pipeline is not None:
        from moespec.distributed.pipeline import pipeline_micro_batches

        return pipeline_micro_batches(setup.pipeline, windows, plan.parallel.precision)
    per_micro = []
    for i, window in enumerate(windows):
        last = i == len(windows) - 1
        no_sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            logits, ce, aux = batch_loss(model, window, plan.parallel.precision)
            loss = ce + aux.aux_loss
            setup.scaler.scale(loss / len(windows)).backward()
        per_micro.append((loss.detach(), ce.detach(), aux))
    return per_micro


def merge_step_aux(per_micro: list) -> tuple:
    """(loss, ce, aux) of several micro-batches as one step: losses (and each MoE layer's
    unweighted router losses, dropped fraction) averaged, tokens per expert and all-to-all
    bytes summed. One micro-batch is returned as is."""
    from moespec.model.types import MoEStats

    if len(per_micro) == 1:
        return per_micro[0]
    n = len(per_micro)
    loss = sum(m[0] for m in per_micro) / n
    ce = sum(m[1] for m in per_micro) / n
    auxes = [m[2] for m in per_micro]
    stats = []
    for layer_stats in zip(*(a.moe for a in auxes)):
        first = layer_stats[0]
        stats.append(MoEStats(
            layer=first.layer, router=first.router,
            tokens_per_expert_E=sum(st.tokens_per_expert_E for st in layer_stats),
            dropped_fraction=sum(st.dropped_fraction for st in layer_stats) / n,
            losses={name: sum(st.losses[name] for st in layer_stats) / n for name in first.losses},
            a2a_bytes=sum(st.a2a_bytes for st in layer_stats),
        ))  # fmt: skip
    return loss, ce, ModelAux(aux_loss=sum(a.aux_loss.detach() for a in auxes) / n, moe=stats)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, plan: SpecPlan, ids: torch.Tensor, *, batch: int, seq_len: int, n_batches: int, seed: int
) -> float:
    """Mean cross-entropy over `n_batches` windows drawn with a fixed seed, so successive
    evaluations see the same text and can be compared."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + 1)
    total = 0.0
    for _ in range(n_batches):
        window = draw_batch(plan, ids, batch=batch, seq_len=seq_len, generator=generator, device=device)
        total += float(batch_loss(model, window, plan.parallel.precision)[1])
    return total / n_batches


def check_vocab(plan: SpecPlan) -> None:
    """The vocabulary the byte corpus (and, for an encoder-decoder, its sentinels) needs."""
    if plan.model.encoder is not None:
        from moespec.data.span_corruption import min_vocab_size

        enc = plan.model.encoder
        need = min_vocab_size(enc.seq_len, plan.model.seq_len, enc.noise_density, enc.mean_span)
        if plan.model.vocab_size < need:
            raise ValueError(f"model.vocab_size ({plan.model.vocab_size}) must be >= {need} for span corruption on bytes "
                             f"(256 bytes, pad, EOS and one sentinel per span)")  # fmt: skip
    elif plan.model.vocab_size < BYTE_VOCAB:
        raise ValueError(f"model.vocab_size ({plan.model.vocab_size}) must be >= {BYTE_VOCAB} to train on byte tokens")


def check_step(model: torch.nn.Module, *, batch: int, seq_len: int, vocab_size: int, seed: int = 0,
               encoder_seq_len: int | None = None) -> dict:  # fmt: skip
    """One forward and backward on random tokens: the compiled model runs and has gradients.

    On the meta device nothing is computed, only shapes propagate, so the losses are None and
    the logits shape is the whole check; that is how full-size specs are checked in seconds.
    """
    device = next(model.parameters()).device
    model.train()
    if device.type == "meta":
        tokens = torch.empty(batch, seq_len + 1, dtype=torch.long, device=device)  # [B, S+1]
    else:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=generator).to(device)  # [B, S+1]
    if encoder_seq_len is None:
        logits, aux = model(tokens[:, :-1])  # [B, S, V]
    else:  # an encoder-decoder: random inputs [B, S_enc] too, the window as decoder inputs and targets
        inputs = torch.randint(0, vocab_size, (batch, encoder_seq_len)).to(device) if device.type != "meta" else \
            torch.empty(batch, encoder_seq_len, dtype=torch.long, device=device)  # fmt: skip
        logits, aux = model(inputs, tokens[:, :-1])  # [B, S, V]
    ce = lm_loss(logits, tokens[:, 1:])
    loss = ce + aux.aux_loss
    loss.backward()
    with_grad = sum(p.numel() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    on_meta = device.type == "meta"
    return {
        "device": device.type,
        "tokens_shape": [batch, seq_len],
        "logits_shape": list(logits.shape),
        "loss": None if on_meta else float(loss.detach()),
        "ce_loss": None if on_meta else float(ce.detach()),
        "aux_loss": None if on_meta else float(aux.aux_loss.detach()),
        "moe_layers": len(aux.moe),
        "params_with_grad": with_grad,
    }


def _record(step: int, loss: torch.Tensor, ce: torch.Tensor, aux: ModelAux) -> StepRecord:
    return StepRecord(
        step=step,
        loss=float(loss.detach()),
        ce_loss=float(ce.detach()),
        aux_loss=float(aux.aux_loss.detach()),
        tokens_per_expert={s.layer: [int(v) for v in s.tokens_per_expert_E.tolist()] for s in aux.moe},
        dropped_fraction={s.layer: float(s.dropped_fraction) for s in aux.moe},
    )


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
