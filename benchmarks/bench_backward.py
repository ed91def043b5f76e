"""Forward + backward benchmark on one GPU: dense SDPA (cuDNN, flash), FLA's parallel_nsa (if
installed), FlexAttention (window) and nsa-codegen, on the same inputs, in one process.

    python benchmarks/bench_backward.py [--T 8192 65536] [--out benchmarks/results]

Each case times one forward plus `torch.autograd.grad` of every differentiable input (q, k, v and
the gates where there are some) with a fixed random output gradient; the cases of one T timed
interleaved (benchmarks/timing.py: --rounds x --iters launches, CUDA events, median and [q1, q3]). Same shapes as bench_forward.py (B=1, HQ=64, H=4, D=128):
  dense_cudnn / dense_flash        causal SDPA over all T keys
  fla_full / ours_fla_cfg          compression + top-n + selection + gates (l=d=l'=64, mean, n=16, w=0)
  fla_selection / ours_selection   selection attention alone on the same random indices
  flex_window512 / ours_window512  sliding-window attention, w=512
  ours_paper                       paper config, Dk=192, Dv=128, l=32, d=16, l'=64, n=16, w=512, gates
Then each backward kernel of the paper and FLA configs alone at the longest T.
Writes <date>-<gpu>-backward.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import H, HQ, D, bench_specs, load_fla, save_results, selection_lists  # noqa: E402
from timing import Rounds  # noqa: E402
from nsa_codegen import nsa_attention  # noqa: E402
from nsa_codegen import ops  # noqa: E402
from nsa_codegen import reference as ref  # noqa: E402


def fwd_bwd(fn, inputs, do):
    """A closure running fn(*inputs) and the gradients of every input that requires grad."""
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def run():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, leaves, do)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--skip-dense-above", type=int, default=65536)
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
    from nsa_codegen.cache import precompile
    from nsa_codegen.lowering import arch_of_capability, lower_to_plan
    arch = arch_of_capability(*torch.cuda.get_device_capability())
    keys = list(dict.fromkeys(c.key for s in (fla_spec, paper, win_only) for c in lower_to_plan(s, arch).all_calls))
    for key, err, _ in (r for r in precompile(keys) if r[1]):
        print(f"compile failed: {key}: {err[:300]}")
    rows = []
    rounds = Rounds(args.rounds, args.iters)

    def record(case, T, fn):
        rounds.add(case, fn, T=T)

    def rnd(*shape, dim=None):
        return torch.randn(*shape, device=dev, dtype=dt).requires_grad_()

    for T in args.T:
        torch.manual_seed(T)
        q, k, v = rnd(1, T, HQ, D), rnd(1, T, H, D), rnd(1, T, H, D)
        g = [torch.rand(1, T, HQ, device=dev, dtype=dt).requires_grad_() for _ in range(3)]
        do = torch.randn(1, T, HQ, D, device=dev, dtype=dt)
        if T <= args.skip_dense_above:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qh = q.detach().transpose(1, 2).requires_grad_()
            kx = k.detach().transpose(1, 2).repeat_interleave(HQ // H, 1).requires_grad_()
            vx = v.detach().transpose(1, 2).repeat_interleave(HQ // H, 1).requires_grad_()
            doh = do.transpose(1, 2)
            for name, backend in (("dense_cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("dense_flash", SDPBackend.FLASH_ATTENTION)):
                def sdpa(a, b, c, backend=backend):
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)
                record(name, T, fwd_bwd(sdpa, (qh, kx, vx), doh))
        n, bs = 16, 64
        idx = selection_lists(T, n, bs, seed=T)
        if has_fla:
            record("fla_full", T, fwd_bwd(lambda *a: parallel_nsa(*a, None, block_counts=n, block_size=bs),
                                          (q, k, v, g[0], g[1]), do))
            idx_l = idx.long().masked_fill(idx < 0, 0)
            cnt = (idx >= 0).sum(-1)
            record("fla_selection", T, fwd_bwd(
                lambda a, b, c: ParallelNSAFunction.apply(a, b, c, idx_l, cnt, bs, D ** -0.5, None), (q, k, v), do))
        record("ours_fla_cfg", T, fwd_bwd(lambda a, b, c, g0, g1: nsa_attention(a, b, c, g0, g1, None, fla_spec),
                                          (q, k, v, g[0], g[1]), do))
        record("ours_selection", T, fwd_bwd(lambda a, b, c: ops.selection_attention(a, b, c, idx, bs, -1.0),
                                            (q, k, v), do))
        w = 512
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            mask = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < w), None, None, T, T, device=dev)
            flex = torch.compile(flex_attention)
            qh = q.detach().transpose(1, 2).requires_grad_()
            kh = k.detach().transpose(1, 2).requires_grad_()
            vh = v.detach().transpose(1, 2).requires_grad_()
            record("flex_window512", T, fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=mask, enable_gqa=True),
                                                (qh, kh, vh), do.transpose(1, 2)))
        except Exception as e:
            print(f"flex attention unavailable: {e}")
        record("ours_window512", T, fwd_bwd(lambda a, b, c: ops.window_attention(a, b, c, w, -1.0), (q, k, v), do))
        qp, kp, vp = rnd(1, T, HQ, 192), rnd(1, T, H, 192), rnd(1, T, H, 128)
        record("ours_paper", T, fwd_bwd(lambda a, b, c, g0, g1, g2: nsa_attention(a, b, c, g0, g1, g2, paper),
                                        (qp, kp, vp, *g), do))
        for r in rounds.run():
            rows.append(r)
            print(f"T={T:6d} {r['case']:<18} " + (f"{r['ms']:9.3f} ms [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}]"
                                                  if r["ms"] else r["error"]), flush=True)
        q = k = v = qp = kp = vp = g = do = qh = kx = vx = doh = kh = vh = idx = None  # free this T's tensors
        torch.cuda.empty_cache()

    # Each backward kernel alone (the op, i.e. its dq + dk/dv launches), at the longest T.
    T = max(args.T)
    breakdown = []
    for label, spec in (("fla_cfg", fla_spec), ("paper", paper)):
        torch.manual_seed(1)
        q = torch.randn(1, T, HQ, spec.head_dim, device=dev, dtype=dt)
        k = torch.randn(1, T, H, spec.head_dim, device=dev, dtype=dt)
        v = torch.randn(1, T, H, spec.v_head_dim, device=dev, dtype=dt)
        do = torch.randn(1, T, HQ, spec.v_head_dim, device=dev, dtype=dt)
        c, s = spec.compression, spec.selection
        kc, vc = ref.compress(k, c.block, c.stride), ref.compress(v, c.block, c.stride)
        o_c, lse_c = ops.compression_attention(q, kc, vc, c.block, c.stride, 0, -1.0)
        idx, _ = ops.selection_topn(q, kc, lse_c, c.block, c.stride, 0, s.block, s.top_n, s.initial, s.local, -1.0)
        o_s, lse_s = ops.selection_attention(q, k, v, idx, s.block, -1.0)
        parts = [
            ("compression_bwd", lambda: ops.compression_attention_bwd(do, None, q, kc, vc, o_c, lse_c, c.block,
                                                                      c.stride, 0, -1.0)),
            ("selection_block_units", lambda: ops.selection_block_units(idx, T, s.block)),
            ("selection_bwd", lambda: ops.selection_attention_bwd(do, None, q, k, v, o_s, lse_s, idx, s.block, -1.0)),
        ]
        if spec.window:
            o_w, lse_w = ops.window_attention(q, k, v, spec.window.size, -1.0)
            parts.append(("window_bwd", lambda: ops.window_attention_bwd(do, None, q, k, v, o_w, lse_w,
                                                                         spec.window.size, -1.0)))
        gate = torch.rand(1, T, HQ, device=dev, dtype=dt)
        n_on = 3 if spec.window else 2
        pairs = [x for _ in range(n_on) for x in (o_c, gate)] + [None, None] * (3 - n_on)
        parts.append(("gate_combine_bwd", lambda: ops.gate_combine_bwd(do, *pairs, H)))
        for name, fn in parts:
            rounds.add(name, fn)
        for r in rounds.run():
            breakdown.append(dict(config=label, T=T, kernel=r["case"], ms=r["ms"], q1_ms=r.get("q1_ms"),
                                  q3_ms=r.get("q3_ms")))
            print(f"breakdown T={T} {label:<8} {r['case']:<22} {r['ms'] or float('nan'):8.3f} ms", flush=True)
        q = k = v = kc = vc = o_c = lse_c = idx = o_s = lse_s = do = pairs = None
        torch.cuda.empty_cache()

    save_results(args.out, "backward", f"Forward + backward benchmark, {gpu}",
                 f"B=1, HQ={HQ}, H={H}, D={D}, {args.dtype}; one forward + gradients of all inputs; median ms "
                 f"of {args.rounds} interleaved rounds x {args.iters} launches (CUDA events), [q1, q3]; speedup vs dense cuDNN.", args.dtype, args.T, rows, breakdown,
                 f"Backward ops alone at T={T} (dq + dk/dv launches of each branch):", ("op", "ms"),
                 measured="forward + backward (autograd.grad of all inputs)", rounds=args.rounds, iters=args.iters)


if __name__ == "__main__":
    main()
