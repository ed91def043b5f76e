"""Selection attention alone, on block lists with and without locality: our schedules and FLA's.

    python benchmarks/bench_selection.py [--T 8192 32768 65536] [--dtype bfloat16] [--out DIR]

B=1, HQ=64, H=4, selection block 64, n=16 (forced: the first block and the two latest). Configs:
paper (Dk=192, Dv=128) and fla (Dk=Dv=128). Block lists (nsa_codegen.workloads): uniform (random
scores: the largest unions) and drift (scores that vary smoothly along the sequence, coherence 16
and 256 tokens). Each list's locality is reported as the mean union size of 4 and 64 consecutive
tokens' lists. Cases: ours_tile (the token tile, tile_tokens 0 = auto), ours_token (the per-token
kernel, tile_tokens 1), fla (FLA's parallel_nsa selection on the same lists, if fla-core imports).

Every case is first checked against nsa_codegen.reference on the same lists at T=4096; then all
cases of one (config, T, lists) are timed interleaved: --rounds rounds, each running every case
--iters times, each launch timed with CUDA events; median and interquartile range over all launches.
--lists-file adds the lists of a trained model (benchmarks/trained_selections.py), one kind per layer.
Writes <out>/<date>-<gpu>-selection.{json,md}; the json carries the git commit, dirty flag, GPU,
library versions and each kernel's schedule.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_forward import run_info  # noqa: E402
from timing import say, stats, timed_rounds  # noqa: E402
from nsa_codegen import workloads  # noqa: E402
from nsa_codegen import reference as ref  # noqa: E402

HQ, H, BS, N = 64, 4, 64, 16
CONFIGS = {"paper": (192, 128), "fla": (128, 128)}
LISTS = [("uniform", 1), ("drift", 16), ("drift", 256)]


def our_kernels(q, k, v, variants=()):
    """{case: (callable(q, k, v, idx) -> o, schedule)} for our two selection schedules, and one
    case per variant (schedule knobs over the resolved schedule's) named ours_<knob><value>..."""
    from nsa_codegen.cache import get_kernel, kernel_with_knobs
    from nsa_codegen.launch import kernel_key
    problem = kernel_key("selection_fwd", q, k, v.shape[3], -1.0, sel_block=BS, top_n=N)
    resolved = get_kernel(problem)   # the schedule the op runs (tuned record or default)
    out = {}
    cases = [("ours_tile", {"tile_tokens": 0}), ("ours_token", {"tile_tokens": 1})]
    cases += [("ours_" + "_".join(f"{kk}{vv}" for kk, vv in var.items()), var) for var in variants]
    for case, knobs in cases:
        say(f"loading {case}: {knobs} over {dict(resolved.key.schedule)}")
        kern = kernel_with_knobs(problem, knobs)
        say(f"  {kern.key} ({'prebuilt' if kern.prebuilt else 'compiled / disk cache'}, {kern.compile_seconds:.1f} s)")

        def call(q, k, v, idx, kern=kern):
            B, T = q.shape[:2]
            o = torch.empty(B, T, HQ, v.shape[3], device=q.device, dtype=q.dtype)
            lse = torch.empty(B, T, HQ, device=q.device)
            seq_start = torch.zeros(B, T, dtype=torch.int32, device=q.device)   # one sequence per batch row
            kern(q, k, v, idx, seq_start, o, lse)
            return o
        source = resolved.schedule_source if same else "forced from " + resolved.schedule_source
        out[case] = (call, dict(schedule=sched, source=source))
    return out


def fla_selection():
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except Exception as e:
        print(f"FLA not available: {e}")
        return None

    def call(q, k, v, idx):
        # FLA takes the first block_counts entries of each list: ours are ascending with -1 pads last.
        cnt = (idx >= 0).sum(-1)
        return ParallelNSAFunction.apply(q, k, v, idx.long().clamp_min(0), cnt, BS, q.shape[-1] ** -0.5, None)
    return call


def loads_and_flops(idx, dk, dv) -> dict:
    """Per case, (GB of K/V loaded into shared memory, MMA FLOPs issued), and the useful FLOPs.
    Per token: every (token, KV head) loads its own blocks and runs M = max(16, G) rows on each;
    token tile (64 // G tokens): every tile loads its union once and runs 64 rows on each block."""
    G = HQ // H
    T = idx.shape[1]
    per_block = BS * (dk + dv) * 2   # bytes of one K + V block; FLOPs per row and block: 2 * BS * (dk + dv)
    entries = (idx >= 0).sum().item()
    tile = 64 // G
    unions = workloads.union_size(idx, tile) * H * (T // tile)
    return {"ours_token": (entries * per_block / 1e9, entries * max(16, G) * 2 * BS * (dk + dv)),
            "ours_tile": (unions * per_block / 1e9, unions * 64 * 2 * BS * (dk + dv)),
            "useful": entries * G * 2 * BS * (dk + dv)}


def load_trained(path) -> dict:
    """{T: [layers, 1, T, H, n]} block lists of a trained model (trained_selections.py), checked for
    this benchmark's shape."""
    saved = torch.load(path)
    if (saved["H"], saved["block"], saved["top_n"]) != (H, BS, N):
        raise SystemExit(f"{path}: lists for H={saved['H']}, block {saved['block']}, n={saved['top_n']}; "
                         f"this benchmark runs H={H}, block {BS}, n={N}")
    return saved["lists"]


def list_sources(T, trained):
    """[(name, () -> [1, T, H, n] int32 on CUDA)]: the synthetic kinds, then each trained layer's lists
    made for this T."""
    out = [(f"{kind}{coh if kind == 'drift' else ''}",
            lambda kind=kind, coh=coh: workloads.block_indices(kind, 1, T, H, BS, N, coherence=coh, seed=T + 1))
           for kind, coh in LISTS]
    if T in trained:
        out += [(f"trained-L{i}", lambda x=x: x.to("cuda", torch.int32).contiguous())
                for i, x in enumerate(trained[T])]
    return out


def inputs(T, dk, dv, dt, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, HQ, dk, generator=g, device="cuda").to(dt)
    k = torch.randn(1, T, H, dk, generator=g, device="cuda").to(dt)
    v = torch.randn(1, T, H, dv, generator=g, device="cuda").to(dt)
    return q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--lists-file", default=None,
                    help="also time the block lists of a trained model (benchmarks/trained_selections.py's "
                         "-lists.pt), each layer's lists as one more kind of list, at the T they were made for")
    ap.add_argument("--variants", default="[]",
                    help='JSON list of schedule-knob dicts to time as extra cases, e.g. [{"num_stages": 3}]')
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    trained = load_trained(args.lists_file) if args.lists_file else {}
    fla = fla_selection()
    rows, checks, schedules = [], [], {}
    for cfg in args.configs:
        dk, dv = CONFIGS[cfg]
        q, k, v = inputs(4096, dk, dv, dt, seed=1)
        ours = our_kernels(q, k, v, json.loads(args.variants))
        schedules[cfg] = {c: s for c, (_, s) in ours.items()}
        cases = {c: fn for c, (fn, _) in ours.items()}
        if fla is not None:
            cases["fla"] = fla
        say(f"{cfg}: checking {list(cases)} against the reference")
        # Same function first: every case against the fp32 reference on each kind of list.
        for kind, coh in LISTS:
            idx = workloads.block_indices(kind, 1, 4096, H, BS, N, coherence=coh, seed=2)
            want, _ = ref.selection_attention(q.float(), k.float(), v.float(), idx, BS)
            for c, fn in cases.items():
                try:
                    o = fn(q, k, v, idx).float()
                    err = ((o - want).norm() / want.norm()).item()
                except Exception as e:
                    err = f"{type(e).__name__}: {str(e)[:200]}"
                checks.append(dict(config=cfg, lists=f"{kind}{coh if kind == 'drift' else ''}", case=c, rel_err=err))
                print(f"check {cfg} {kind}{coh} {c}: {err}", flush=True)
        bad = [x for x in checks if x["config"] == cfg and not (isinstance(x["rel_err"], float) and x["rel_err"] < 1e-2)]
        for x in bad:  # a case that computes something else is not timed
            cases.pop(x["case"], None)
        for T in args.T:
            q, k, v = inputs(T, dk, dv, dt, seed=T)
            for lists, make_idx in list_sources(T, trained):
                say(f"{cfg} T={T} {lists}: lists, then {args.rounds} rounds")
                idx = make_idx()
                u4, u64 = workloads.union_size(idx, 4), workloads.union_size(idx, 64)
                work = loads_and_flops(idx, dk, dv)
                times = timed_rounds({c: (lambda fn=fn: fn(q, k, v, idx)) for c, fn in cases.items()},
                                     args.rounds, args.iters)
                for c, ms in times.items():
                    st = stats(ms)
                    kv_gb, flop = work.get(c, (None, None))
                    st.update(kv_gb=kv_gb, mma_tflop=flop and flop / 1e12, useful_tflops=work["useful"] / st["median_ms"] / 1e9)
                    rows.append(dict(config=cfg, T=T, lists=lists, union4=u4, union64=u64, case=c, **st))
                    print(f"{cfg:5s} T={T:6d} {lists:9s} U4={u4:5.1f} U64={u64:6.1f} {c:11s} "
                          f"{st['median_ms']:8.3f} ms [{st['q1_ms']:.3f}, {st['q3_ms']:.3f}]", flush=True)
                del idx
                torch.cuda.empty_cache()
            del q, k, v
    save(args, rows, checks, run_info(schedules))


def save(args, rows, checks, info):
    stem = Path(args.out) / f"{info['date']}-{info['gpu'].replace(' ', '_')}-selection"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=dict(info, dtype=args.dtype, B=1, HQ=HQ, H=H,
                                                                   block=BS, top_n=N, rounds=args.rounds,
                                                                   iters=args.iters),
                                                         checks=checks, rows=rows), indent=1))
    lines = [f"# Selection attention alone, {info['gpu']}, {info['date']}", "",
             f"commit {info['git_sha'][:12]} (dirty: {info['git_dirty']}), {args.dtype}, B=1, HQ={HQ}, H={H}, "
             f"block {BS}, n={N}; versions {info['versions']}.", "",
             f"Median ms over {args.rounds} interleaved rounds x {args.iters} launches (events), [q1, q3]. "
             "U4 / U64: mean distinct blocks in the lists of 4 / 64 consecutive tokens.", "",
             "K/V GB: K/V bytes each design loads into shared memory (through L2); MMA TFLOP: tensor-core work it "
             "issues (masked rows included); useful TFLOP/s: the selection's own FLOPs over the time.", "",
             "| config | T | lists | U4 | U64 | case | ms | q1-q3 | K/V GB | MMA TFLOP | useful TFLOP/s | vs fla | vs ours_token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = [x for x in rows if (x["config"], x["T"], x["lists"]) == (r["config"], r["T"], r["lists"])]
        base = {x["case"]: x["median_ms"] for x in same}
        vs = lambda c: f"{base[c] / r['median_ms']:.2f}x" if c in base else ""  # noqa: E731
        kv = f"{r['kv_gb']:.1f}" if r["kv_gb"] is not None else ""
        fl = f"{r['mma_tflop']:.2f}" if r["mma_tflop"] is not None else ""
        lines.append(f"| {r['config']} | {r['T']} | {r['lists']} | {r['union4']:.1f} | {r['union64']:.1f} | "
                     f"{r['case']} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | {kv} | {fl} | "
                     f"{r['useful_tflops']:.0f} | {vs('fla')} | {vs('ours_token')} |")
    lines += ["", "Checks against the fp32 reference at T=4096 (relative error):", "",
              "| config | lists | case | rel err |", "|---|---|---|---|"]
    lines += [f"| {c['config']} | {c['lists']} | {c['case']} | "
              f"{c['rel_err'] if isinstance(c['rel_err'], str) else format(c['rel_err'], '.2e')} |" for c in checks]
    lines += ["", f"Schedules: `{json.dumps(info['schedules'])}`"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
