"""The paper configuration end to end: nsa_attention against dense causal attention, with the
per-kernel breakdown, and with the selection forward run by each of its schedules.

    python benchmarks/bench_paper.py [--T 8192 32768 65536] [--dtype float16] [--backward] [--out DIR]
        [--configs NAME ...]

Spec: HQ=64, H=4 (G=16), Dk=192, Dv=128, compression l=32 d=16 (mean), selection l'=64 n=16
(1 forced initial + 2 local), window 512; B=1. Cases at each T, timed interleaved (--rounds rounds,
each running every case --iters times, every launch timed with CUDA events; median and
interquartile range over all launches):
  dense_cudnn_d128    causal SDPA, cuDNN backend, Dk=Dv=128, 64 heads (the issue's dense baseline)
  dense_cudnn_paper   the same with Dk=192, Dv=128 (the paper's shapes), where cuDNN takes them
  ours                nsa_attention with the resolved schedules (tuned record or default)
  ours[tile] / ours[token]   the same with the selection kernels (forward, and dq in the backward)
                      forced to the token tile / the per-token schedule; ours[tile8] with a token
                      tile of 8 tokens (selection forward); ours[ws4] / ours[ws4_mb1] / ours[ws8]
                      with the token tile on mma.sync, each warp skipping the blocks its token did not
                      choose (4 tokens, two or one program an SM; 8 tokens); ours[topn_ring] /
                      ours[topn_ring_sync] with the top-n's group sums in a ring (with / without
                      overlap), ours[topn_t512] / ours[topn_t512_ring] on 512 threads;
                      ours[topn_sync] with the top-n's earlier default (no async WGMMA overlap of the next chunk's score gemm), and
                      its kernel case k:selection_topn[topn_sync]; ours[cmp_overlap] with the compression
                      forward's next QK^T run (async WGMMA) under a tile's softmax, and
                      k:compression_fwd[cmp_overlap]; a configuration equal to the resolved
                      one is not repeated
  k:<kernel>[...]     each kernel of the plan alone, on the inputs the forward gave it
With --backward, fwd+bwd cases (o.backward(do), all inputs require grad): dense_cudnn_d128_fb,
ours_fb[...], and k:selection_bwd[...], k:compression_bwd[...], k:window_bwd[...]. The backward
configurations cmp_smem / cmp_regs / cmp_async / cmp_async_s8 (compression dk/dv: the earlier smem
schedule; registers without async WGMMA; async with 4 / 8 token splits), win_async (window dk/dv,
async WGMMA) and sel_async / sel_async_s3 / sel_async_s4 (selection dk/dv, async WGMMA with a 2-, 3-
or 4-deep ring) add ours_fb[...] and their kernel's case only.
Before timing, every configuration is checked against nsa_codegen.reference: the forward at T=4096
and (--backward) the dq, dk, dv of the selection branch at T=2048 (fp32, on the block lists the
kernels chose), of the compression branch at T=4096 and of the window branch at T=2048. A
configuration that fails its check is not timed. --lists-file adds the selection kernels on a trained
model's block lists (k:selection_fwd[trained-L<i>] and [<config>/trained-L<i>] per selection forward
configuration, k:selection_bwd[trained-L<i>]; made by
trained_selections.py) and, in the md, the step estimated with them. Writes
<out>/<date>-<gpu>-paper.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_forward import run_info  # noqa: E402
from timing import say, stats, timed_rounds  # noqa: E402
from nsa_codegen import NSASpec, nsa_attention, ops, workloads  # noqa: E402
from nsa_codegen import reference as ref  # noqa: E402
from nsa_codegen.cache import get_kernel, kernel_with_knobs, use_kernel  # noqa: E402
from nsa_codegen.lowering import arch_of_capability, lower_to_plan  # noqa: E402

HQ, H, DK, DV = 64, 4, 192, 128
# Schedule configurations beside the resolved one: knobs per kernel kind.
CONFIGS = {"tile": {"selection_fwd": {"tile_tokens": 0}, "selection_bwd_dq": {"tile_tokens": 0}},
           "token": {"selection_fwd": {"tile_tokens": 1}, "selection_bwd_dq": {"tile_tokens": 1}},
           # a token tile of 8 tokens x 16 heads (128 rows, two consumer warpgroups): fewer K/V bytes
           # per token where neighbours share blocks (U8 / 8 < U4 / 4), more masked MMA work
           "tile8": {"selection_fwd": {"tile_tokens": 8, "threads": 256}},
           # the token tile on mma.sync, one warp per token (16 rows): a warp skips the union blocks its
           # token did not choose, so MMA work stays that of the token's own n blocks (no masked rows)
           # while the tile's K/V bytes stay those of the union; 4 tokens (two programs an SM, 128
           # registers, some spills; the dq tile too), 4 tokens one program an SM, 8 tokens
           "ws4": {"selection_fwd": {"tile_tokens": 4, "threads": 128, "warp_skip": True},
                   "selection_bwd_dq": {"tile_tokens": 4, "threads": 128, "warp_skip": True}},
           "ws4_mb1": {"selection_fwd": {"tile_tokens": 4, "threads": 128, "warp_skip": True, "min_blocks_per_sm": 1}},
           "ws8": {"selection_fwd": {"tile_tokens": 8, "threads": 256, "warp_skip": True}},
           # top-n without its default's overlap (chunk kc+1's score gemm as an async WGMMA while chunk
           # kc is scored)
           "topn_sync": {"selection_topn": {"overlap": False}},
           # top-n with its group-summed probabilities in a ring of 2 * block_N columns (no halo copy,
           # 2 instead of 4 barriers a chunk in the template; TileLang adds one on interior chunks)
           "topn_ring": {"selection_topn": {"ring_halo": True}},
           "topn_ring_sync": {"selection_topn": {"ring_halo": True, "overlap": False}},
           # top-n on four consumer warpgroups (512 threads, 96 registers) without overlap, with / without the ring
           "topn_t512": {"selection_topn": {"threads": 512, "block_M": 256, "overlap": False}},
           "topn_t512_ring": {"selection_topn": {"threads": 512, "block_M": 256, "overlap": False, "ring_halo": True}},
           # compression forward: tile kt's QK^T as an async WGMMA under tile kt-1's softmax (64-key tiles)
           "cmp_overlap": {"compression_fwd": {"overlap": True, "block_N": 64, "num_stages": 2}},
           # compression dk/dv (the default: P^T / dS^T as register operands, 128 rows, async WGMMA, 16
           # token splits): the earlier default (smem P^T / dS^T, 64 rows, 4 splits), registers without
           # async WGMMA, async with 4 / 8 splits (tests/test_ops_backward.py CMP_DKDV_SCHEDULES)
           "cmp_smem": {"compression_bwd_dkdv": {"kv_block_N": 64, "kv_block_M": 128, "kv_threads": 256,
                                                 "kv_num_stages": 1, "kv_regs": False, "kv_async": False,
                                                 "kv_splits": 4}},
           "cmp_regs": {"compression_bwd_dkdv": {"kv_regs": True, "kv_async": False, "kv_splits": 4}},
           "cmp_async": {"compression_bwd_dkdv": {"kv_splits": 4}},
           "cmp_async_s8": {"compression_bwd_dkdv": {"kv_splits": 8}},
           "win_async": {"window_bwd_dkdv": {"async_mma": True}},
           # selection dk/dv: a TMA producer and async WGMMA, one token a step (SEL_DKDV_SCHEDULES), with
           # the auto (2), a 3- and a 4-deep ring; every knob named: the tuned cp.async schedule's
           # chunk_rows / threads do not apply
           **{f"sel_async{suffix}": {"selection_bwd_dkdv": {"async_mma": True, "threads": 0, "num_stages": stages,
                                                            "chunk_rows": 0, "chunk_group": 4, "min_blocks_per_sm": 0}}
              for suffix, stages in (("", 0), ("_s3", 3), ("_s4", 4))}}
CONFIG_KINDS = sorted({kind for per_kind in CONFIGS.values() for kind in per_kind})


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


class Config:
    """One schedule configuration: per kind, the kernel ops get (the resolved one where not forced)."""

    def __init__(self, name, kernels, resolved=None):
        self.name, self.kernels = name, kernels  # {problem: CompiledKernel}
        self.resolved = resolved or kernels

    @contextlib.contextmanager
    def use(self, backward=True):
        with contextlib.ExitStack() as stack:
            for problem, kern in self.kernels.items():
                if backward or "_bwd" not in problem.kind:
                    stack.enter_context(use_kernel(problem, kern))
            yield

    def schedules(self):
        return {p.kind: str(k.key) for p, k in self.kernels.items()}

    def changes(self, prefix):
        """Whether this configuration runs a kernel other than the resolved one for a kind starting
        with prefix (the resolved configuration: always); other cases would time the same kernels."""
        return self.name == "resolved" or any(p.kind.startswith(prefix) and k is not self.resolved[p]
                                              for p, k in self.kernels.items())


def configurations(spec, backward, names=None):
    """[Config]: the resolved schedules first, then each of CONFIGS (or of `names`) that differs from
    them."""
    plan = lower_to_plan(spec, arch_of_capability(*torch.cuda.get_device_capability()))
    calls = plan.calls + (plan.backward if backward else ())
    problems = {c.kind: c.key for c in calls if c.kind in CONFIG_KINDS}
    resolved = {p: get_kernel(p) for p in problems.values()}
    out = [Config("resolved", resolved)]
    for name, per_kind in CONFIGS.items():
        if names is not None and name not in names:
            continue
        kernels = {}
        for p, k in resolved.items():
            try:
                kernels[p] = kernel_with_knobs(p, per_kind.get(p.kind, {}))
            except Exception as e:  # a schedule the template rejects here
                say(f"{name}: {p.kind}: {type(e).__name__}: {str(e)[:200]}")
                kernels = None
                break
        if kernels and any(kernels[p] is not resolved[p] for p in resolved):
            out.append(Config(name, kernels, resolved))
    for c in out:
        say(f"config {c.name}: {c.schedules()}")
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(spec, dt, configs, backward):
    """Each configuration's forward at T=4096 against the fp32 reference on the lists it chose and,
    with backward, the selection branch's gradients at T=2048."""
    q, k, v, g = inputs(4096, dt, seed=7)
    out = {}
    for cfg in configs:
        with cfg.use(backward=False):
            o, idx = nsa_attention(q, k, v, *g, spec, return_indices=True)
        want = ref.nsa_reference(q.float(), k.float(), v.float(), *(x.float() for x in g), _fp32(spec),
                                 block_indices=idx)
        low = ref.nsa_reference(q, k, v, *g, spec, block_indices=idx)
        res = dict(rel_err=rel(o, want), ref_own_err=rel(low, want), nan=bool(torch.isnan(o).any()))
        if backward:
            for part in (_check_selection_grads, _check_compression_grads, _check_window_grads):
                r = part(spec, dt, cfg)
                res["nan"] = res["nan"] or r.pop("nan")
                res.update(r)
        out[cfg.name] = res
        say(f"check {cfg.name}: {res}")
    return out


def _grad_errs(prefix, cfg, xs, kern, oracle, do):
    """Relative errors of kern's gradients (under cfg) against the fp32 oracle's, and the oracle's own
    in the dtype: {prefix + "dq_rel_err": .., ..., "nan": ..}."""
    def grads(fn, leaves):
        leaves = [x.detach().requires_grad_() for x in leaves]
        o, _ = fn(*leaves)
        return torch.autograd.grad((o.float() * do.float()).sum(), leaves)
    with cfg.use():
        got = grads(kern, xs)
    hi, lo = grads(oracle, [x.float() for x in xs]), grads(oracle, xs)
    res = {"nan": False}
    for name, a, h, l in zip(("dq", "dk", "dv"), got, hi, lo):
        res[f"{prefix}{name}_rel_err"], res[f"{prefix}{name}_ref_own_err"] = rel(a, h), rel(l, h)
        res["nan"] = res["nan"] or bool(torch.isnan(a).any())
    return res


def _check_selection_grads(spec, dt, cfg):
    """The selection branch's q, k, v gradients at T=2048, on the lists the forward chose."""
    s = spec.selection
    q, k, v, g = inputs(2048, dt, seed=8)
    with cfg.use(backward=False):
        _, idx = nsa_attention(q, k, v, *g, spec, return_indices=True)
    do = torch.randn(1, 2048, HQ, DV, device="cuda").to(dt)
    return _grad_errs("", cfg, (q, k, v), lambda *x: ops.selection_attention(*x, idx, s.block, -1.0),
                      lambda *x: ref.selection_attention(*x, idx, s.block), do)


def _check_compression_grads(spec, dt, cfg):
    """The compression branch's q, k_cmp, v_cmp gradients at T=4096 (its 128-row tiles then have
    interior and edge steps)."""
    c = spec.compression
    q, k, v, _ = inputs(4096, dt, seed=9)
    kc, vc = ref.compress(k, c.block, c.stride, c.first_block), ref.compress(v, c.block, c.stride, c.first_block)
    do = torch.randn(1, 4096, HQ, DV, device="cuda").to(dt)
    return _grad_errs("cmp_", cfg, (q, kc, vc),
                      lambda *x: ops.compression_attention(*x, c.block, c.stride, c.first_block, -1.0),
                      lambda *x: ref.compression_attention(*x, c.block, c.stride, c.first_block), do)


def _check_window_grads(spec, dt, cfg):
    """The window branch's q, k, v gradients at T=2048."""
    w = spec.window.size
    q, k, v, _ = inputs(2048, dt, seed=10)
    do = torch.randn(1, 2048, HQ, DV, device="cuda").to(dt)
    return _grad_errs("win_", cfg, (q, k, v), lambda *x: ops.window_attention(*x, w, -1.0),
                      lambda *x: ref.window_attention(*x, w), do)


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


def dense_fb(q, k, v, do, dk):
    """Dense causal forward + backward, the GQA heads expanded once outside the timing (as leaves: the
    sum of their gradients back onto the KV heads is left out, in the dense case's favour)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = HQ // H
    qh = q[..., :dk].transpose(1, 2).detach().requires_grad_()
    kh = k[..., :dk].transpose(1, 2).repeat_interleave(G, 1).detach().requires_grad_()
    vh = v.transpose(1, 2).repeat_interleave(G, 1).detach().requires_grad_()
    doh = do.transpose(1, 2)

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True).backward(doh)
    return run


def kernel_cases(spec, q, k, v, g, configs, backward, trained=()):
    """One case per kernel of the plan (the selection ones per configuration), each on the tensors
    the forward gave it; with backward, per branch its backward op on random cotangents. trained:
    [1, T, H, n] block lists of a trained model, one per layer: the resolved selection forward (and
    backward) on each, as k:selection_fwd[trained-L<i>] / k:selection_bwd[trained-L<i>]."""
    c, s, w = spec.compression, spec.selection, spec.window
    kc, vc = ref.compress(k, c.block, c.stride, c.first_block), ref.compress(v, c.block, c.stride, c.first_block)
    o_c, lse_c = ops.compression_attention(q, kc, vc, c.block, c.stride, c.first_block, -1.0)
    idx, _ = ops.selection_topn(q, kc, lse_c, c.block, c.stride, c.first_block, s.block, s.top_n, s.initial,
                                s.local, -1.0)
    o_s, lse_s = ops.selection_attention(q, k, v, idx, s.block, -1.0)
    o_w, lse_w = ops.window_attention(q, k, v, w.size, -1.0)
    cases = {
        "k:window_fwd": lambda: ops.window_attention(q, k, v, w.size, -1.0),
        "k:gate_combine": lambda: ops.gate_combine(o_c, g[0], o_s, g[1], o_w, g[2], H),
    }
    for cfg in configs:
        if cfg.changes("compression_fwd"):
            def run_cmp_fwd(cfg=cfg):
                with cfg.use(backward=False):
                    return ops.compression_attention(q, kc, vc, c.block, c.stride, c.first_block, -1.0)
            cases["k:compression_fwd" + ("" if cfg.name == "resolved" else f"[{cfg.name}]")] = run_cmp_fwd
        if cfg.changes("selection_topn"):
            def run_topn(cfg=cfg):
                with cfg.use(backward=False):
                    return ops.selection_topn(q, kc, lse_c, c.block, c.stride, c.first_block, s.block, s.top_n,
                                              s.initial, s.local, -1.0)
            cases["k:selection_topn" + ("" if cfg.name == "resolved" else f"[{cfg.name}]")] = run_topn
    # the kernels' own lists (named by the configuration), then each trained layer's
    # (trained-L<i>, prefixed by the configuration where it is not the resolved one)
    lists = [(None, idx)] + [(f"trained-L{i}", x) for i, x in enumerate(trained)]
    for cfg in configs:
        if not cfg.changes("selection_fwd"):
            continue
        for name, x in lists:
            def run(cfg=cfg, x=x):
                with cfg.use(backward=False):
                    return ops.selection_attention(q, k, v, x, s.block, -1.0)
            tag = cfg.name if name is None else name if cfg.name == "resolved" else f"{cfg.name}/{name}"
            cases[f"k:selection_fwd[{tag}]"] = run
    if backward:
        do = torch.randn_like(o_s)
        dlse = torch.randn_like(lse_s)
        for i, lists in enumerate(trained):
            o_t, lse_t = ops.selection_attention(q, k, v, lists, s.block, -1.0)
            cases[f"k:selection_bwd[trained-L{i}]"] = (
                lambda x=lists, o_t=o_t, lse_t=lse_t: ops.selection_attention_bwd(do, dlse, q, k, v, o_t, lse_t, x,
                                                                                 s.block, -1.0))
        for cfg in configs:
            def run_win(cfg=cfg):
                with cfg.use():
                    return ops.window_attention_bwd(do, dlse, q, k, v, o_w, lse_w, w.size, -1.0)
            if cfg.changes("window_bwd"):
                cases["k:window_bwd" + ("" if cfg.name == "resolved" else f"[{cfg.name}]")] = run_win

            def run_cmp(cfg=cfg):
                with cfg.use():
                    return ops.compression_attention_bwd(do, dlse, q, kc, vc, o_c, lse_c, c.block, c.stride,
                                                         c.first_block, -1.0)
            if cfg.changes("compression_bwd"):
                cases["k:compression_bwd" + ("" if cfg.name == "resolved" else f"[{cfg.name}]")] = run_cmp

            def run_bwd(cfg=cfg):
                with cfg.use():
                    return ops.selection_attention_bwd(do, dlse, q, k, v, o_s, lse_s, idx, s.block, -1.0)
            if cfg.changes("selection_bwd"):
                cases[f"k:selection_bwd[{cfg.name}]"] = run_bwd
    return cases, idx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel breakdown")
    ap.add_argument("--configs", nargs="*", default=None, choices=sorted(CONFIGS),
                    help="the configurations besides the resolved one (default: all)")
    ap.add_argument("--lists-file", default=None,
                    help="a trained model's block lists (trained_selections.py -lists.pt): the selection kernels "
                         "also run on them at the T they were made for, and the md estimates the whole step there")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    trained = {}
    if args.lists_file:
        from bench_selection import load_trained
        trained = load_trained(args.lists_file)
    spec = paper_spec(args.dtype)
    configs = configurations(spec, args.backward, args.configs)
    checks = check(spec, dt, configs, args.backward)

    def fails(c):
        errs = [v for kk, v in c.items() if kk.endswith("rel_err")]
        return c["nan"] or not all(e < 1e-2 for e in errs)
    for cfg in list(configs):  # a configuration that computes something else is not timed
        if fails(checks[cfg.name]):
            say(f"not timed: {cfg.name} fails its check {checks[cfg.name]}")
            configs.remove(cfg)
    rows = []
    for T in args.T:
        q, k, v, g = inputs(T, dt, seed=T)
        cases = {"dense_cudnn_d128": dense(q, k, v, 128), "dense_cudnn_paper": dense(q, k, v, DK)}
        for cfg in configs:
            if not cfg.changes("selection_fwd"):
                continue
            def run(cfg=cfg):
                with cfg.use(backward=False):
                    return nsa_attention(q, k, v, *g, spec)
            cases["ours" if cfg.name == "resolved" else f"ours[{cfg.name}]"] = run
        if not args.no_kernels:
            lists = [x.to("cuda", torch.int32).contiguous() for x in trained.get(T, ())]
            kc, idx = kernel_cases(spec, q, k, v, g, configs, args.backward, lists)
            cases.update(kc)
            u4, u64 = workloads.union_size(idx, 4), workloads.union_size(idx, 64)
        else:
            u4 = u64 = None
        if args.backward:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            gg = [x.detach().requires_grad_() for x in g]
            do = torch.randn(1, T, HQ, DV, device="cuda", dtype=dt)
            for cfg in configs:
                def run_fb(cfg=cfg):
                    with cfg.use():
                        nsa_attention(qg, kg, vg, *gg, spec).backward(do)
                cases["ours_fb" if cfg.name == "resolved" else f"ours_fb[{cfg.name}]"] = run_fb
            cases["dense_cudnn_d128_fb"] = dense_fb(q, k, v, do, 128)
        for name, fn in list(cases.items()):  # drop cases that cannot run here (cuDNN shapes, memory)
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as e:
                say(f"T={T} {name}: not timed: {type(e).__name__}: {str(e)[:200]}")
                cases.pop(name)
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
    schedules.update({f"config {c.name}": c.schedules() for c in configs})
    save(args, rows, checks, run_info(schedules))


def trained_estimates(rows) -> list[str]:
    """md lines: per T with trained lists, `ours` (and `ours_fb`) with the selection kernels' time on
    the kernels' own lists replaced by their median time over the trained layers' lists. A sum of
    separately timed kernels, labelled as an estimate: the top-n still ranks random inputs."""
    out = []
    for T in sorted({r["T"] for r in rows}):
        ms = {r["case"]: r["median_ms"] for r in rows if r["T"] == T}
        fwd = sorted(v for c, v in ms.items() if c.startswith("k:selection_fwd[trained-"))
        if not fwd or "ours" not in ms or "k:selection_fwd[resolved]" not in ms:
            continue
        med = lambda xs: xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2  # noqa: E731
        est = ms["ours"] - ms["k:selection_fwd[resolved]"] + med(fwd)
        line = (f"- T={T}: forward {est:.2f} ms (ours {ms['ours']:.2f} - selection on own lists "
                f"{ms['k:selection_fwd[resolved]']:.2f} + median over layers {med(fwd):.2f})")
        bwd = sorted(v for c, v in ms.items() if c.startswith("k:selection_bwd[trained-"))
        if bwd and "ours_fb" in ms and "k:selection_bwd[resolved]" in ms:
            est_fb = est - ms["ours"] + ms["ours_fb"] - ms["k:selection_bwd[resolved]"] + med(bwd)
            line += (f"; forward + backward {est_fb:.2f} ms (also selection backward "
                     f"{ms['k:selection_bwd[resolved]']:.2f} -> {med(bwd):.2f})")
            if "dense_cudnn_d128_fb" in ms:
                line += f", {ms['dense_cudnn_d128_fb'] / est_fb:.2f}x dense"
        if "dense_cudnn_d128" in ms:
            line += f"; forward {ms['dense_cudnn_d128'] / est:.2f}x dense"
        out.append(line)
    if out:
        out = ["", "Estimated on the trained model's lists (a sum of the kernels timed above, not one timed "
                   "step; the top-n still ranks the random inputs):", ""] + out
    return out


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
        fb = "_fb" in r["case"] or r["case"].startswith("k:") and "_bwd" in r["case"]
        d = base.get("dense_cudnn_d128_fb" if fb else "dense_cudnn_d128")
        vs = f"{d / r['median_ms']:.2f}x" if d else ""
        u = (f"{r['union4']:.1f} | {r['union64']:.1f}" if r["union4"] is not None else " | ")
        lines.append(f"| {r['T']} | {r['case']} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | {vs} | {u} |")
    lines += trained_estimates(rows)
    lines += ["", "Checks against the fp32 reference on the kernels' own block lists (forward at T=4096; "
              "selection gradients at T=2048 with --backward): relative error, and in parentheses the "
              "reference's own in the dtype:", "",
              "| configuration | checks |", "|---|---|"]
    for n, c in checks.items():
        errs = ", ".join(f"{kk[:-8] or 'o'} {c[kk]:.2e} ({c[kk[:-7] + 'ref_own_err']:.2e})"
                         for kk in c if kk.endswith("rel_err"))
        lines.append(f"| {n} | {errs}{' NaN' if c['nan'] else ''} |")
    lines += ["", f"Schedules: `{json.dumps(info['schedules'])}`"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
