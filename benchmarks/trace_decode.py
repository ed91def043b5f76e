"""Kernel timeline of one NSA decode step (torch.profiler / CUPTI), paper config fp16, q_len 1.

    PYTHONPATH=<repo> python benchmarks/trace_decode.py [B] [context] [num_parts]

num_parts defaults to what nsa_decode picks for B (decode._batch_parts).

Prints, per kernel of the step, its start and end relative to the step's first kernel (median over
steps), in eager launches and CUDA-graph replays: where programmatic dependent launch overlaps
kernels and where the step waits.
"""
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import PAPER, capture_graph, paper_step_inputs, profile_calls, random_paper_cache  # noqa: E402,E501

from nsa_codegen.decode import _batch_parts, nsa_decode  # noqa: E402


def timeline(run, parts=1, steps=20):
    """Median start / end of every kernel of a step relative to its first kernel; with batch parts
    (nsa_decode's num_parts) each kind appears once a part, numbered in start order."""
    prof = profile_calls(run, steps)
    ev = sorted((e for e in prof.events() if "nsa_decode" in e.name and e.device_type.name == "CUDA"),
                key=lambda e: e.time_range.start)
    names = ["cmp", "topn", "sparse", "combine"]
    kind = lambda e: next((n for n in names if f"_{n}_" in e.name + "_"), None)  # noqa: E731
    per = 4 * parts
    rows = {}
    i = 0
    while i + per <= len(ev):
        grp = ev[i:i + per]
        if kind(grp[0]) != "cmp" or sorted(kind(e) for e in grp) != sorted(names * parts):
            i += 1
            continue
        t0 = grp[0].time_range.start
        seen = {}
        for e in grp:
            k = kind(e)
            seen[k] = seen.get(k, -1) + 1
            label = k if parts == 1 else f"{k}#{seen[k]}"
            rows.setdefault(label, []).append((e.time_range.start - t0, e.time_range.end - t0))
        i += per
    for n, r in sorted(rows.items(), key=lambda kv: statistics.median(x[0] for x in kv[1])):
        s = statistics.median(x[0] for x in r)
        t = statistics.median(x[1] for x in r)
        print(f"    {n:<10} start {s:7.1f} us  end {t:7.1f} us  (dur {t - s:5.1f})  [{len(r)} steps]")


def main():
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    L = int(sys.argv[2]) if len(sys.argv) > 2 else 65536
    parts = int(sys.argv[3]) if len(sys.argv) > 3 else len(_batch_parts(B, PAPER.kv_heads, None))
    c = random_paper_cache(B, L)
    c.set_lengths([L] * B)
    q, gs = paper_step_inputs(B)
    fn = lambda: nsa_decode(q, c, *gs, num_parts=parts)  # noqa: E731
    print(f"B {B}, context {L}, {parts} batch part(s): eager", flush=True)
    timeline(fn, parts)
    g = capture_graph(fn)
    print(f"B {B}, context {L}, {parts} batch part(s): CUDA graph", flush=True)
    timeline(g.replay, parts)


if __name__ == "__main__":
    main()
