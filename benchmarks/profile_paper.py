"""Where the paper config's forward + backward spends its GPU time, per CUDA kernel (torch.profiler).

    PYTHONPATH=<repo> python benchmarks/profile_paper.py [--T 65536] [--steps 3] [--out DIR]

Runs nsa_attention forward + backward (fp16, B=1, HQ=64, H=4, Dk=192, Dv=128, l=32, d=16, l'=64,
n=16, w=512; the top-n's own lists from random inputs) once to warm up, then `steps` times under the
profiler, and prints each kernel's time per step: our kernels by kind (the key's second field), the
rest (PyTorch's sums, sorts, casts) by name. Writes <date>-<gpu>-profile_paper.{md,json} with the
run's provenance. A diagnostic: the timed comparison is bench_paper.py.
"""
import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import run_info  # noqa: E402
from bench_paper import inputs, paper_spec  # noqa: E402

from nsa_codegen import nsa_attention  # noqa: E402

# Our kernels' CUDA names (the templates' prim_func names) -> kind. The compression and top-n
# templates name theirs `main`: those are told apart by launch order within a step (forward:
# compression_fwd, selection_topn; backward: compression_bwd_dq, then compression_bwd_dkdv).
NAMES = {"selection_attention_fwd": "selection_fwd", "selection_attention_bwd_dq": "selection_bwd_dq",
         "selection_attention_bwd_dkdv": "selection_bwd_dkdv", "selection_attention_bwd_reduce": "selection_bwd_reduce",
         "window_attention_fwd": "window_fwd", "window_attention_bwd_dq": "window_bwd_dq",
         "window_attention_bwd_dkdv": "window_bwd_dkdv", "gate_combine_bwd": "gate_combine_bwd",
         "gate_combine": "gate_combine"}
MAIN_ORDER = ("compression_fwd", "selection_topn", "compression_bwd_dq", "compression_bwd_dkdv")


def label(name: str, main_seen: int) -> str:
    """Our kernels by kind, anything else by a short name."""
    if name.startswith("main_kernel"):
        return f"{MAIN_ORDER[main_seen % 4]} (main_kernel #{main_seen % 4})"
    for prefix, kind in NAMES.items():
        if name.startswith(prefix + "_kernel"):
            return kind
    return "other: " + name.split("<")[0].split("(")[0][:70]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    spec = paper_spec("float16")
    q, k, v, g = inputs(args.T, torch.float16, seed=0, grad=True)
    do = torch.randn(1, args.T, 64, 128, device="cuda", dtype=torch.float16)

    def step():
        o = nsa_attention(q, k, v, *g, spec)
        o.backward(do)

    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    main_seen = 0
    for e in sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start):
        row = per[label(e.name, main_seen)]
        main_seen += e.name.startswith("main_kernel")
        row[0] += e.device_time / 1000.0 / args.steps   # us -> ms per step
        row[1] += 1
    total = sum(ms for ms, _ in per.values())
    rows = sorted(({"kernel": n, "ms_per_step": ms, "launches_per_step": c / args.steps} for n, (ms, c) in per.items()),
                  key=lambda r: -r["ms_per_step"])
    info = run_info({})
    stem = Path(args.out) / f"{info['date']}-{info['gpu'].replace(' ', '_')}-profile_paper"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=dict(info, T=args.T, steps=args.steps), rows=rows),
                                                    indent=1))
    lines = [f"# Paper config forward + backward per kernel, {info['gpu']}, {info['date']}", "",
             f"commit {info['git_sha'][:12]} (dirty: {info['git_dirty']}), fp16, T={args.T}, torch.profiler "
             f"(CUDA kernel time, mean of {args.steps} steps; kernels of one step run back to back, so the "
             f"sum is about the step's time).", "",
             "| kernel | ms / step | share | launches / step |", "|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['ms_per_step']:.3f} | {100 * r['ms_per_step'] / total:.1f}% | "
              f"{r['launches_per_step']:.0f} |" for r in rows]
    lines += [f"| total | {total:.3f} | | |"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
