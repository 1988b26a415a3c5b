"""Quality proxies: what the `quality` objective means, said plainly.

Nothing here predicts quality from a simulation; a proxy is either a parameter count (more
parameters, all else equal, tend to mean lower loss) or the routed-LM scaling law of Clark et
al. 2022, whose coefficients and limits live in clark2022.yaml next to this file. Every
design also gets `quality_extrapolated`: True where the law is used outside what it was
fitted on (or on a router it did not fit), so a ranking can be read with that in mind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

CLARK2022_FILE = Path(__file__).with_name("clark2022.yaml")


@dataclass(frozen=True)
class ClarkFit:
    """One row of the paper's Eq. 1 solutions (log10 L = a lg N + b lg Ê + c lg N lg Ê + d)."""

    a: float
    b: float
    c: float
    d: float
    e_start: float
    e_max: float

    def saturated_experts(self, experts: np.ndarray) -> np.ndarray:
        """Ê: 1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max; Ê(1) = E_start, Ê -> E_max."""
        offset = 1.0 / (1.0 / self.e_start - 1.0 / self.e_max)
        return 1.0 / (1.0 / (np.asarray(experts, dtype=np.float64) - 1.0 + offset) + 1.0 / self.e_max)

    def loss(self, n_params: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Predicted validation loss (the paper's data and tokenizer; compare designs, not runs)."""
        lg_n = np.log10(np.asarray(n_params, dtype=np.float64))
        lg_e = np.log10(self.saturated_experts(experts))
        return 10.0 ** (self.a * lg_n + self.b * lg_e + self.c * lg_n * lg_e + self.d)


@functools.cache
def clark2022() -> dict:
    """The data file, parsed (coefficients, fitted range, router -> fit)."""
    return yaml.safe_load(CLARK2022_FILE.read_text())


def clark_fit(name: str) -> ClarkFit:
    return ClarkFit(**clark2022()["fits"][name])


def dense_equivalent_params(figures: dict, batch) -> np.ndarray:
    """N of the law: parameters a token passes through, without the token (and position)
    embedding and an untied LM head (lookups and the vocabulary projection, Kaplan's
    convention)."""
    lm_head = np.where(batch.tied, 0, batch.vocab * batch.d_model)
    return (figures["params_active"] - figures["params_embedding"] - lm_head).astype(np.float64)


def quality(proxy: str, figures: dict, batch, router_types: list[str], structure: np.ndarray, fit: str = "auto"):
    """(quality (N,), extrapolated (N,) bool) for a chunk; `router_types[structure[i]]` is the
    router of design i ('none' for a dense design)."""
    if proxy in ("params_total", "params_active"):
        return figures[proxy].astype(np.float64), np.zeros(len(batch), dtype=bool)
    data = clark2022()
    experts = np.where(batch.n_moe_layers > 0, batch.experts, 1)  # a dense model is E = 1
    n = np.maximum(dense_equivalent_params(figures, batch), 1.0)
    names = np.array([_fit_name(kind, fit, data) for kind in router_types])[structure]
    loss = np.empty(len(batch))
    for name in np.unique(names):
        mine = names == name
        loss[mine] = clark_fit(str(name)).loss(n[mine], experts[mine])
    span = data["fitted_range"]
    fitted_router = np.array([kind in data["fitted_routers"] or kind == "none" for kind in router_types])[structure]
    extrapolated = ((n < span["n_min"]) | (n > span["n_max"]) | (experts > span["e_max"])
                    | ((batch.k > span["k"]) & (batch.n_moe_layers > 0)) | ~fitted_router)  # fmt: skip
    return loss, extrapolated


def _fit_name(router_type: str, fit: str, data: dict) -> str:
    if fit != "auto":
        return fit
    return data["router_fit"].get(router_type, "s_base")


def describe(proxy: str, fit: str = "auto") -> str:
    """One line for reports: which proxy ranked the designs."""
    if proxy == "params_total":
        return "quality = total parameters (higher is better); a count, not a prediction"
    if proxy == "params_active":
        return "quality = active parameters per token (higher is better); a count, not a prediction"
    source = clark2022()["source"]
    which = "S-BASE row (Hash row for hash routers)" if fit == "auto" else f"{fit} row"
    return (f"quality = predicted validation loss, {source['paper']} (arXiv {source['arxiv']}), "
            f"{source['equation']}, {source['table']}: {which}; lower is better")
