"""Where a profiled step's time went: torch.profiler events -> seconds per moespec region.

Forward ops belong to the innermost `moespec::<region>` around them. A backward op
("autograd::engine::evaluate_function: XBackward0") belongs to the forward op that created it:
autograd gives both the same sequence number, so the forward op's region is the backward's
too. A backward function that opens a region itself (our all-to-all) belongs to that region.
What no region claims (embedding, LM head, loss, DDP's hooks, the Python between ops) is
"other", so the parts add up to the measured step.
"""

from __future__ import annotations

from collections import defaultdict

from moespec.model.regions import PREFIX

BACKWARD_PREFIX = "autograd::engine::evaluate_function:"
STEP_PREFIX = "ProfilerStep"  # "ProfilerStep*" in events(), "ProfilerStep#N" in traces


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _region_of(event) -> str | None:
    for node in (event, *_ancestors(event)):
        if node.name.startswith(PREFIX):
            return node.name[len(PREFIX) :]
    return None


def _inside_backward(event) -> bool:
    return any(node.name.startswith(BACKWARD_PREFIX) for node in _ancestors(event))


def _descendant_region(event) -> str | None:
    stack = list(event.cpu_children)
    while stack:
        node = stack.pop()
        if node.name.startswith(PREFIX):
            return node.name[len(PREFIX) :]
        stack.extend(node.cpu_children)
    return None


def region_seconds(events) -> tuple[dict[str, float], float, int]:
    """(seconds per region summed over the profiled steps, total step seconds, steps seen).

    `events`: `prof.events()` of a torch.profiler run with a schedule (ProfilerStep#N ranges).
    """
    events = [e for e in events if e.device_type.name == "CPU"]
    steps = [e for e in events if e.name.startswith(STEP_PREFIX)]
    total_s = sum(e.time_range.elapsed_us() for e in steps) / 1e6
    by_region: dict[str, float] = defaultdict(float)
    sequence_region: dict[tuple[int, int], str] = {}
    for e in events:
        if e.name.startswith(BACKWARD_PREFIX) or _inside_backward(e):
            continue
        if e.name.startswith(PREFIX):
            outermost = e.cpu_parent is None or _region_of(e.cpu_parent) is None
            if outermost:
                by_region[e.name[len(PREFIX) :]] += e.time_range.elapsed_us() / 1e6
            continue
        if e.sequence_nr >= 0:
            region = _region_of(e)
            if region is not None:
                sequence_region.setdefault((e.thread, e.sequence_nr), region)
    for e in events:
        if not e.name.startswith(BACKWARD_PREFIX) or _inside_backward(e):
            continue  # only the outermost evaluate_function of each backward node
        region = _descendant_region(e) or sequence_region.get((e.fwd_thread, e.sequence_nr))
        if region is not None:
            by_region[region] += e.time_range.elapsed_us() / 1e6
    by_region["other"] = max(total_s - sum(by_region.values()), 0.0)
    return dict(by_region), total_s, len(steps)


def functional_collective_seconds(events) -> float:
    """Seconds in DTensor's collectives (`_c10d_functional::` ops and their waits) over the
    profiled steps, forward and backward: tensor parallelism's all-reduces. They sit inside
    the regions above too (attention, dense_ffn), so this is a figure of its own, not a part."""
    total_us = 0.0
    for e in events:
        if e.device_type.name == "CPU" and e.name.startswith("_c10d_functional::"):
            if not any(node.name.startswith("_c10d_functional::") for node in _ancestors(e)):
                total_us += e.time_range.elapsed_us()
    return total_us / 1e6
