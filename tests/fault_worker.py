"""A torchrun worker for the fault tests: rank 1 misbehaves mid-step while rank 0 is inside
an all-to-all. Run through moespec's launcher, like `moespec train --nproc`."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from moespec.distributed.context import init_distributed, shutdown
from moespec.distributed.launch import run_rank
from moespec.spec import load_plan


def main(mode: str, spec: str, timeout_s: float) -> None:
    plan = load_plan(spec)
    ctx = init_distributed(plan, timeout_s=timeout_s, device="cpu")
    x = torch.ones(4, 8)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=ctx.ep_group)  # step 1: everyone takes part
    if ctx.rank == 1:
        if mode == "raise":
            raise RuntimeError("injected failure in the middle of step 2")
        time.sleep(10 * timeout_s)  # "hang": never joins the next collective
    dist.all_to_all_single(out, x, group=ctx.ep_group)  # step 2: rank 0 waits here
    shutdown()


if __name__ == "__main__":
    run_rank(lambda: main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
