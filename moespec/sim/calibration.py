"""Calibrations: a backend's figures as measured on a real machine by `moespec calibrate`.

A calibration file (JSON, schemas/calibration.schema.json) records where and when it was
measured, its operator database (`ops`, sim/opdb.py: what each op family costs on that
machine) and the fitted link. Applying it to its backend sets the database, which the cost
model then sums along each step's op list instead of the roofline, the intra-node link's
latency and bandwidth (fitted so that the topology model's all-to-all and all-reduce times
match the measured ones), the peak FLOP/s (raised to the best measured rate when the
datasheet figure was lower: MFU's denominator) and the memory bandwidth.
Shipped calibrations live in profiler/calibrations/ (the package moespec.calibrations).
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from moespec.sim.backend import Backend, LinkSpec
from moespec.sim.opdb import database_from_dict
from moespec.sim.overhead import overheads_from_dict
from moespec.spec.errors import SpecError
from moespec.spec.schema import parse_checked, schema_errors
from moespec.spec.yaml_source import parse_yaml

_REPO_ROOT = Path(__file__).resolve().parents[2]


def calibrations_dir() -> Path:
    """Shipped calibrations: the package moespec.calibrations, else <repo>/profiler/calibrations."""
    try:
        return Path(str(resources.files("moespec.calibrations")))
    except ModuleNotFoundError:
        return _REPO_ROOT / "profiler" / "calibrations"


def calibration_name(backend_name: str, nproc: int, devices_per_node: int) -> str:
    """`<backend>.json` when measured with every device of a node busy (how multi-rank runs
    see the machine), else `<backend>.nproc<N>.json`: on a small machine the cores share
    caches and memory bandwidth, so one rank alone runs faster than one of two."""
    return f"{backend_name}.json" if nproc == devices_per_node else f"{backend_name}.nproc{nproc}.json"


def user_calibrations_dir() -> Path:
    """Where `moespec calibrate` writes by default: profiler/calibrations of this checkout,
    or of the current directory when moespec is installed as a package."""
    repo = _REPO_ROOT / "profiler" / "calibrations"
    return repo if repo.is_dir() else Path.cwd() / "profiler" / "calibrations"


def shipped_calibration(backend_name: str, world: int | None = None) -> Path | None:
    """The calibration for a run on `world` ranks: the one measured with that many ranks if
    there is one, else the backend's default; the user's own (user_calibrations_dir) before
    the ones shipped in the package."""
    names = ([f"{backend_name}.nproc{world}.json"] if world else []) + [f"{backend_name}.json"]
    for folder in dict.fromkeys([user_calibrations_dir(), calibrations_dir()]):
        for name in names:
            path = folder / name
            if path.is_file():
                return path
    return None


def calibration_errors(data: object, file: str = "<calibration>") -> list[SpecError]:
    """Schema errors of a calibration document (located when it came from text)."""
    text = json.dumps(data, indent=2)
    parsed, locations = parse_yaml(text, file)
    return schema_errors(parsed, locations, "calibration")


def load_calibration(path: str | Path) -> dict:
    """Read and validate a calibration file; SpecErrors with located lines if it is not one."""
    from moespec.spec.yaml_source import read_spec_text

    path = Path(path)
    text = read_spec_text(path, "calibration")  # size-capped, UTF-8 checked, one located line on failure
    data, _ = parse_checked(text, str(path), "calibration", not_a_mapping="a calibration is a JSON object written by `moespec calibrate`")
    return data


def apply_calibration(backend: Backend, calibration: dict, *, source: str = "") -> Backend:
    """`backend` with the calibrated figures; refuses a calibration of another backend."""
    if calibration["backend"] != backend.name:
        raise ValueError(f"the calibration {source or ''} was measured for backend {calibration['backend']!r}, not {backend.name!r}")
    fitted = calibration["fitted"]
    link = fitted["link"]
    device = dataclasses.replace(
        backend.device,
        memory_bandwidth_Bps=float(fitted["memory_bandwidth_Bps"]),
        peak_flops_per_s=MappingProxyType({dtype: float(v) for dtype, v in fitted["peak_flops_per_s"].items()}),
    )
    return dataclasses.replace(
        backend,
        device=device,
        matmul_efficiency=float(fitted["matmul_efficiency"]),
        memory_efficiency=1.0,  # the bandwidth above is what was measured
        intra_node=LinkSpec(float(link["bandwidth_Bps"]), float(link["latency_s"]), 1.0),
        overheads=overheads_from_dict(fitted["overhead"]),
        allreduce_scale=float(fitted["allreduce_scale"]),
        ops=database_from_dict(calibration["ops"]),
        calibration=source or calibration.get("created", "calibrated"),
        calibration_error=calibration["fit_error"].get("step"),
        calibration_probe_s=calibration.get("probe_s"),
        calibration_cpu_features=tuple(features) if (features := calibration["machine"].get("cpu_features")) is not None else None,
    )


def backend_with_calibration(backend: Backend, choice: str, *, world: int | None = None) -> Backend:
    """choice: "auto" (the shipped calibration of this backend for `world` ranks, if there is
    one), "none", or a file path. Raises SpecErrors for a bad file, ValueError for another
    backend's file."""
    if choice == "none":
        return backend
    if choice == "auto":
        path = shipped_calibration(backend.name, world)
        if path is None:
            return backend
    else:
        path = Path(choice)
    return apply_calibration(backend, load_calibration(path), source=str(path))
