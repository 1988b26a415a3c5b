"""Pipeline parallelism with torch.distributed.pipelining, applied from outside the model.

A decoder-only `MoETransformer` is cut into stages by blocks: the first stage keeps the
embeddings, the last the final norm and LM head; every stage keeps the rotary table. Stage
modules keep the full model's parameter names (blocks sit in a ModuleDict keyed by their
global index, as torchtitan does), so checkpoints and gradient checks line up with the
unsplit model. Schedules are torch's own: GPipe, 1F1B, and interleaved 1F1B with two stages
per rank (stage s on pp rank s % pp, Megatron's virtual pipeline).

Where stages split (`stage_bounds`): `parallelism.pp_layers` when the spec writes it, else
the contiguous split that minimises the busiest stage's active parameters per token (each
block's, with the LM head on the last stage), our proxy for its forward FLOPs.

MoE auxiliary losses: pipelining applies the loss function to the last stage's output only,
so each MoE layer's aux loss joins the backward through the block's output
(`AttachAuxLoss`, Megatron's MoEAuxLossAutoScaler): the forward returns the activations
unchanged and the backward adds d(aux)/d(aux) = 1 to the aux loss, once per micro-batch.
The schedule divides every gradient by the number of micro-batches (`scale_grads`), so a
step's gradient is that of the mean over micro-batches of (cross-entropy + aux), exactly what
the single-process loop's accumulation computes.

Tied embeddings: the first and last stages each hold the table; after backward their
gradients are summed over the pair (Megatron's embedding group), so both copies take the same
AdamW step and stay equal. Hash routing reads token ids in every stage: each stage hands the
ids on beside the activations.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moespec.model.layers import run_blocks
from moespec.spec.plan import SpecPlan
from moespec.spec.stages import stage_bounds, stages_per_rank

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class AttachAuxLoss(torch.autograd.Function):
    """x passes through; the backward gives `aux` (a scalar loss) the gradient 1, so the aux
    loss is minimised along with whatever loss x feeds."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class StageModule(nn.Module):
    """Blocks [lo, hi) of a MoETransformer, with the embeddings on the first stage and the
    final norm and head on the last. forward: tokens [B, S] (first) or activations [B, S, D]
    (and the token ids [B, S] when a later stage routes by hash) -> the next stage's inputs,
    or logits [B, S, V] on the last stage. Each forward's MoE statistics and aux loss are
    kept in `records` (one per micro-batch, in order) for the training loop's report."""

    def __init__(self, model: nn.Module, lo: int, hi: int, *, first: bool, last: bool, pass_ids: bool):
        super().__init__()
        self.first, self.last, self.pass_ids = first, last, pass_ids
        self.rope = model.rope
        self.max_positions = model.max_seq_len
        if first or (last and model.lm_head is None):
            self.tok_embeddings = model.tok_embeddings
        if first:
            self.pos_embeddings = model.pos_embeddings
            self.embed_dropout = model.embed_dropout
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(lo, hi)})
        if last:
            self.final_norm = model.final_norm
            self.lm_head = model.lm_head
            self.head_bias = model.head_bias
        self.records: list = []
        self.sequence_shards = 1  # tp under sequence parallelism: a later stage receives [B, S/tp, D]

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None):
        if self.first:
            token_ids = x
            S = x.shape[1]
            x = self.tok_embeddings(x)  # [B, S, D]
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(torch.arange(S, device=x.device))
            x = self.embed_dropout(x)
        else:
            S = x.shape[1] * self.sequence_shards  # the rotary tables span the whole sequence
        rope = None if self.rope is None else self.rope.cos_sin(torch.arange(S, device=x.device))
        stats: list = []
        aux = torch.zeros((), dtype=torch.float32, device=x.device)
        x, aux = run_blocks(self.blocks.values(), x, stats, aux, rope=rope, token_ids=token_ids)
        self.records.append((stats, aux.detach()))
        if stats and torch.is_grad_enabled():
            x = AttachAuxLoss.apply(x, aux)
        if not self.last:
            return (x, token_ids) if self.pass_ids else x
        x = self.final_norm(x)
        if self.lm_head is None:
            return torch.nn.functional.linear(x, self.tok_embeddings.weight, self.head_bias)
        return self.lm_head(x)


def block_weights(model: nn.Module, plan: SpecPlan) -> tuple[list[int], int]:
    """(active parameters per token of each block, read off the module; the LM head's
    matmul, V x D): what `stage_bounds` balances."""
    from moespec.model.counting import count_parameters

    counts = count_parameters(model, plan)
    return [layer.active for layer in counts.layers], plan.model.vocab_size * plan.model.d_model


def build_stages(model: nn.Module, plan: SpecPlan, ctx) -> tuple[list[StageModule], list[int]]:
    """This rank's stage modules and their stage indices (one, or two for interleaved 1F1B)."""
    from moespec.model.build import MoETransformer

    if not isinstance(model, MoETransformer):
        raise ValueError("pipeline parallelism runs decoder-only transformers")
    per_rank = stages_per_rank(plan.parallel.pp_schedule)
    n_stages = ctx.pp_size * per_rank
    weights, head = block_weights(model, plan)
    bounds = stage_bounds(plan, n_stages, weights, head)
    pass_ids = any(layer.moe is not None and layer.moe.router.type == "hash" for layer in plan.layers)
    indices = [ctx.pp_rank + v * ctx.pp_size for v in range(per_rank)]
    stages = [StageModule(model, *bounds[s], first=s == 0, last=s == n_stages - 1, pass_ids=pass_ids) for s in indices]
    for module, s in zip(stages, indices):
        module.bounds = bounds[s]
        module.sequence_shards = ctx.tp_size if plan.parallel.sequence_parallel else 1
    return stages, indices


def stage_shapes(plan: SpecPlan, module: StageModule, micro_batch: int) -> dict:
    """Example inputs and outputs of one micro-batch, so that torch's stages start from static
    shapes: without them the first step infers shapes by running each stage's forward once
    more, on uninitialised tensors past the first stage, through routers that count loads and
    all-to-alls that send by those counts. The residual stream is float32 (parameters are);
    logits come in the compute dtype of the precision's autocast."""
    B, S, D, V = micro_batch, plan.model.seq_len, plan.model.d_model, plan.model.vocab_size
    ids = torch.zeros(B, S, dtype=torch.long, device="meta")
    S_local = S // module.sequence_shards  # sequence parallelism: stages exchange the rank's slice
    hidden = torch.zeros(B, S_local, D, dtype=torch.float32, device="meta", requires_grad=True)  # its gradient travels back
    carried = (hidden, ids) if module.pass_ids else (hidden,)
    logits_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.parallel.precision]
    outputs = (torch.zeros(B, S, V, dtype=logits_dtype, device="meta"),) if module.last else carried
    grad = hidden.detach()
    grads = (grad, None) if module.pass_ids else (grad,)  # token ids carry no gradient
    shapes = {"input_args": (ids,) if module.first else carried, "output_args": outputs}
    if not module.last:
        shapes["output_grads"] = grads
    if not module.first:
        shapes["input_grads"] = grads
    return shapes


def build_schedule(stage_modules: list[nn.Module], indices: list[int], plan: SpecPlan, ctx, n_micro: int, loss_fn, *,
                   micro_batch: int, for_eval: bool = False):  # fmt: skip
    """torch's schedule for `parallelism.pp_schedule` over this rank's stages (for evaluation:
    GPipe, or interleaved with two stages per rank; forward only, any number of micro-batches)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    n_stages = ctx.pp_size * stages_per_rank(plan.parallel.pp_schedule)
    stages = [PipelineStage(module, index, n_stages, ctx.device, group=ctx.pp_group, **stage_shapes(plan, module, micro_batch))
              for module, index in zip(stage_modules, indices)]  # fmt: skip
    schedule = plan.parallel.pp_schedule
    if for_eval and schedule == "1f1b":
        schedule = "gpipe"
    if schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches=n_micro, loss_fn=loss_fn)
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return kind(stages[0], n_microbatches=n_micro, loss_fn=loss_fn)


def sum_tied_embedding_grads(stage_modules: list[StageModule], ctx) -> None:
    """Sum the embedding table's gradient over the first and last stage (both hold it when the
    head is tied); a no-op otherwise."""
    import torch.distributed as dist

    group = getattr(ctx, "embedding_group", None)
    if group is None:
        return
    for module in stage_modules:
        table = getattr(module, "tok_embeddings", None)
        if table is not None:
            grad = table.weight.grad if table.weight.grad is not None else torch.zeros_like(table.weight)
            dist.all_reduce(grad, group=group)
            table.weight.grad = grad


class Pipeline:
    """This rank's part of a pipelined model: its stage modules, the training schedule, and a
    forward-only schedule for evaluation (its own PipelineStage objects, one micro-batch per
    evaluation window)."""

    def __init__(self, model: nn.Module, plan: SpecPlan, ctx, n_micro: int, micro_batch: int):
        from moespec.train import lm_loss

        self.plan, self.ctx, self.n_micro, self.micro_batch = plan, ctx, n_micro, micro_batch
        self.modules, self.indices = build_stages(model, plan, ctx)
        self.container = nn.ModuleList(self.modules)  # what the optimizer and the gradient code see
        self.schedule = build_schedule(self.modules, self.indices, plan, ctx, n_micro, lm_loss, micro_batch=micro_batch)
        self._timing, self._busy_s, self._schedule_s = False, 0.0, 0.0
        for stage in getattr(self.schedule, "_stages", None) or [self.schedule._stage]:
            for name in ("forward_one_chunk", "backward_one_chunk"):
                setattr(stage, name, self._timed(getattr(stage, name)))
        self._eval: dict[int, object] = {}
        self.has_last = any(m.last for m in self.modules)

    def _timed(self, method):
        """`method` (a stage's forward or backward of one micro-batch), adding its wall time to
        the busy time while timing is on; on CUDA it waits for the stage's kernels first."""
        def timed(*args, **kwargs):
            if not self._timing:
                return method(*args, **kwargs)
            start = time.perf_counter()
            out = method(*args, **kwargs)
            if self.ctx.device.type == "cuda":
                torch.cuda.synchronize(self.ctx.device)
            self._busy_s += time.perf_counter() - start
            return out

        return timed

    def start_timing(self) -> None:
        """From now on, time the training schedule's steps and this rank's stage compute in them."""
        self._timing, self._busy_s, self._schedule_s = True, 0.0, 0.0

    def stop_timing(self) -> float:
        """Seconds this rank's stages waited inside the training schedule since start_timing: the
        schedule's wall time less their forwards and backwards (bubble, and the sends between
        stages when they do not overlap)."""
        self._timing = False
        return self._schedule_s - self._busy_s

    def eval_schedule(self, n_batches: int):
        if n_batches not in self._eval:
            from moespec.train import lm_loss

            self._eval[n_batches] = build_schedule(self.modules, self.indices, self.plan, self.ctx, n_batches, lm_loss,
                                                   micro_batch=self.micro_batch, for_eval=True)  # fmt: skip
        return self._eval[n_batches]

    def run(self, schedule, inputs_BS: torch.Tensor, targets_BS: torch.Tensor, *, train: bool) -> list[tuple]:
        """One pass of `schedule` over the whole batch; per micro-batch (cross-entropy, stats of
        every MoE layer of the model, aux loss of the model), the same on every pp rank."""
        import torch.distributed as dist

        for module in self.modules:
            module.records.clear()
        losses: list = []
        first = any(m.first for m in self.modules)
        args = (inputs_BS,) if first else ()
        target = targets_BS if self.has_last else None
        if train:
            start = time.perf_counter()
            schedule.step(*args, target=target, losses=losses)
            if self._timing:
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize(self.ctx.device)
                self._schedule_s += time.perf_counter() - start
        else:
            with torch.no_grad():
                schedule.eval(*args, target=target, losses=losses)
        mine = {
            "ce": [float(loss.detach()) for loss in losses] if self.has_last else None,
            "records": [[(_cpu_stats(stats), float(aux)) for stats, aux in module.records] for module in self.modules],
        }
        gathered: list = [None] * self.ctx.pp_size
        dist.all_gather_object(gathered, mine, group=self.ctx.pp_group)
        ce = next(g["ce"] for g in gathered if g["ce"] is not None)
        per_micro = []
        for m in range(len(ce)):
            stats, aux = [], 0.0
            for g in gathered:
                for module_records in g["records"]:
                    if len(module_records) != len(ce):
                        raise RuntimeError(f"a pipeline stage ran {len(module_records)} forwards for {len(ce)} micro-batches")
                    stats += module_records[m][0]
                    aux += module_records[m][1]
            per_micro.append((ce[m], sorted(stats, key=lambda s: s.layer), aux))
        return per_micro


def _cpu_stats(stats: list) -> list:
    import dataclasses

    return [dataclasses.replace(s, tokens_per_expert_E=s.tokens_per_expert_E.cpu(), dropped_fraction=s.dropped_fraction.cpu(),
                                losses={k: v.cpu() for k, v in s.losses.items()}) for s in stats]  # fmt: skip


def pipeline_micro_batches(pipe: Pipeline, windows: list[torch.Tensor], precision: str) -> list[tuple]:
    """One training step's forwards and backwards through the schedule: the micro-batches are
    `windows` (each [B, S+1]) in order. Returns, per micro-batch, (loss, cross-entropy,
    ModelAux) as the single-process loop records them."""
    from moespec.model.types import ModelAux
    from moespec.train import autocast_for

    batch = torch.cat(windows)  # [n_micro * B, S+1]: the schedule cuts it back into the windows
    with autocast_for(precision, pipe.ctx.device):
        inputs, targets = (t.contiguous().to(pipe.ctx.device) for t in (batch[:, :-1], batch[:, 1:]))  # ids may travel between stages
        per_micro = pipe.run(pipe.schedule, inputs, targets, train=True)
    out = []
    for ce, stats, aux in per_micro:
        ce_t, aux_t = torch.tensor(ce), torch.tensor(aux)
        out.append((ce_t + aux_t, ce_t, ModelAux(aux_loss=aux_t, moe=stats)))
    return out


def evaluate_pipeline(pipe: Pipeline, plan: SpecPlan, ids: torch.Tensor, *, batch: int, seq_len: int, n_batches: int, seed: int) -> float:
    """`train.evaluate_loss` through the pipeline: the same windows, one micro-batch each."""
    from moespec.train import autocast_for, draw_batch

    generator = torch.Generator().manual_seed(seed + 1)
    windows = [draw_batch(plan, ids, batch=batch, seq_len=seq_len, generator=generator) for _ in range(n_batches)]
    whole = torch.cat(windows).to(pipe.ctx.device)
    for module in pipe.modules:
        module.eval()
    with autocast_for(plan.parallel.precision, pipe.ctx.device):
        per_micro = pipe.run(pipe.eval_schedule(n_batches), whole[:, :-1].contiguous(), whole[:, 1:].contiguous(), train=False)
    for module in pipe.modules:
        module.train()
    return sum(ce for ce, _, _ in per_micro) / n_batches
