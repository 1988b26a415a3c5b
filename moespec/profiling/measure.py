"""One rank's measurement of real training steps: what `moespec profile` reports per rank.

The steps are the training loop's own (`moespec.train.train_step`, gradient accumulation
included), so what is measured is what `moespec train` runs. Four passes, each clean of the
others' overhead:
1. one micro-step under FlopCounterMode (matmul FLOPs, REFERENCE sec. 4; with
   `parallel.recompute` applied, so the recomputed forwards are counted) - then discarded;
2. warm-up, then timed steps: wall clock after a barrier (all ranks start together) with
   synchronisation, or CUDA events on a GPU; all-to-all bytes from the layers' counters;
3. one more step, untimed, under torch's MemTracker (`memory_by_category`): peak memory by
   category (parameters, gradients, optimizer state, activations, temporaries), the figures the
   simulator predicts. It runs on the model as trained, wrapper and gloo collectives included
   (checked on tiny-ep, 2 ranks, under DDP and under FSDP2 at ZeRO-3: the state exact on each
   rank; FSDP2's gathered parameters count where they are made, as activations in forward).
   CUDA is not checked: there MemTracker rounds each storage up to 512 bytes, as the caching
   allocator does, so the state rows may differ from the exact count;
4. a few steps under torch.profiler, writing per-rank TensorBoard traces and giving the time
   per region (profiling/attribution.py).
Memory, besides: CUDA peak allocated on a GPU; on CPU the process peak RSS (which includes
Python and torch themselves, so the RSS before the model was built is reported too), read
before the tracked step so that the tracker's own bookkeeping is not in it.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from moespec.spec.plan import SpecPlan


@dataclass
class RankMeasurement:
    rank: int
    step_s: list[float]  # each timed optimizer step, seconds
    flops_per_microstep: int | None  # FlopCounterMode, forward + backward of one micro-batch (None: tp or pp > 1)
    a2a_bytes_per_microstep: float  # sent to other ranks, own chunk excluded (dispatch + combine)
    a2a_calls_per_microstep: float
    shuffle_bytes_per_microstep: float  # BASE's token shuffle, sent to other ranks
    state_bytes: dict[str, int]  # parameters, gradients, AdamW state held after a step (state.state_bytes)
    region_s: dict[str, float]  # seconds per step by region, from the profiled steps
    profiled_step_s: float  # mean step under the profiler (its overhead included)
    memory_kind: str  # "cuda_peak_allocated" or "peak_rss"
    peak_memory_bytes: int
    baseline_memory_bytes: int  # before the model was built (RSS) or 0 (CUDA)
    memory_by_category: dict = field(default_factory=dict)  # memory_by_category(): {"peak", "at_optimizer_step", ...}
    tokens_per_expert: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> [E], timed steps
    dropped_fraction: dict[int, float] = field(default_factory=dict)  # MoE layer -> mean share dropped
    # tensor parallelism's collectives (DTensor's functional ones) per micro-step: kind -> [calls,
    # bytes each rank contributes (an all-gather: its slice)]; kinds as sim/counts.TP_COLLECTIVES
    tp_collectives_per_microstep: dict = field(default_factory=dict)
    pipeline_idle_s: float | None = None  # per step: the schedule's wall time less this rank's stage compute
    tp_all_reduce_s: float = 0.0  # per profiled step: DTensor's collectives (inside the regions above)
    probe_s: float | None = None  # opbench.machine_probe_s just before the timed steps (all ranks at once)
    cpu_features: list = field(default_factory=list)  # calibrate.cpu_features(): against the calibration's

    def as_dict(self) -> dict:
        data = asdict(self)
        data["tokens_per_expert"] = {str(k): v for k, v in self.tokens_per_expert.items()}
        data["dropped_fraction"] = {str(k): v for k, v in self.dropped_fraction.items()}
        return data


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _ep_counters(model, name: str = "counter") -> list:
    """The layers' dispatch/combine byte counters (`shuffle_counter`: BASE's token shuffle)."""
    from moespec.distributed.data_parallel import moe_layers

    return [getattr(layer.expert_parallel, name) for layer in moe_layers(model) if layer.expert_parallel is not None]


class TrainingBatches:
    """Training windows from the shipped byte corpus (random tokens if the vocabulary is
    smaller than a byte), each rank its own stream, like `moespec train`."""

    def __init__(self, plan: SpecPlan, device: torch.device, seed: int, rank: int):
        from moespec.data.corpus import BYTE_VOCAB, load_split

        self.plan, self.device = plan, device
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self.ids = load_split().train if plan.model.vocab_size >= BYTE_VOCAB else None

    def step(self) -> list:
        """One optimizer step's micro-batches (train.draw_batch's: windows [B, S+1], or an
        encoder-decoder's span-corruption batches)."""
        from moespec.train import draw_batch

        b, s = self.plan.parallel.micro_batch, self.plan.model.seq_len
        windows = []
        for _ in range(self.plan.parallel.grad_accum):
            if self.ids is None:
                window = torch.randint(0, self.plan.model.vocab_size, (b, s + 1), generator=self.generator).to(self.device)
            else:
                window = draw_batch(self.plan, self.ids, batch=b, seq_len=s, generator=self.generator, device=self.device)
            windows.append(window)
        return windows


def measure_rank(plan: SpecPlan, *, device: torch.device, steps: int, warmup: int, trace_dir: Path | None,
                 trace_steps: int = 2, seed: int = 0, dist_ctx=None) -> RankMeasurement:  # fmt: skip
    from moespec.model.flops import flop_counter

    from moespec.distributed.context import check_world
    from moespec.distributed.parallelize import apply_recompute
    from moespec.distributed.state import state_bytes
    from moespec.model.build import build_model
    from moespec.train import batch_loss, prepare_training, train_step

    # The plan must be what runs: one process runs a world-1 plan (context.single_process_plan).
    check_world(plan, 1 if dist_ctx is None else dist_ctx.world)
    rank = 0 if dist_ctx is None else dist_ctx.rank
    cuda = device.type == "cuda"
    baseline = 0 if cuda else peak_rss_bytes()
    model = build_model(plan, seed=seed, device=device)
    apply_recompute(model, plan.parallel.recompute)
    setup = prepare_training(model, plan, dist_ctx=dist_ctx)
    batches = TrainingBatches(plan, device, seed, rank if dist_ctx is None else dist_ctx.dp_rank)  # tp and pp ranks of a replica: one stream

    split = dist_ctx is not None and (dist_ctx.tp_size > 1 or dist_ctx.pp_size > 1)
    # 1. FLOPs of one micro-step (forward + backward), gradients thrown away. Not under tp or
    # pp: FlopCounterMode counts a DTensor matmul at its global shape, and a pipeline step has
    # no one-micro-batch forward to count.
    flops = None
    if not split:
        window = batches.step()[0]
        with flop_counter() as counter:
            _, ce, aux = batch_loss(setup.model, window)
            (ce + aux.aux_loss).backward()
        flops = int(counter.get_total_flops())
        setup.bare_model.zero_grad(set_to_none=True)

    # 2. Warm-up, then timed steps (the tensor-parallel collectives counted in one more step).
    for _ in range(warmup):
        train_step(setup, plan, batches.step())
    tp_collectives = {}
    if split and dist_ctx.tp_size > 1:
        from moespec.distributed.parity import CollectiveCounter

        with CollectiveCounter(count_bytes=True) as comm:
            train_step(setup, plan, batches.step())
        ops = {"all_reduce": "all_reduce", "all_gather": "all_gather_into_tensor", "reduce_scatter": "reduce_scatter_tensor"}
        for kind, op in ops.items():
            key = getattr(torch.ops._c10d_functional, op)
            tp_collectives[kind] = [comm.counts.get(key, 0) / plan.parallel.grad_accum, comm.bytes.get(key, 0) / plan.parallel.grad_accum]
    from moespec.profiling.calibrate import cpu_features
    from moespec.profiling.opbench import machine_probe_s

    probe_s = machine_probe_s(device)  # how fast the machine runs now (report.py: against the calibration's)
    if setup.pipeline is not None:
        setup.pipeline.start_timing()
    counters, shuffles = _ep_counters(setup.bare_model), _ep_counters(setup.bare_model, "shuffle_counter")
    for counter in counters + shuffles:
        counter.reset()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step_s: list[float] = []
    loads: dict[int, torch.Tensor] = {}
    dropped: dict[int, float] = {}
    for _ in range(steps):
        windows = batches.step()
        if dist_ctx is not None:
            dist.barrier(group=dist_ctx.dp_group)
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _, _, aux = train_step(setup, plan, windows)
            end.record()
            torch.cuda.synchronize(device)
            step_s.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            _, _, aux = train_step(setup, plan, windows)
            step_s.append(time.perf_counter() - t0)
        for stats in aux.moe:
            loads[stats.layer] = loads.get(stats.layer, 0) + stats.tokens_per_expert_E.detach().cpu()
            dropped[stats.layer] = dropped.get(stats.layer, 0.0) + float(stats.dropped_fraction) / steps
    micro_steps = steps * plan.parallel.grad_accum
    a2a_bytes = sum(c.total_bytes for c in counters) / micro_steps
    a2a_calls = sum(c.calls for c in counters) / micro_steps
    shuffle_bytes = sum(c.total_bytes for c in shuffles) / micro_steps
    idle = None
    if setup.pipeline is not None:
        idle = setup.pipeline.stop_timing() / steps
    held = state_bytes(setup.bare_model, setup.optimizers)  # after the last step, gradients still there
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else peak_rss_bytes()

    # 3. One untimed step under MemTracker (it slows the step down, and its hooks stay out of the
    # timed ones). Not under tp or pp yet: the tracker follows one module's forward and backward.
    by_category = {} if split else memory_by_category(setup, plan, batches.step())

    # 4. Profiled steps: traces and time per region.
    region_s, profiled_s, tp_s = _profile_steps(setup, plan, batches, trace_dir, trace_steps, rank, cuda)
    return RankMeasurement(
        rank=rank,
        step_s=step_s,
        flops_per_microstep=flops,
        a2a_bytes_per_microstep=a2a_bytes,
        a2a_calls_per_microstep=a2a_calls,
        shuffle_bytes_per_microstep=shuffle_bytes,
        state_bytes=held,
        region_s=region_s,
        profiled_step_s=profiled_s,
        memory_kind="cuda_peak_allocated" if cuda else "peak_rss",
        peak_memory_bytes=peak,
        baseline_memory_bytes=baseline,
        memory_by_category=by_category,
        tokens_per_expert={layer: [int(v) for v in counts.tolist()] for layer, counts in sorted(loads.items())},
        dropped_fraction=dict(sorted(dropped.items())),
        tp_collectives_per_microstep=tp_collectives,
        pipeline_idle_s=idle,
        tp_all_reduce_s=tp_s,
        probe_s=probe_s,
        cpu_features=cpu_features() if device.type == "cpu" else [],  # on a GPU the CPU's kernels are not the step's
    )


# MemTracker's reference types (torch.distributed._tools.mem_tracker._MemRefType) -> our names.
_CATEGORIES = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Optstate": "optimizer",
               "Activation": "activations", "Temp": "temporaries", "Other": "other", "Total": "total"}  # fmt: skip


class _NoHook:
    def remove(self) -> None:
        pass


def _frozen_aware(tracker_class):
    """MemTracker hooks every parameter's gradient as it meets the parameter (FSDP2 units
    meet their unsharded parameters at each forward), and a frozen parameter (ERNIE's
    selection bias) takes no hook. Mark those as hooked already: it looks before hooking,
    and removes the no-op handle on exit."""

    class FrozenAware(tracker_class):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for param in module.parameters():
                if not param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return FrozenAware


def memory_by_category(setup, plan: SpecPlan, windows: list[torch.Tensor]) -> dict:
    """Bytes by category over one training step (`train_step`, the wrapper and its collectives
    included), from torch's MemTracker (a TorchDispatchMode: it sees every tensor the step
    allocates, and the parameters, gradients and optimizer state registered before it starts).

    Returns {"peak": {category: bytes}, "at_optimizer_step": {...}, "step_counter_bytes": n}:
    - "peak": the categories at the moment the tracked total peaked (on these models the end of
      the forward, where the activations are all held and the gradients not yet made:
      `train_step` sets them to None first);
    - "at_optimizer_step": just before the first optimizer step, when every gradient exists;
    - "step_counter_bytes": AdamW's scalar `step` tensors, which MemTracker counts as optimizer
      state and `state.state_bytes` (and the simulator) do not.
    Categories: parameters, buffers, gradients, optimizer, activations (made in forward),
    temporaries (made in backward, activation gradients among them), other, total. DDP's
    gradient buckets, which its reducer allocates before the step and keeps for the whole run,
    are seen as gradients from the start: the dense gradients are views of them
    (`gradient_as_bucket_view`) and still hold the last step's values when the tracker
    registers them. (Before, the gradients were a copy: the tracker met a bucket only at its
    first write in backward, as a temporary, the simulator left the buckets out, and h12's peak
    measured 7.4% over the prediction.) What it does not see: memory outside the dispatcher (gloo's own buffers) and
    the Python heap."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from moespec.train import train_step

    tracker = _frozen_aware(MemTracker)()
    # ZeRO-1's ZeroAdamW is not a torch Optimizer: its torch AdamW over the chunk views is.
    tracker.track_external(setup.model, *(getattr(optimizer, "inner", optimizer) for optimizer in setup.optimizers))
    at_optimizer_step: list[dict] = []

    def before_optimizer_step(optimizer, args, kwargs) -> None:
        if not at_optimizer_step:
            at_optimizer_step.append(tracker.get_tracker_snapshot("current"))

    def before_forward(module, inputs) -> None:
        # MemTracker refuses a second forward of the root module (it takes it for the next
        # iteration); with gradient accumulation a step has several. Its per-module statistics,
        # which we do not use, are what it would mix up: clear them. Registered before the
        # tracker's own global hook, so this runs first.
        if module is setup.model:
            tracker.reset_mod_stats()

    hooks = [register_optimizer_step_pre_hook(before_optimizer_step), register_module_forward_pre_hook(before_forward)]
    try:
        with tracker:
            train_step(setup, plan, windows)
    finally:
        for hook in hooks:
            hook.remove()
    step_counters = sum(value.numel() * value.element_size() for optimizer in setup.optimizers for state in optimizer.state.values()
                        for name, value in state.items() if name == "step" and isinstance(value, torch.Tensor))  # fmt: skip
    return {"peak": _by_category(tracker.get_tracker_snapshot("peak")),
            "at_optimizer_step": _by_category(at_optimizer_step[0] if at_optimizer_step else {}),
            "step_counter_bytes": step_counters}  # fmt: skip


def _by_category(snapshot: dict) -> dict[str, int]:
    """MemTracker's {device: {reftype: bytes}} of this rank's one device as {category: bytes}."""
    out = dict.fromkeys(_CATEGORIES.values(), 0)
    for per_type in snapshot.values():
        for reftype, nbytes in per_type.items():
            out[_CATEGORIES[getattr(reftype, "value", reftype)]] += int(nbytes)
    return out


def _profile_steps(setup, plan, batches, trace_dir: Path | None, trace_steps: int, rank: int, cuda: bool):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    from moespec.profiling.attribution import region_seconds
    from moespec.train import train_step

    if trace_steps < 1:
        return {}, 0.0, 0.0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    handler = tensorboard_trace_handler(str(trace_dir), worker_name=f"rank{rank}") if trace_dir else None
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=trace_steps, repeat=1),
                 on_trace_ready=handler) as prof:  # fmt: skip
        for _ in range(trace_steps + 1):
            train_step(setup, plan, batches.step())
            prof.step()
    events = prof.events()
    by_region, total_s, n_steps = region_seconds(events)
    tp_s = 0.0
    if getattr(setup.dist_ctx, "tp_size", 1) > 1:
        from moespec.profiling.attribution import functional_collective_seconds

        tp_s = functional_collective_seconds(events)  # inside the attention and dense_ffn regions
    n_steps = max(n_steps, 1)
    return {name: seconds / n_steps for name, seconds in by_region.items()}, total_s / n_steps, tp_s / n_steps
