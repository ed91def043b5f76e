"""Packed batches (cu_seqlens) on one GPU, forward and forward + backward: ours in one launch per
kernel against the per-sequence loop it replaces and FLA's varlen parallel_nsa, on the same inputs.

Workloads (B = 1, sequences back to back):
  docs64   64 documents, lengths log-uniform in [256, 8192] (seeded; ~150k tokens)
  8x16k    8 sequences of 16384 tokens
Cases:
  ours_pack    nsa_attention(..., cu_seqlens=cu) under no_grad: one launch per kernel
  ours_loop    nsa_attention on each sequence in turn (what a pack ran before: S launches per kernel)
  fla_pack     FLA parallel_nsa(..., cu_seqlens=cu) (fla-core, optional), the FLA config only
  *_fb         the same, forward + backward (gradients of q, k, v and the gates; --backward)
Configs: fla_cfg (HQ=64, H=4, D=128, l=d=l'=64, mean, n=16, no window: what FLA computes) and the
paper's (Dk=192, Dv=128, l=32, d=16, l'=64, n=16, w=512; no FLA peer at these head dims).
Median ms over interleaved rounds (CUDA events), [q1, q3]; the pack's outputs are checked against
the loop's (relative error). Writes <out>/<date>-<gpu>-packed.{json,md}.

  python benchmarks/bench_packed.py [--workloads docs64 8x16k] [--backward] [--rounds 5 --iters 4] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_codegen import nsa_attention  # noqa: E402
from bench_forward import HQ, H, bench_specs, load_fla, run_info  # noqa: E402
from timing import Rounds, say  # noqa: E402


def lengths_of(workload: str, seed: int = 0) -> list[int]:
    if workload == "docs64":
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(64, generator=g)
        return [int(x) for x in torch.exp(torch.log(torch.tensor(256.0)) + u * torch.log(torch.tensor(32.0)))]
    if workload == "8x16k":
        return [16384] * 8
    raise ValueError(f"unknown workload {workload!r}; known: docs64, 8x16k")


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["docs64", "8x16k"])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    args = ap.parse_args()
    dt, dev = getattr(torch, args.dtype), "cuda"
    fla = load_fla()
    fla_spec, paper, _ = bench_specs(args.dtype)
    rows, checks = [], {}
    for wl in args.workloads:
        lens = lengths_of(wl)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
        T = int(cu[-1])
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        say(f"{wl}: {len(lens)} sequences, {T} tokens")
        for label, spec in (("fla_cfg", fla_spec), ("paper", paper)):
            torch.manual_seed(len(lens))
            q = torch.randn(1, T, HQ, spec.head_dim, device=dev, dtype=dt)
            k = torch.randn(1, T, H, spec.head_dim, device=dev, dtype=dt)
            v = torch.randn(1, T, H, spec.v_head_dim, device=dev, dtype=dt)
            g = [torch.rand(1, T, HQ, device=dev, dtype=dt) for _ in range(3)]
            gw = g[2] if spec.window else None

            def pack():
                with torch.no_grad():
                    return nsa_attention(q, k, v, g[0], g[1], gw, spec, cu_seqlens=cu)

            def loop():
                with torch.no_grad():
                    return torch.cat([nsa_attention(q[:, a:b], k[:, a:b], v[:, a:b], g[0][:, a:b], g[1][:, a:b],
                                                    None if gw is None else gw[:, a:b], spec)
                                      for a, b in bounds], 1)
            o_pack, o_loop = pack(), loop()
            checks[f"{wl}/{label}"] = dict(rel_err_pack_vs_loop=rel_err(o_pack, o_loop),
                                           nan=bool(torch.isnan(o_pack).any()))
            say(f"  {label}: pack vs loop relative error {checks[f'{wl}/{label}']['rel_err_pack_vs_loop']:.2e}")
            rounds = Rounds(args.rounds, args.iters)
            rounds.add("ours_pack", pack, workload=wl, config=label, T=T, seqs=len(lens))
            rounds.add("ours_loop", loop, workload=wl, config=label, T=T, seqs=len(lens))
            s = spec.selection
            if fla is not None and label == "fla_cfg":
                _, parallel_nsa = fla
                rounds.add("fla_pack", lambda: parallel_nsa(q, k, v, g[0], g[1], None, block_counts=s.top_n,
                                                            block_size=s.block, cu_seqlens=cu.long()),
                           workload=wl, config=label, T=T, seqs=len(lens))
            if args.backward:
                do = torch.randn(1, T, HQ, spec.v_head_dim, device=dev, dtype=dt)
                ins = [q, k, v, g[0], g[1]] + ([gw] if gw is not None else [])

                def fb(fn):
                    leaves = [x.detach().requires_grad_() for x in ins]
                    out = fn(*leaves)
                    return torch.autograd.grad((out * do).float().sum(), leaves)

                def ours(q_, k_, v_, g0, g1, gw_=None):
                    return nsa_attention(q_, k_, v_, g0, g1, gw_, spec, cu_seqlens=cu)

                def ours_loop(q_, k_, v_, g0, g1, gw_=None):
                    return torch.cat([nsa_attention(q_[:, a:b], k_[:, a:b], v_[:, a:b], g0[:, a:b], g1[:, a:b],
                                                    None if gw_ is None else gw_[:, a:b], spec) for a, b in bounds], 1)
                rounds.add("ours_pack_fb", lambda: fb(ours), workload=wl, config=label, T=T, seqs=len(lens))
                rounds.add("ours_loop_fb", lambda: fb(ours_loop), workload=wl, config=label, T=T, seqs=len(lens))
                if fla is not None and label == "fla_cfg":
                    rounds.add("fla_pack_fb", lambda: fb(lambda q_, k_, v_, g0, g1: parallel_nsa(
                        q_, k_, v_, g0, g1, None, block_counts=s.top_n, block_size=s.block, cu_seqlens=cu.long())),
                        workload=wl, config=label, T=T, seqs=len(lens))
            for r in rounds.run():
                rows.append(r)
                say(f"  {wl:<7} {label:<8} {r['case']:<10} " + (f"{r['ms']:9.3f} ms [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}]"
                                                              if r["ms"] else r["error"][:200]))
            q = k = v = g = gw = o_pack = o_loop = None
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    stem = Path(args.out) / f"{date}-{gpu.replace(' ', '_')}-packed"
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(run_info(), dtype=args.dtype, HQ=HQ, H=H, rounds=args.rounds, iters=args.iters,
                workloads={wl: lengths_of(wl) for wl in args.workloads}, checks=checks)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Packed batches (forward, no autograd), {gpu}, {date}", "",
             f"commit {meta['git_sha'][:12]} (dirty: {meta['git_dirty']}), {args.dtype}, HQ={HQ}, H={H}; "
             f"versions {meta['versions']}.", "",
             f"Median ms over {args.rounds} interleaved rounds x {args.iters} calls, [q1, q3]. ours_pack: one launch "
             "per kernel; ours_loop: nsa_attention per sequence; fla_pack: FLA parallel_nsa with cu_seqlens; "
             "*_fb: forward + backward.", "",
             "| workload | config | case | ms | vs ours_loop (_fb) |", "|---|---|---|---|---|"]
    for r in rows:
        loop = "ours_loop_fb" if r["case"].endswith("_fb") else "ours_loop"
        base = next((x["ms"] for x in rows if x["workload"] == r["workload"] and x["config"] == r["config"]
                     and x["case"] == loop and x["ms"]), None)
        if r["ms"] is None:
            lines.append(f"| {r['workload']} | {r['config']} | {r['case']} | failed: {r['error'][:80]} | |")
            continue
        sp = f"{base / r['ms']:.2f}x" if base else ""
        lines.append(f"| {r['workload']} | {r['config']} | {r['case']} | {r['ms']:.3f} [{r['q1_ms']:.3f}, "
                     f"{r['q3_ms']:.3f}] | {sp} |")
    lines += ["", "Pack vs loop (relative error of the outputs): "
              + ", ".join(f"{k} {v['rel_err_pack_vs_loop']:.1e}" for k, v in checks.items())]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
