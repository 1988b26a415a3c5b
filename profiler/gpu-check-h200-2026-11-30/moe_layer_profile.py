# The MoE layer on one H200 (bf16, shape "fine" of bench/moe_layer.py at T 8192): wall time per
# step and torch.profiler tables, dropless and capacity, beside a dense FFN. Run from the repo root:
#   python3 profiler/gpu-check-h200-2026-11-30/moe_layer_profile.py
import sys, time, torch
sys.path.insert(0, "bench")
import moe_layer as B
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
s = dict(next(x for x in B.SHAPES if x["name"] == "fine"), tokens=8192)
for name, (fn, mod) in {"dropless": B.ours(s, dropless=True), "capacity": B.ours(s, dropless=False), "dense": B.dense(s)}.items():
    mod.to("cuda", torch.bfloat16)
    x = torch.randn(s["tokens"], s["d"], device="cuda", dtype=torch.bfloat16, requires_grad=True); dy = torch.randn_like(x)
    for _ in range(5): fn(x).backward(dy)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): fn(x).backward(dy)
    torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5): fn(x).backward(dy)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in ka) / 5 / 1e3
    print(f"== {name}: wall {wall:.2f} ms/step, GPU kernel time {gpu_ms:.2f} ms/step, ops {sum(e.count for e in ka)//5}/step")
    if name != "dense":
        print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        print(ka.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60))
