"""Training checkpoints with torch.distributed.checkpoint (DCP): save every N steps, resume with
the same subsequent losses, also on another layout (world size, ep, tp, pp) of the same model.

Why a state dict of our own rather than DCP's `get_state_dict`: an expert-parallel rank holds a
bank of E/ep experts as plain tensors, which DCP would take for replicas of one tensor. Here
every routed expert is its own entry (`...experts.w_up/e12`), so any layout reads the experts it
holds, and a replica's copy is written once (DCP's dedup of equal keys). Tensor-parallel
parameters are DTensors and reshard natively. Keys are the whole model's parameter names, so a
pipeline stage saves and loads its slice under the same names as one process.

A checkpoint is a folder `step-00000100/` (DCP's files + `moespec.json`: the step, the model's
parameter shapes, the data stream, the grad scaler, BASE's shuffle counters). It is written
under a temporary name and renamed when every rank has finished; `latest` names the newest.
A save killed midway leaves a `.tmp` folder that resume ignores and the next save removes.
The data a step trains on is a function of (seed, step) alone (`train.step_windows`), so the
step number is the data position, and each rank's RNG state is saved for random routers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moespec.files import write_atomic

META_FILE = "moespec.json"
LATEST_FILE = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed here, as one line."""


@dataclass(frozen=True)
class CheckpointConfig:
    save_dir: Path | None = None  # where `step-N/` folders go
    save_every: int = 0  # 0: only after the last step
    resume: Path | None = None  # a save_dir (its `latest`) or one step folder


def check_layout(plan, *, single_process: bool = False) -> None:
    """What checkpoints support: ZeRO 1/2/3 partition optimizer state (and FSDP2 parameters) by
    dim-0 chunks that this format does not name yet, so they are refused up front."""
    if plan.parallel.zero_stage > 0 and plan.parallel.dp > 1 and not single_process:
        raise CheckpointError(
            f"--save/--resume support parallel.zero_stage 0 (DDP, ep, tp, pp); this spec has zero_stage "
            f"{plan.parallel.zero_stage}, whose sharded optimizer state is not checkpointed yet"
        )


def model_signature(plan) -> list[list]:
    """[name, shape] of every parameter of the whole model (meta build): what must match to resume."""
    from moespec.model.build import build_model

    return [[name, list(p.shape)] for name, p in build_model(plan, device="meta").named_parameters()]


def _expert_banks(whole: torch.nn.Module) -> dict[str, object]:
    from moespec.model.experts import ExpertBank

    return {name: module for name, module in whole.named_modules() if isinstance(module, ExpertBank)}


def _entries(setup) -> list[tuple[str, torch.Tensor, torch.Tensor | None, int | None]]:
    """(name, tensor, its parameter or None for a buffer, index in the local bank or None) of
    what this rank holds, by the whole model's names; expert banks split into one entry per
    global expert."""
    whole = setup.whole_model
    held = {id(t) for t in list(setup.bare_model.parameters()) + list(setup.bare_model.buffers())}
    banks = _expert_banks(whole)
    out = []
    for name, tensor in whole.state_dict(keep_vars=True).items():
        if id(tensor) not in held:
            continue
        param = tensor if isinstance(tensor, torch.nn.Parameter) else None
        owner, _, leaf = name.rpartition(".")
        bank = banks.get(owner)
        if bank is not None and tensor.dim() > 0 and tensor.shape[0] == bank.n_experts:
            out += [(f"{name}/e{bank.first_expert + i}", tensor.detach()[i], param, i) for i in range(bank.n_experts)]
        else:
            out.append((name, tensor.detach() if param is not None else tensor, param, None))
    return out


def _optimizer_state(setup, param: torch.Tensor) -> dict | None:
    for optimizer in setup.optimizers:
        if param in optimizer.state:
            return optimizer.state[param]
    return None


def _init_optimizer_state(setup) -> None:
    """AdamW's state before its first step, so that a load has tensors to fill (AdamW makes it lazily)."""
    for optimizer in setup.optimizers:
        if not isinstance(optimizer, torch.optim.AdamW):
            raise CheckpointError(f"checkpoints hold AdamW state; this run's optimizer is {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p not in optimizer.state or not optimizer.state[p]:
                    optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def state_dict(setup, rank: int) -> dict[str, torch.Tensor]:
    """The flat {key: tensor} DCP reads and writes for this rank (views into the live tensors)."""
    _init_optimizer_state(setup)
    state: dict[str, torch.Tensor] = {}
    for name, tensor, param, local in _entries(setup):
        state[f"model/{name}"] = tensor
        if param is None:
            continue
        opt = _optimizer_state(setup, param)
        state[f"optim/{name.partition('/')[0]}/step"] = opt["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"optim/{name}/{key}"] = opt[key] if local is None else opt[key][local]
    state[f"rng/rank{rank}"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"rng-cuda/rank{rank}"] = torch.cuda.get_rng_state()
    return state


def _moe_counters(whole: torch.nn.Module) -> dict[str, list[int]]:
    from moespec.distributed.data_parallel import moe_layers

    return {str(layer.layer_index): [layer._shuffles, layer._last_shuffle] for layer in moe_layers(whole)}


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns that it assumes one process when no group is up: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(setup, plan, directory: Path, *, step: int, data: dict) -> Path:
    """Write step `step` to `directory/step-N` (every rank calls this) and point `latest` at it."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".step-{step:08d}.tmp"
    rank = _rank()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    with _one_process_quiet():
        dcp.save(state_dict(setup, rank), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _barrier()
    if rank == 0:
        meta = {
            "format": 1,
            "step": step,
            "name": plan.name,
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "data": data,
            "scaler": setup.scaler.state_dict() if setup.scaler.is_enabled() else None,
            "moe_counters": _moe_counters(setup.whole_model),
            "model": model_signature(plan),
        }
        write_atomic(tmp / META_FILE, json.dumps(meta) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_atomic(directory / LATEST_FILE, final.name + "\n")
    _barrier()
    return final


def resolve(path: Path) -> Path:
    """The step folder a --resume path names: a save dir's `latest`, or the folder itself."""
    path = Path(path)
    if (path / LATEST_FILE).is_file():
        path = path / (path / LATEST_FILE).read_text().strip()
    if not (path / META_FILE).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no checkpoint there (a folder written by --save, or one of its step-N folders)")
    return path


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: unreadable ({' '.join(str(exc).split())})") from None


def check_resumable(path: Path, plan) -> tuple[Path, dict]:
    """(step folder, meta) of the checkpoint `path` names, if it holds this plan's model."""
    path = resolve(path)
    meta = read_meta(path)
    mine = model_signature(plan)
    if meta.get("model") != mine:
        theirs = {name: shape for name, shape in meta.get("model") or []}
        diff = [name for name, shape in mine if theirs.get(name) != shape] or [n for n in theirs if n not in dict(mine)]
        raise CheckpointError(
            f"{path}: written for another model ({len(diff)} parameter(s) differ, first {diff[:1]}); resume with the spec it was trained with"
        )
    return path, meta


def load(setup, plan, path: Path) -> dict:
    """Fill this rank's model, optimizer, RNG and counters from the checkpoint `path` names
    (every rank calls this). Returns its meta (step, data stream)."""
    path, meta = check_resumable(path, plan)
    rank = _rank()
    state = state_dict(setup, rank)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    same_world = meta.get("world") == (dist.get_world_size() if dist.is_initialized() else 1)
    rng_keys = [key for key in (f"rng/rank{rank}", f"rng-cuda/rank{rank}") if key in state]
    for key in rng_keys:
        if key not in stored or not same_world:
            state.pop(key)  # another layout: random routers draw afresh (the losses then differ slightly)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    if f"rng/rank{rank}" in state:
        torch.set_rng_state(state[f"rng/rank{rank}"])
    if f"rng-cuda/rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"rng-cuda/rank{rank}"])
    for layer, (shuffles, last) in _counters_for(setup, meta).items():
        layer._shuffles, layer._last_shuffle = shuffles, last
    if meta.get("scaler") and setup.scaler.is_enabled():
        setup.scaler.load_state_dict(meta["scaler"])
    return meta


def _counters_for(setup, meta: dict) -> dict:
    from moespec.distributed.data_parallel import moe_layers

    saved = meta.get("moe_counters") or {}
    return {layer: saved[str(layer.layer_index)] for layer in moe_layers(setup.whole_model) if str(layer.layer_index) in saved}
