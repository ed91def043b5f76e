"""The paper configuration end to end: nsa_attention against dense causal attention, with the
per-kernel breakdown, and with the selection forward run by each of its schedules.

    python benchmarks/bench_paper.py [--T 8192 32768 65536] [--dtype float16] [--backward] [--out DIR]

Spec: HQ=64, H=4 (G=16), Dk=192, Dv=128, compression l=32 d=16 (mean), selection l'=64 n=16
(1 forced initial + 2 local), window 512; B=1. Cases at each T, timed interleaved (--rounds rounds,
each running every case --iters times, every launch timed with CUDA events; median and
interquartile range over all launches):
  dense_cudnn_d128    causal SDPA, cuDNN backend, Dk=Dv=128, 64 heads (the issue's dense baseline)
  dense_cudnn_paper   the same with Dk=192, Dv=128 (the paper's shapes), where cuDNN takes them
  ours                nsa_attention with the resolved schedules (tuned record or default)
  ours_sel_tile / ours_sel_token   the same with the selection forward forced to the token tile /
                      the per-token kernel (the case equal to the resolved one is not repeated)
  k:<kind>[...]       each kernel of the plan alone, on the inputs the forward gave it
With --backward, fwd+bwd cases: dense_cudnn_d128_fb, ours_fb (o.backward(do), all inputs require grad).
Before timing, at T=4096, ours and its selection variants are checked against nsa_codegen.reference
(fp32, on the block lists the kernels chose). Writes <out>/<date>-<gpu>-paper.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_forward import run_info  # noqa: E402
from bench_selection import say, stats, timed_rounds  # noqa: E402
from nsa_codegen import NSASpec, nsa_attention, ops  # noqa: E402
from nsa_codegen import reference as ref  # noqa: E402
from nsa_codegen.cache import get_kernel, load_scheduled, use_kernel  # noqa: E402
from nsa_codegen.lowering import arch_of_capability, lower_to_plan  # noqa: E402

HQ, H, DK, DV = 64, 4, 192, 128
SELECTION = {"tile": {"tile_tokens": 0}, "token": {"tile_tokens": 1}}


def paper_spec(dtype: str) -> NSASpec:
    return NSASpec(heads=HQ, kv_heads=H, head_dim=DK, v_head_dim=DV, dtype=dtype,
                   compression=dict(block=32, stride=16, pool="mean"),
                   selection=dict(block=64, top_n=16, initial=1, local=2), window=dict(size=512))


def inputs(T, dt, seed, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g, device="cuda").to(dt).requires_grad_(grad)
    gates = [torch.sigmoid(torch.randn(1, T, HQ, generator=g, device="cuda")).to(dt).requires_grad_(grad)
             for _ in range(3)]
    return rn(1, T, HQ, DK), rn(1, T, H, DK), rn(1, T, H, DV), gates


def selection_variants(spec, q):
    """{name: CompiledKernel} for the selection forward: the resolved one first ('resolved'), then
    each schedule of SELECTION that differs from it."""
    plan = lower_to_plan(spec, arch_of_capability(*torch.cuda.get_device_capability()))
    problem = next(c.key for c in plan.calls if c.kind == "selection_fwd")
    resolved = get_kernel(problem)
    out = {"resolved": resolved}
    for name, knobs in SELECTION.items():
        sched = {**dict(resolved.key.schedule), **knobs}
        if sched != dict(resolved.key.schedule):
            try:
                out[name] = load_scheduled(problem.with_schedule(sched))
            except Exception as e:  # a schedule the template rejects here
                say(f"selection {name}: {type(e).__name__}: {str(e)[:200]}")
    for name, k in out.items():
        say(f"selection {name}: {k.key} ({'prebuilt' if k.prebuilt else 'compiled / disk cache'})")
    return problem, out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(spec, dt, problem, variants):
    """Each selection variant's forward at T=4096 against the fp32 reference on the lists it chose."""
    q, k, v, g = inputs(4096, dt, seed=7)
    out = {}
    for name, kern in variants.items():
        with use_kernel(problem, kern):
            o, idx = nsa_attention(q, k, v, *g, spec, return_indices=True)
        want = ref.nsa_reference(q.float(), k.float(), v.float(), *(x.float() for x in g),
                                 _fp32(spec), block_indices=idx)
        low = ref.nsa_reference(q, k, v, *g, spec, block_indices=idx)
        out[name] = dict(rel_err=rel(o, want), ref_own_err=rel(low, want), nan=bool(torch.isnan(o).any()))
        say(f"check {name}: {out[name]}")
    return out


def _fp32(spec):
    d = spec.to_dict()
    d["dtype"] = "float32"
    return NSASpec.from_dict(d)


def dense(q, k, v, dk):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = HQ // H
    qh = q[..., :dk].transpose(1, 2)
    kh = k[..., :dk].transpose(1, 2).repeat_interleave(G, 1)
    vh = v.transpose(1, 2).repeat_interleave(G, 1)

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return run


def kernel_cases(spec, q, k, v, g, problem, variants):
    """One case per kernel of the forward plan, each on the tensors the forward gave it."""
    c, s, w = spec.compression, spec.selection, spec.window
    kc, vc = ref.compress(k, c.block, c.stride, c.first_block), ref.compress(v, c.block, c.stride, c.first_block)
    o_c, lse_c = ops.compression_attention(q, kc, vc, c.block, c.stride, c.first_block, -1.0)
    idx, _ = ops.selection_topn(q, kc, lse_c, c.block, c.stride, c.first_block, s.block, s.top_n, s.initial,
                                s.local, -1.0)
    o_s, _ = ops.selection_attention(q, k, v, idx, s.block, -1.0)
    o_w, _ = ops.window_attention(q, k, v, w.size, -1.0)
    cases = {
        "k:compression_fwd": lambda: ops.compression_attention(q, kc, vc, c.block, c.stride, c.first_block, -1.0),
        "k:selection_topn": lambda: ops.selection_topn(q, kc, lse_c, c.block, c.stride, c.first_block, s.block,
                                                       s.top_n, s.initial, s.local, -1.0),
        "k:window_fwd": lambda: ops.window_attention(q, k, v, w.size, -1.0),
        "k:gate_combine": lambda: ops.gate_combine(o_c, g[0], o_s, g[1], o_w, g[2], H),
    }
    for name, kern in variants.items():
        def run(kern=kern):
            with use_kernel(problem, kern):
                return ops.selection_attention(q, k, v, idx, s.block, -1.0)
        cases[f"k:selection_fwd[{name}]"] = run
    return cases, idx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel breakdown")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    spec = paper_spec(args.dtype)
    q, k, v, _ = inputs(64, dt, seed=0)
    problem, variants = selection_variants(spec, q)
    checks = check(spec, dt, problem, variants)
    bad = [n for n, c in checks.items() if c["nan"] or not c["rel_err"] < 1e-2]
    for n in bad:  # a variant that computes something else is not timed
        say(f"not timed: selection {n} fails its check {checks[n]}")
        variants.pop(n)
    rows = []
    for T in args.T:
        q, k, v, g = inputs(T, dt, seed=T)
        cases = {"dense_cudnn_d128": dense(q, k, v, 128), "dense_cudnn_paper": dense(q, k, v, DK)}
        for name, kern in variants.items():
            label = "ours" if name == "resolved" else f"ours_sel_{name}"

            def run(kern=kern):
                with use_kernel(problem, kern):
                    return nsa_attention(q, k, v, *g, spec)
            cases[label] = run
        if not args.no_kernels:
            kc, idx = kernel_cases(spec, q, k, v, g, problem, variants)
            cases.update(kc)
            u4, u64 = (float(x) for x in (ref_union(idx, 4), ref_union(idx, 64)))
        else:
            u4 = u64 = None
        for name, fn in list(cases.items()):  # drop cases that cannot run here (cuDNN shapes)
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as e:
                say(f"T={T} {name}: not timed: {type(e).__name__}: {str(e)[:200]}")
                cases.pop(name)
        if args.backward:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            gg = [x.detach().requires_grad_() for x in g]
            do = torch.randn(1, T, HQ, DV, device="cuda", dtype=dt)
            cases["ours_fb"] = lambda: nsa_attention(qg, kg, vg, *gg, spec).backward(do)
            dfwd = dense(qg, kg, vg, 128)
            cases["dense_cudnn_d128_fb"] = lambda: dfwd().backward(do.transpose(1, 2))
        say(f"T={T}: {len(cases)} cases, {args.rounds} rounds x {args.iters}")
        times = timed_rounds(cases, args.rounds, args.iters)
        for c, ms in times.items():
            st = stats(ms)
            rows.append(dict(T=T, case=c, union4=u4, union64=u64, **st))
            print(f"T={T:6d} {c:28s} {st['median_ms']:9.3f} ms [{st['q1_ms']:.3f}, {st['q3_ms']:.3f}]", flush=True)
        cases = q = k = v = g = None  # free this T's tensors before the next
        torch.cuda.empty_cache()
    from nsa_codegen import cache
    schedules = {str(x.key): x.schedule_source for x in cache._LOADED.values()}
    schedules.update({f"selection {n}": str(x.key) for n, x in variants.items()})
    save(args, rows, checks, run_info(schedules))


def ref_union(idx, tokens):
    from nsa_codegen import workloads
    return workloads.union_size(idx, tokens)


def save(args, rows, checks, info):
    stem = Path(args.out) / f"{info['date']}-{info['gpu'].replace(' ', '_')}-paper"
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(info, dtype=args.dtype, B=1, HQ=HQ, H=H, Dk=DK, Dv=DV, rounds=args.rounds, iters=args.iters,
                spec=paper_spec(args.dtype).to_dict())
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, checks=checks, rows=rows), indent=1))
    lines = [f"# Paper config end to end, {info['gpu']}, {info['date']}", "",
             f"commit {info['git_sha'][:12]} (dirty: {info['git_dirty']}), {args.dtype}, B=1, HQ={HQ}, H={H}, "
             f"Dk={DK}, Dv={DV}, l=32, d=16, l'=64, n=16, w=512; versions {info['versions']}.", "",
             f"Median ms over {args.rounds} interleaved rounds x {args.iters} launches (CUDA events), [q1, q3]. "
             "vs dense: dense_cudnn_d128's median over the case's (> 1: faster than dense). "
             "U4 / U64: mean distinct blocks in the lists top-n chose for 4 / 64 consecutive tokens.", "",
             "| T | case | ms | q1-q3 | vs dense (d128) | U4 | U64 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = {x["case"]: x["median_ms"] for x in rows if x["T"] == r["T"]}
        d = base.get("dense_cudnn_d128_fb" if r["case"].endswith("_fb") else "dense_cudnn_d128")
        vs = f"{d / r['median_ms']:.2f}x" if d else ""
        u = (f"{r['union4']:.1f} | {r['union64']:.1f}" if r["union4"] is not None else " | ")
        lines.append(f"| {r['T']} | {r['case']} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | {vs} | {u} |")
    lines += ["", "Checks at T=4096 against the fp32 reference on the kernels' own block lists:", "",
              "| selection schedule | rel err | reference's own rel err in the dtype |", "|---|---|---|"]
    lines += [f"| {n} | {c['rel_err']:.2e} | {c['ref_own_err']:.2e} |" for n, c in checks.items()]
    lines += ["", f"Schedules: `{json.dumps(info['schedules'])}`"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
