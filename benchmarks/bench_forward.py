"""Forward benchmark on one GPU: dense SDPA (cuDNN, flash), FLA's parallel_nsa (if installed),
FlexAttention (window) and nsa-codegen, on the same inputs, in one process.

    python benchmarks/bench_forward.py [--T 8192 32768 65536] [--out benchmarks/results]

Cases of one T are timed interleaved (benchmarks/timing.py): --rounds rounds of --iters launches each,
CUDA events, median and [q1, q3]. Writes <date>-<gpu>-forward.json and .md.
Cases (B=1, HQ=64, H=4, D=128 unless said):
  dense_cudnn / dense_flash   causal SDPA over all T keys (GQA expanded for the backends that need it)
  fla_full                    FLA parallel_nsa: compression + top-n + selection (l=d=l'=64, mean, n=16, w=0)
  ours_fla_cfg                nsa_attention with the same config (compression + top-n + selection + gates)
  fla_selection / ours_selection   selection attention alone on the same block lists (forced blocks
                              + uniformly random visible ones; benchmarks/bench_selection.py adds locality)
  flex_window512 / ours_window512  sliding-window attention, w=512
  ours_paper                  paper config: Dk=192, Dv=128, l=32, d=16, l'=64, n=16, w=512, all branches
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch, nsa_attention  # noqa: E402
from nsa_codegen import ops  # noqa: E402
from timing import Rounds  # noqa: E402

HQ, H, D = 64, 4, 128


def attn_flops(T, keys_per_query, dk, dv, heads=HQ):
    return 2.0 * T * heads * keys_per_query * (dk + dv)


def selection_lists(T, n, bs, seed=0):
    """[1, T, H, n] block lists as top-n gives them (forced first block and two latest blocks, the
    rest random visible blocks; nsa_codegen.workloads "uniform": the least locality)."""
    from nsa_codegen import workloads
    return workloads.block_indices("uniform", 1, T, H, bs, n, initial=1, local=2, seed=seed)


def load_fla():
    """(ParallelNSAFunction, parallel_nsa) from FLA (fla-core, optional), or None."""
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction, parallel_nsa
        return ParallelNSAFunction, parallel_nsa
    except Exception as e:  # optional peer
        print(f"FLA not available: {e}")
        return None


def bench_specs(dtype):
    """The benchmarked configs: FLA-compatible (l=d=l'=64, mean, n=16, no window), the paper's
    (Dk=192, Dv=128, l=32, d=16, l'=64, n=16, w=512) and the window branch alone (w=512)."""
    fla_spec = NSASpec(heads=HQ, kv_heads=H, head_dim=D, v_head_dim=D, dtype=dtype,
                       compression=CompressionBranch(64, 64, "mean"), selection=SelectionBranch(64, 16, 1, 2),
                       window=None)
    paper = NSASpec(heads=HQ, kv_heads=H, head_dim=192, v_head_dim=128, dtype=dtype,
                    compression=CompressionBranch(32, 16, "mean"), selection=SelectionBranch(64, 16, 1, 2),
                    window=WindowBranch(512))
    win_only = NSASpec(heads=HQ, kv_heads=H, head_dim=D, v_head_dim=D, dtype=dtype, compression=None,
                       selection=None, window=WindowBranch(512))
    return fla_spec, paper, win_only


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4)
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    dev = "cuda"
    gpu = torch.cuda.get_device_name()
    fla = load_fla()
    has_fla = fla is not None
    if has_fla:
        ParallelNSAFunction, parallel_nsa = fla
    fla_spec, paper, win_only = bench_specs(args.dtype)
    rows = []
    # Compile every kernel the cases need up front, in parallel on the host's cores.
    from nsa_codegen.cache import precompile
    from nsa_codegen.lowering import arch_of_capability, lower_to_plan
    arch = arch_of_capability(*torch.cuda.get_device_capability())
    bad = [r for r in precompile([c.key for s in (fla_spec, paper, win_only) for c in lower_to_plan(s, arch).calls])
           if r[1]]
    for key, err, _ in bad:
        print(f"compile failed: {key}: {err[:300]}")
    rounds = Rounds(args.rounds, args.iters)

    for T in args.T:
        torch.manual_seed(T)
        q = torch.randn(1, T, HQ, D, device=dev, dtype=dt)
        k = torch.randn(1, T, H, D, device=dev, dtype=dt)
        v = torch.randn(1, T, H, D, device=dev, dtype=dt)
        g = [torch.rand(1, T, HQ, device=dev, dtype=dt) for _ in range(3)]
        dense = attn_flops(T, (T + 1) / 2, D, D)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kx, vx = kh.repeat_interleave(HQ // H, 1), vh.repeat_interleave(HQ // H, 1)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, backend in (("dense_cudnn", SDPBackend.CUDNN_ATTENTION), ("dense_flash", SDPBackend.FLASH_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qh, kx, vx, is_causal=True)
            rounds.add(name, run, T=T, flops=dense)
        n, bs = 16, 64
        sel_flops = attn_flops(T, n * bs, D, D)
        idx = selection_lists(T, n, bs, seed=T)
        if has_fla:
            rounds.add("fla_full", lambda: parallel_nsa(q, k, v, g[0], g[1], None, block_counts=n, block_size=bs),
                       T=T, flops=sel_flops)
            idx_l = idx.long().masked_fill(idx < 0, 0)
            cnt = (idx >= 0).sum(-1)
            rounds.add("fla_selection", lambda: ParallelNSAFunction.apply(q, k, v, idx_l, cnt, bs, D ** -0.5, None),
                       T=T, flops=sel_flops)
        rounds.add("ours_fla_cfg", lambda: nsa_attention(q, k, v, g[0], g[1], None, fla_spec), T=T, flops=sel_flops)
        rounds.add("ours_selection", lambda: ops.selection_attention(q, k, v, idx, bs, -1.0), T=T, flops=sel_flops)
        w = 512
        win_flops = attn_flops(T, w, D, D)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            mask = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < w), None, None, T, T, device=dev)
            flex = torch.compile(flex_attention)
            rounds.add("flex_window512", lambda: flex(qh, kh, vh, block_mask=mask, enable_gqa=True), T=T,
                       flops=win_flops)
        except Exception as e:
            print(f"flex attention unavailable: {e}")
        rounds.add("ours_window512", lambda: ops.window_attention(q, k, v, w, -1.0), T=T, flops=win_flops)
        qp = torch.randn(1, T, HQ, 192, device=dev, dtype=dt)
        kp = torch.randn(1, T, H, 192, device=dev, dtype=dt)
        vp = torch.randn(1, T, H, 128, device=dev, dtype=dt)
        paper_flops = attn_flops(T, n * bs + w + T / 16 / 2, 192, 128)
        rounds.add("ours_paper", lambda: nsa_attention(qp, kp, vp, *g, paper), T=T, flops=paper_flops)
        for r in rounds.run():
            r["tflops"] = r["flops"] / r["ms"] / 1e9 if r["ms"] else None
            rows.append(r)
            print(f"T={T:6d} {r['case']:<18} " + (f"{r['ms']:9.3f} ms [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}]  "
                                                  f"{r['tflops']:7.1f} TFLOP/s" if r["ms"] else r["error"]),
                  flush=True)
        q = k = v = qh = kh = vh = kx = vx = qp = kp = vp = idx = None  # free this T's tensors
        torch.cuda.empty_cache()

    # Where the time goes: each kernel of the two full forwards alone, at the longest T.
    T = max(args.T)
    breakdown = []
    for label, spec in (("fla_cfg", fla_spec), ("paper", paper)):
        torch.manual_seed(1)
        q = torch.randn(1, T, HQ, spec.head_dim, device=dev, dtype=dt)
        k = torch.randn(1, T, H, spec.head_dim, device=dev, dtype=dt)
        v = torch.randn(1, T, H, spec.v_head_dim, device=dev, dtype=dt)
        c, s = spec.compression, spec.selection
        from nsa_codegen import reference as ref
        kc, vc = ref.compress(k, c.block, c.stride), ref.compress(v, c.block, c.stride)
        o_c, lse = ops.compression_attention(q, kc, vc, c.block, c.stride, 0, -1.0)
        idx, _ = ops.selection_topn(q, kc, lse, c.block, c.stride, 0, s.block, s.top_n, s.initial, s.local, -1.0)
        rounds.add("mean pooling (torch)", lambda: (ref.compress(k, c.block, c.stride), ref.compress(v, c.block, c.stride)))
        rounds.add("compression_fwd", lambda: ops.compression_attention(q, kc, vc, c.block, c.stride, 0, -1.0))
        rounds.add("selection_topn", lambda: ops.selection_topn(q, kc, lse, c.block, c.stride, 0, s.block, s.top_n,
                                                                s.initial, s.local, -1.0))
        rounds.add("selection_fwd", lambda: ops.selection_attention(q, k, v, idx, s.block, -1.0))
        if spec.window:
            rounds.add("window_fwd", lambda: ops.window_attention(q, k, v, spec.window.size, -1.0))
        n_on = 3 if spec.window else 2
        pairs = [x for o, gg in zip([o_c] * n_on, [g[0]] * n_on) for x in (o, gg)] + [None, None] * (3 - n_on)
        rounds.add("gate_combine", lambda: ops.gate_combine(*pairs, H))
        for r in rounds.run():
            breakdown.append(dict(config=label, T=T, kernel=r["case"], ms=r["ms"], q1_ms=r.get("q1_ms"),
                                  q3_ms=r.get("q3_ms")))
            print(f"breakdown T={T} {label:<8} {r['case']:<22} {r['ms'] or float('nan'):8.3f} ms", flush=True)
        q = k = v = kc = vc = o_c = lse = idx = pairs = None
        torch.cuda.empty_cache()

    save_results(args.out, "forward", f"Forward benchmark, {gpu}",
                 f"B=1, HQ={HQ}, H={H}, D={D}, {args.dtype}; median ms of {args.rounds} interleaved rounds x "
                 f"{args.iters} launches (CUDA events), [q1, q3]; speedup vs dense cuDNN.",
                 args.dtype, args.T, rows, breakdown,
                 f"Per kernel at T={max(args.T)} (each alone, same inputs as a full forward would give it):",
                 ("kernel", "ms"), with_tflops=True, rounds=args.rounds, iters=args.iters)


def run_info(schedules: dict | None = None) -> dict:
    """Where the numbers come from: commit, dirty flag (NSA_GIT_SHA / NSA_GIT_DIRTY when set, else
    git), GPU ("cpu" without one), library versions, and each kernel's schedule (default:
    every kernel this process loaded, with its source: tuned, default or fallback)."""
    import importlib.metadata as md
    root = Path(__file__).resolve().parent.parent

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return None
    # The environment wins: the lent GPU's copy of the tree carries a stale .git.
    sha = os.environ.get("NSA_GIT_SHA") or git("rev-parse", "HEAD") or "unknown"
    dirty = os.environ.get("NSA_GIT_DIRTY")
    if dirty is None:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(dirty) if dirty is not None else "unknown"
    else:
        dirty = dirty not in ("0", "false", "False", "")

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None
    if schedules is None:
        from nsa_codegen import cache
        schedules = {str(k.key): k.schedule_source for k in cache._LOADED.values()}
    return dict(date=datetime.date.today().isoformat(), git_sha=sha, git_dirty=dirty,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", cuda=torch.version.cuda,
                versions={p: ver(p) for p in ("torch", "triton", "tilelang", "fla-core")}, schedules=schedules)


def save_results(out, what, title, intro, dtype, Ts, rows, breakdown, breakdown_intro, breakdown_cols,
                 with_tflops=False, **meta):
    """Write <out>/<date>-<gpu>-<what>.json (meta, rows, breakdown) and .md (tables); print the md."""
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    stem = Path(out) / f"{date}-{gpu.replace(' ', '_')}-{what}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(run_info(), dtype=dtype, B=1, HQ=HQ, H=H, D=D, **meta)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, breakdown=breakdown), indent=1))
    tf_head, tf_rule = (" TFLOP/s |", "---|") if with_tflops else ("", "")
    lines = [f"# {title}, {date}", "",
             f"commit {meta['git_sha'][:12]} (dirty: {meta['git_dirty']}); versions {meta['versions']}.", "",
             intro, "",
             f"| T | case | ms |{tf_head} vs dense cuDNN |", f"|---|---|---|{tf_rule}---|"]
    for T in Ts:
        base = next((r["ms"] for r in rows if r["T"] == T and r["case"] == "dense_cudnn" and r["ms"]), None)
        for r in (r for r in rows if r["T"] == T):
            if r["ms"] is None:
                lines.append(f"| {T} | {r['case']} | failed: {r['error'][:80]} |{' |' if with_tflops else ''} |")
                continue
            sp = f"{base / r['ms']:.2f}x" if base else ""
            tf = f" {r['tflops']:.1f} |" if with_tflops else ""
            iqr = f" [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}]" if r.get("q1_ms") is not None else ""
            lines.append(f"| {T} | {r['case']} | {r['ms']:.3f}{iqr} |{tf} {sp} |")
    lines += ["", breakdown_intro, "", "| config | " + " | ".join(breakdown_cols) + " |",
              "|---|" + "---|" * len(breakdown_cols)]
    lines += [f"| {b['config']} | {b['kernel']} | " + (f"{b['ms']:.3f} |" if b["ms"] is not None else "failed |")
              for b in breakdown]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
