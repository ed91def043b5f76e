"""Kernel timeline of one NSA decode step (torch.profiler / CUPTI), paper config fp16, q_len 1.

    PYTHONPATH=<repo> python benchmarks/trace_decode.py [B] [context]

Prints, per kernel of the step, its start and end relative to the step's first kernel (median over
steps), in eager launches and CUDA-graph replays: where programmatic dependent launch overlaps
kernels and where the step waits.
"""
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import PAPER  # noqa: E402

from nsa_codegen.kv_cache import NSAKVCache, nsa_decode  # noqa: E402


def timeline(run, steps=20):
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if "nsa_decode" in e.name and e.device_type.name == "CUDA"),
                key=lambda e: e.time_range.start)
    names = ["cmp", "topn", "sparse", "combine"]
    rows = {n: [] for n in names}
    i = 0
    while i + 4 <= len(ev):
        grp = ev[i:i + 4]
        if [next(n for n in names if f"_{n}_" in e.name + "_") for e in grp] != names:
            i += 1
            continue
        t0 = grp[0].time_range.start
        for n, e in zip(names, grp):
            rows[n].append((e.time_range.start - t0, e.time_range.end - t0))
        i += 4
    for n in names:
        if rows[n]:
            s = statistics.median(r[0] for r in rows[n])
            t = statistics.median(r[1] for r in rows[n])
            print(f"    {n:<8} start {s:7.1f} us  end {t:7.1f} us  (dur {t - s:5.1f})  [{len(rows[n])} steps]")


def main():
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    L = int(sys.argv[2]) if len(sys.argv) > 2 else 65536
    spec, dt = PAPER, torch.float16
    c = NSAKVCache(spec, B, L, device="cuda", dtype=dt)
    for t in (c.kv_k, c.kv_v, c.k_cmp, c.v_cmp):
        for i in range(t.shape[0]):
            t[i].normal_()
    c.set_lengths([L] * B)
    q = torch.randn(B, 1, spec.heads, spec.head_dim, device="cuda", dtype=dt)
    gs = [torch.rand(B, 1, spec.heads, device="cuda", dtype=dt) for _ in range(3)]
    fn = lambda: nsa_decode(q, c, *gs)  # noqa: E731
    print(f"B {B}, context {L}: eager", flush=True)
    timeline(fn)
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    print(f"B {B}, context {L}: CUDA graph", flush=True)
    timeline(g.replay)


if __name__ == "__main__":
    main()
