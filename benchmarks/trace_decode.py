"""Kernel timeline of one NSA decode step (torch.profiler / CUPTI), paper config fp16, q_len 1.

    PYTHONPATH=<repo> python benchmarks/trace_decode.py [B] [context]

Prints, per kernel of the step, its start and end relative to the step's first kernel (median over
steps), in eager launches and CUDA-graph replays: where programmatic dependent launch overlaps
kernels and where the step waits.
"""
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import capture_graph, paper_step_inputs, profile_calls, random_paper_cache  # noqa: E402

from nsa_codegen.kv_cache import nsa_decode  # noqa: E402


def timeline(run, steps=20):
    prof = profile_calls(run, steps)
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
    c = random_paper_cache(B, L)
    c.set_lengths([L] * B)
    q, gs = paper_step_inputs(B)
    fn = lambda: nsa_decode(q, c, *gs)  # noqa: E731
    print(f"B {B}, context {L}: eager", flush=True)
    timeline(fn)
    g = capture_graph(fn)
    print(f"B {B}, context {L}: CUDA graph", flush=True)
    timeline(g.replay)


if __name__ == "__main__":
    main()
