"""`moespec train SPEC --steps N`: train a spec on the shipped byte corpus or on the user's tokens
(`--data`), on CPU or GPU, one process or many (torchrun's way, one node or several), with DCP
checkpoints; show the loss falling and how evenly each MoE layer spread its tokens.

The loop itself is `moespec.train.train`; this module checks every flag before anything runs
or launches, draws the progress bar (tokens/s, loss, MFU), writes TensorBoard scalars and
prints the tables.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from moespec.cli.common import console, emit_json, err_console, fail, load_plan_or_exit, trainable_counts_or_exit
from moespec.cli.train_report import document, print_summary


@dataclass
class TrainOptions:
    """Every flag a rank needs; `argv` writes them back for the ranks the launcher starts."""

    steps: int
    lr: float = 3e-3
    seed: int = 0
    batch: int = 0
    as_json: bool = False
    eval_every: int = 0
    timeout: float = 120.0
    data: Path | None = None
    data_dtype: str = ""
    tokenizer: str = ""
    val_fraction: float = 0.1
    save: Path | None = None
    save_every: int = 0
    resume: Path | None = None
    device: str = "cpu"
    tensorboard: Path | None = None

    def argv(self, spec: Path) -> list[str]:
        args = ["train", str(spec)]
        for name, value in asdict(self).items():
            if name == "as_json":
                args += ["--json"] if value else []
            elif value not in (None, ""):
                args += [f"--{name.replace('_', '-')}", str(value)]
        return args


def train_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps (with --resume: the step to end at).", show_default=False),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of the batches."),
    batch: int = typer.Option(0, "--batch", help="Sequences per micro-batch; 0 takes parallel.micro_batch (the micro-batches per step stay the spec's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (no progress bar)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Validation loss every N steps (0: only at the end)."),
    nproc: int = typer.Option(1, "--nproc", help="Ranks to launch on this node (torchrun-style); nproc x nnodes must equal the spec's world size."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds before a stuck collective fails every rank."),
    single_process: bool = typer.Option(False, "--single-process", help="Run a spec of world > 1 in one process: its data-parallel math (global_batch / micro_batch micro-batches per step), without ep or ZeRO."),
    data: Path = typer.Option(None, "--data", help="Token file (.bin of uint16/uint32 ids, .npy) or UTF-8 text; default: the shipped byte corpus.", show_default=False),
    data_dtype: str = typer.Option("", "--data-dtype", help="dtype of a .bin without a sidecar (default uint16)."),
    tokenizer: str = typer.Option("", "--tokenizer", help="For a text --data: bytes (default) or a Hugging Face tokenizer name."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="The last fraction of --data held out for validation."),
    save: Path = typer.Option(None, "--save", help="Checkpoint folder (torch.distributed.checkpoint): after the last step and every --save-every.", show_default=False),
    save_every: int = typer.Option(0, "--save-every", help="Also checkpoint every N steps (needs --save)."),
    resume: Path = typer.Option(None, "--resume", help="Resume from a --save folder (its newest checkpoint) or one step-N folder; any layout of the same model. The --save folder itself before its first checkpoint: start from step 0.", show_default=False),
    device: str = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (NCCL, one GPU per rank; autocast per parallel.precision)."),
    tensorboard: Path = typer.Option(None, "--tensorboard", help="Write loss, tokens/s and MFU scalars for TensorBoard to this folder.", show_default=False),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes of a multi-node run (torchrun's --nnodes); run the same command on each."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank, 0 .. nnodes - 1."),
    rdzv_endpoint: str = typer.Option("", "--rdzv-endpoint", help="HOST:PORT of node 0, every node the same (multi-node only)."),
) -> None:
    """Train a spec (CPU or GPU, one or many ranks) and report first/last loss, validation loss and expert loads."""
    from moespec.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # every step reuses its buffers instead of page-faulting fresh ones
    opts = TrainOptions(steps=steps, lr=lr, seed=seed, batch=batch, as_json=as_json, eval_every=eval_every, timeout=timeout,
                        data=data, data_dtype=data_dtype, tokenizer=tokenizer, val_fraction=val_fraction, save=save,
                        save_every=save_every, resume=resume, device=device, tensorboard=tensorboard)  # fmt: skip
    from moespec.distributed.context import launched_world

    if launched_world() is not None:  # a rank the launcher started: the main process checked everything
        from moespec.distributed.launch import run_rank

        plan = load_plan_or_exit(spec)
        run_rank(lambda: _train_rank(spec, plan, opts))
        return
    check_flags(opts, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, single_process=single_process)
    plan = load_plan_or_exit(spec)
    counts = _check_plan(spec, plan, opts, nproc=nproc, nnodes=nnodes, single_process=single_process)
    if nproc > 1 or nnodes > 1:
        _launch_ranks(spec, plan, opts, nproc=nproc, nodes=(nnodes, node_rank, rdzv_endpoint))
        return
    _train_here(spec, plan, opts, counts, single_process=single_process)


def check_flags(opts: TrainOptions, *, nproc: int, nnodes: int, node_rank: int, rdzv_endpoint: str, single_process: bool) -> None:
    """Every numeric flag in range before anything is built or launched (one line, exit 2)."""
    if not 1 <= opts.steps <= 10**9:
        fail(f"--steps must be in [1, 1e9], got {opts.steps}")
    if not 0 <= opts.seed < 2**63:
        fail(f"--seed must be in [0, 2**63), got {opts.seed}")
    if not 0 <= opts.batch <= 2**20 or not 0 <= opts.eval_every <= 10**9 or not 0 <= opts.save_every <= 10**9:
        fail(f"--batch must be in [0, 2**20] and --eval-every, --save-every in [0, 1e9]; got {opts.batch}, {opts.eval_every}, {opts.save_every}")
    if not (0 < opts.lr < 1e3 and math.isfinite(opts.lr)):
        fail(f"--lr must be positive and below 1000, got {opts.lr}")
    if not 1 <= opts.timeout <= 7 * 86400:
        fail(f"--timeout must be between 1 s and a week, got {opts.timeout}")
    if not 0 < opts.val_fraction < 1:
        fail(f"--val-fraction must be in (0, 1), got {opts.val_fraction}")
    if not 1 <= nproc <= 1024 or not 1 <= nnodes <= 65536 or not 0 <= node_rank < nnodes:
        fail(f"--nproc must be in [1, 1024], --nnodes >= 1 and --node-rank in [0, nnodes); got {nproc}, {nnodes}, {node_rank}")
    if nnodes > 1 and not rdzv_endpoint:
        fail(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)")
    if single_process and (nproc > 1 or nnodes > 1):
        fail(f"--single-process runs one process; it does not go with --nproc {nproc} / --nnodes {nnodes}")
    if opts.save_every and opts.save is None:
        fail("--save-every needs --save DIR")
    if opts.device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {opts.device!r}")
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: torch sees no CUDA device here (this torch build or machine has none); use --device cpu")
        if nproc > torch.cuda.device_count():
            fail(f"--nproc {nproc} ranks need as many GPUs; this node has {torch.cuda.device_count()}")
    if opts.tensorboard is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            fail("--tensorboard needs the tensorboard package (pip install 'moespec[profile]')")
    for flag, path in (("--save", opts.save), ("--tensorboard", opts.tensorboard)):
        if path is not None and path.exists() and not path.is_dir():
            fail(f"{flag} {path} is a file; give a folder")


def _check_plan(spec: Path, plan, opts: TrainOptions, *, nproc: int, nnodes: int, single_process: bool):
    """What the plan, the data and a checkpoint to resume must satisfy, checked once here."""
    from moespec.checkpoint import CheckpointError, check_layout, check_resumable
    from moespec.distributed.context import DistributedConfigError, check_single_process, check_world

    try:
        if nproc > 1 or nnodes > 1:
            check_world(plan, nproc * nnodes)
        else:
            check_single_process(plan, single_process=single_process)
        if opts.save is not None or opts.resume is not None:
            check_layout(plan, single_process=single_process)
        if opts.resume is not None and _fresh_start(opts):
            opts.resume = None  # the --save folder holds no checkpoint yet: a first run (a requeued job resumes)
        if opts.resume is not None:
            meta = check_resumable(opts.resume, plan)[1]
            if int(meta.get("step", 0)) >= opts.steps:
                raise CheckpointError(f"{opts.resume}: the checkpoint is at step {meta.get('step')}; --steps {opts.steps} must be more to train on")
    except (DistributedConfigError, CheckpointError) as exc:
        fail(f"{spec}: {exc}")
    load_data_or_exit(spec, plan, opts)
    if nproc == 1 and nnodes == 1 and plan.parallel.world > 1:
        from moespec.distributed.context import single_process_plan

        plan = single_process_plan(plan)  # what one process will hold: every expert
    if opts.batch and opts.batch != plan.parallel.micro_batch:  # --batch: the micro-batch's activations are what grow
        import dataclasses

        p = plan.parallel
        scaled = dataclasses.replace(p, micro_batch=opts.batch, global_batch=p.global_batch // p.micro_batch * opts.batch)
        plan = dataclasses.replace(plan, parallel=scaled)
    return trainable_counts_or_exit(spec, plan, ranks_here=nproc, device=opts.device)


def _fresh_start(opts: TrainOptions) -> bool:
    """--resume DIR naming the --save folder, which holds no checkpoint yet."""
    from moespec.checkpoint import LATEST_FILE

    if opts.save is None or opts.resume.resolve() != opts.save.resolve():
        return False
    return not (opts.save / LATEST_FILE).is_file()


def load_data_or_exit(spec: Path, plan, opts: TrainOptions):
    """The train/val split the run trains on: --data's (checked: dtype, length, ids < vocab) or None for the corpus."""
    if opts.data is None:
        from moespec.train import check_vocab

        try:
            check_vocab(plan)
        except ValueError as exc:
            fail(f"{spec}: {exc}")
        return None
    from moespec.data.tokens import TokenFileError, load_token_split

    if plan.model.encoder is not None:
        fail(f"{spec}: an encoder-decoder trains on span corruption of the byte corpus; --data is for decoder models")
    try:
        return load_token_split(opts.data, vocab_size=plan.model.vocab_size, window=plan.model.seq_len + 1,
                                val_fraction=opts.val_fraction, dtype=opts.data_dtype or None, tokenizer=opts.tokenizer or None)  # fmt: skip
    except TokenFileError as exc:
        fail(str(exc))


def _train_here(spec: Path, plan, opts: TrainOptions, counts, *, single_process: bool) -> None:
    """One process: the whole model (a world > 1 spec's data-parallel math with --single-process)."""
    from moespec.distributed.context import micro_batches_per_step, single_process_note
    from moespec.model.build import build_model

    model = build_model(plan, seed=opts.seed, device=opts.device)
    batch = opts.batch or plan.parallel.micro_batch
    note = single_process_note(plan, batch) if plan.parallel.world > 1 else None
    if note and not opts.as_json:
        console.print(note)
    result = _run(spec, plan, model, opts, batch=batch, dist_ctx=None, show=not opts.as_json)
    doc = document(spec, plan, counts, result, opts, batch=batch, micro_batches=micro_batches_per_step(plan, None))
    doc["peak_memory_bytes_per_rank"] = [peak_memory_bytes(opts.device)]
    if note:
        doc["single_process"] = note
    if opts.as_json:
        emit_json(doc)
        return
    print_summary(plan, counts, result, opts.steps, batch=batch, micro_batches=doc["micro_batches_per_step"], byte_tokens=_bytes(opts))


def _bytes(opts: TrainOptions) -> bool:
    """Whether the run trains on byte tokens (the corpus, or text under the bytes tokenizer)."""
    return opts.data is None or (opts.data.suffix not in (".bin", ".npy") and opts.tokenizer in ("", "bytes"))


def _run(spec: Path, plan, model, opts: TrainOptions, *, batch: int, dist_ctx, show: bool):
    """train() with the data, checkpoints, progress bar and TensorBoard scalars the flags ask for."""
    from moespec.checkpoint import CheckpointConfig, CheckpointError
    from moespec.train import train

    split = load_data_or_exit(spec, plan, opts)
    checkpoints = None
    if opts.save is not None or opts.resume is not None:
        checkpoints = CheckpointConfig(save_dir=opts.save, save_every=opts.save_every, resume=opts.resume)
    rank0 = dist_ctx is None or dist_ctx.rank == 0
    meter = ThroughputMeter(plan, opts.device, tokens_per_step=micro_tokens(plan, batch, dist_ctx))
    writer = _summary_writer(opts.tensorboard) if rank0 and opts.tensorboard is not None else None
    kwargs = dict(steps=opts.steps, lr=opts.lr, batch=batch, seed=opts.seed, eval_every=opts.eval_every, dist_ctx=dist_ctx,
                  split=split, checkpoints=checkpoints, data_label=str(opts.data or "shipped corpus"))  # fmt: skip
    try:
        if show and rank0:
            return _train_with_progress(model, plan, meter, writer, **kwargs)
        return train(model, plan, on_step=lambda record: _log(writer, record, meter.tick()), **kwargs)
    except FloatingPointError as exc:
        fail(f"{spec}: {exc}", code=1)
    except CheckpointError as exc:
        fail(f"{spec}: {exc}")
    finally:
        if writer is not None:
            writer.close()


def micro_tokens(plan, batch: int, dist_ctx) -> int:
    """Tokens one optimizer step trains on, all ranks together (an encoder-decoder's inputs and
    targets both count, as in the simulator's tokens/s)."""
    from moespec.distributed.context import micro_batches_per_step

    n_micro = micro_batches_per_step(plan, dist_ctx)
    replicas = 1 if dist_ctx is None else dist_ctx.dp_size
    encoder = plan.model.encoder
    return n_micro * replicas * batch * (plan.model.seq_len + (encoder.seq_len if encoder is not None else 0))


@dataclass
class ThroughputMeter:
    """Tokens/s of the last step and MFU against the device's peak in the spec's precision
    (the simulator's model FLOPs per token: 6N plus attention; None where no peak is known)."""

    plan: object
    device: str
    tokens_per_step: int
    _last: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float | None = None

    def __post_init__(self) -> None:
        self._last = time.perf_counter()
        self._flops_per_token, self._peak = _model_flops_and_peak(self.plan, self.device)

    def tick(self) -> "ThroughputMeter":
        now = time.perf_counter()
        self.tokens_per_s = self.tokens_per_step / max(now - self._last, 1e-9)
        self._last = now
        if self._peak:
            self.mfu = self._flops_per_token * self.tokens_per_s / (self._peak * self.plan.parallel.world)
        return self


def _model_flops_and_peak(plan, device: str) -> tuple[float, float | None]:
    from moespec.sim.backend import load_backend
    from moespec.sim.model import step_time

    name = "cpu-local"
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
        name = next((b for key, b in (("H200", "h200-cluster-4n"), ("H100", "dgx-h100"), ("A100", "dgx-a100")) if key in gpu), None)
    if name is None:
        return 0.0, None
    from moespec.cli.common import backend_with_room

    backend = backend_with_room(load_backend(name), plan.parallel.world)
    try:
        flops = step_time(plan, backend).model_flops_per_token
    except (ValueError, KeyError):
        return 0.0, None
    return flops, backend.device.peak_flops_per_s.get(plan.parallel.precision)


def _summary_writer(folder: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


def _log(writer, record, meter: ThroughputMeter) -> None:
    if writer is None:
        return
    for name, value in (("loss/train", record.ce_loss), ("loss/aux", record.aux_loss), ("loss/val", record.val_loss),
                        ("throughput/tokens_per_s", meter.tokens_per_s), ("throughput/mfu", meter.mfu)):  # fmt: skip
        if value is not None:
            writer.add_scalar(name, value, record.step)


def _launch_ranks(spec: Path, plan, opts: TrainOptions, *, nproc: int, nodes: tuple[int, int, str]) -> None:
    """Re-run this command on nproc ranks (per node) under torch's elastic launcher; one line if a rank fails."""
    from moespec.distributed.launch import launch

    # The launcher's own limit: warm-up and every step, generously; a stuck collective fails
    # earlier, at --timeout, inside the ranks.
    code, failure = launch(nproc, opts.argv(spec), timeout_s=opts.timeout * 4 + 60 * opts.steps, nodes=nodes)
    if failure:
        fail(failure, code=1)
    if code:
        raise typer.Exit(code)


def _train_rank(spec: Path, plan, opts: TrainOptions) -> None:
    """One rank of a distributed run: join the group, build only this rank's experts, train; rank 0 reports."""
    import torch.distributed

    from moespec.distributed.context import DistributedConfigError, init_distributed, micro_batches_per_step, shutdown
    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters

    try:
        ctx = init_distributed(plan, timeout_s=opts.timeout, device=opts.device)
    except DistributedConfigError as exc:
        fail(f"{spec}: {exc}")
    counts = count_parameters(build_model(plan, seed=opts.seed, device="meta"), plan)
    # the same seed on every rank: one model, each rank holding its ep rank's experts only; train() lays out the rest
    model = build_model(plan, seed=opts.seed, device=ctx.device, expert_shard=(ctx.ep_rank, ctx.ep_size) if ctx.ep_size > 1 else None)
    batch = opts.batch or plan.parallel.micro_batch
    result = _run(spec, plan, model, opts, batch=batch, dist_ctx=ctx, show=not opts.as_json)
    peaks = [None] * ctx.world
    torch.distributed.all_gather_object(peaks, peak_memory_bytes(opts.device))
    if ctx.rank == 0:
        doc = document(spec, plan, counts, result, opts, batch=batch, micro_batches=micro_batches_per_step(plan, ctx))
        doc["world"] = ctx.world
        doc["peak_memory_bytes_per_rank"] = peaks
        if opts.as_json:
            emit_json(doc)
        else:
            split = ""
            if ctx.tp_size > 1 or ctx.pp_size > 1:
                split = f", tp {ctx.tp_size}, pp {ctx.pp_size}" + (f" ({plan.parallel.pp_schedule})" if ctx.pp_size > 1 else "")
            console.print(f"world {ctx.world}: dp {ctx.dp_size}, ep {ctx.ep_size}{split} ({ctx.backend}); losses averaged over ranks")
            print_summary(plan, counts, result, opts.steps, batch=batch, micro_batches=doc["micro_batches_per_step"], byte_tokens=_bytes(opts))
    shutdown()


def peak_memory_bytes(device: str) -> int:
    """This process's peak: resident set size on CPU (getrusage), allocated bytes on a GPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _train_with_progress(model, plan, meter: ThroughputMeter, writer, **kwargs):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moespec.train import train

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task("train", total=kwargs["steps"], status="")

        def on_step(record) -> None:
            meter.tick()
            _log(writer, record, meter)
            status = f"loss {record.ce_loss:.3f}" + (f"  aux {record.aux_loss:.4f}" if record.tokens_per_expert else "")
            if record.val_loss is not None:
                status += f"  val {record.val_loss:.3f}"
            status += f"  {meter.tokens_per_s:,.0f} tok/s" + (f"  MFU {meter.mfu:.1%}" if meter.mfu is not None else "")
            progress.update(task, completed=record.step, status=status)

        return train(model, plan, on_step=on_step, **kwargs)
