"""Hardware as data: a backend YAML (backends/*.yaml) -> schema check -> frozen `Backend`.

A backend names one kind of device, how many there are (`nodes * devices_per_node`), how they
are wired (`topology`, per-device `links`) and the efficiencies calibration will fit. Errors are
the spec layer's: every one found, one located line each (`file:line:col: path: what; fix`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from moespec.sim.overhead import Overheads, overheads_from_dict
from moespec.spec.errors import SpecError, SpecErrors
from moespec.spec.schema import load_schema, parse_checked, suggest  # same error wording as specs
from moespec.spec.yaml_source import read_spec_text

SCHEMA_FILE = "backend.schema.json"
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    peak_flops_per_s: Mapping[str, float] = field(hash=False)  # dtype (fp32, bf16, fp16) -> dense peak
    memory_bytes: int
    memory_bandwidth_Bps: float


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_Bps: float  # peak, per direction, per device
    latency_s: float
    efficiency: float  # achievable fraction of bandwidth_Bps

    @property
    def effective_bandwidth_Bps(self) -> float:
        return self.bandwidth_Bps * self.efficiency


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    device: DeviceSpec
    nodes: int
    devices_per_node: int
    topology: str  # nvswitch | ring | pcie | loopback
    intra_node: LinkSpec
    inter_node: LinkSpec | None  # None only when nodes == 1
    collective_library: str
    matmul_efficiency: float
    memory_efficiency: float
    file: str  # where it was read from, for messages
    overheads: Overheads = Overheads()  # fixed host time (sim/overhead.py); 0 unless measured
    calibration: str | None = None  # the calibration file applied, if any (sim/calibration.py)
    calibration_error: float | None = None  # its median step-time error on the models it was fitted on
    calibration_probe_s: float | None = None  # its machine probe (opbench.machine_probe_s); None: not recorded
    calibration_cpu_features: tuple[str, ...] | None = None  # calibrate.cpu_features() where it was made; None: not recorded
    allreduce_scale: float = 1.0  # measured all-reduce over the ideal ring model (calibrated; 1 = ideal)
    ops: object | None = field(default=None, compare=False)  # sim/opdb.OpDatabase of a calibration; None: the roofline

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node


@functools.cache
def load_backend_schema() -> dict:
    """The shipped backend schema (from the wheel or a source checkout)."""
    return load_schema("backend")


def backends_dir() -> Path:
    """The shipped backends: `moespec.backends` when installed as a package, else <repo>/backends."""
    try:
        return Path(str(resources.files("moespec.backends")))
    except ModuleNotFoundError:
        return _REPO_ROOT / "backends"


def shipped_backends() -> list[str]:
    return sorted(path.stem for path in backends_dir().glob("*.yaml"))


def load_backend(name_or_path: str | Path) -> Backend:
    """A shipped backend by name (`dgx-h100`) or any backend file by path; raises SpecErrors."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml"))
    if not looks_like_path:
        path = backends_dir() / f"{text}.yaml"
        if not path.is_file():
            names = shipped_backends()
            hint = suggest(text, names) or f"; shipped backends: {', '.join(names)}"
            raise SpecErrors([SpecError(text, 1, 1, "(root)", f"no shipped backend named {text!r}{hint}, or pass a file path")])
        return backend_from_text(path.read_text(), str(path))
    path = Path(name_or_path)
    return backend_from_text(read_spec_text(path, "backend"), str(path))


def backend_from_text(text: str, file: str = "<backend>") -> Backend:
    data, locations = parse_checked(text, file, "backend", not_a_mapping="a backend is a mapping (version:, name:, device:, ...); this document is not")
    links = data["links"]
    if data["nodes"] > 1 and "inter_node" not in links:
        raise SpecErrors(
            [locations.error(("links",), f"nodes is {data['nodes']}, so devices talk between nodes; add links.inter_node (the per-device NIC)")]
        )
    return _build(data, file)


def _defaults(definition: str) -> dict:
    properties = load_backend_schema()["$defs"][definition]["properties"]
    return {key: prop["default"] for key, prop in properties.items()}


def _link(data: dict) -> LinkSpec:
    values = _defaults("link") | data
    return LinkSpec(float(values["bandwidth_Bps"]), float(values["latency_s"]), float(values["efficiency"]))


def _build(data: dict, file: str) -> Backend:
    device = data["device"]
    efficiency = _defaults("efficiency") | data.get("efficiency", {})
    inter = data["links"].get("inter_node")
    return Backend(
        name=data["name"],
        description=data.get("description", ""),
        device=DeviceSpec(
            kind=device["kind"],
            peak_flops_per_s=MappingProxyType({dtype: float(v) for dtype, v in device["peak_flops_per_s"].items()}),
            memory_bytes=int(device["memory_bytes"]),
            memory_bandwidth_Bps=float(device["memory_bandwidth_Bps"]),
        ),
        nodes=data["nodes"],
        devices_per_node=data["devices_per_node"],
        topology=data["topology"],
        intra_node=_link(data["links"]["intra_node"]),
        inter_node=_link(inter) if inter is not None else None,
        collective_library=data["collective_library"],
        matmul_efficiency=float(efficiency["matmul"]),
        memory_efficiency=float(efficiency["memory"]),
        file=file,
        overheads=overheads_from_dict(data.get("overhead", {})),
    )
