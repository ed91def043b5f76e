"""GPU check of NSA decode (nsa_codegen.decode + templates/decode_attention.py).

    PYTHONPATH=<repo> python benchmarks/bench_decode.py [--quick] [--no-bench] [--jobs N] [--sweep |
        --variants JSON [--context L] [--batches 1,16,64]]

1. Correctness: prefill a cache with random K/V (ragged lengths, none a multiple of any block),
   then decode steps (append q_len tokens, nsa_decode) with q_len 1 and 4 on the paper config
   (fp16) and q_len 2 on a bf16 / G=8 / Dk=192 / first_block=1 / l'=32 / separate-window config.
   Every step's output is compared with reference.nsa_reference on the whole final sequence at
   those positions; the selected blocks with the reference's (sets equal, or differing only
   between blocks whose reference scores tie within 1e-2 of the largest score; the output is
   then compared with the reference run on the kernel's selection); the compressed cache with
   reference.compress recomputed from scratch.  Outputs and workspaces are NaN-poisoned.
2. Timing (paper config, fp16, q_len 1): one decode step at 8k/32k/64k/128k context, B = 1, 16,
   64, against torch SDPA (flash) dense decode over the same cache; CUDA-graph replay when
   capture works (eager otherwise); NSA: the median of 3 means of 50 replays.  GB/s counts the
   bytes NSA must read (nsa_decode_bytes).
3. --sweep (instead of 1 and 2): at 64k context, B = 1, 16, 64, the step time over a grid of split
   counts (num_splits), the kernels with programmatic dependent launch on and off, and the per-kernel
   breakdown of the heuristic's choice and the best; what `decode._splits` is fitted to.
4. --variants JSON (instead of 1 and 2): at 64k context (--context), B = 1, 16, 64 (--batches), the
   step time of variants ({name: {part: {knob: value}}, "num_splits": [cmp, sel, win], "num_parts":
   n}, over the resolved schedules), median of 5 interleaved rounds, each output compared with the
   resolved schedules' output.
Prints one line per check; exits 1 on any failure.
"""
import argparse
import os
import sys
import time
import traceback

import torch

from nsa_codegen import reference
from nsa_codegen.cache import precompile
from nsa_codegen.decode import nsa_decode, nsa_decode_bytes
from nsa_codegen.kv_cache import NSAKVCache
from nsa_codegen.lowering import lower_decode
from nsa_codegen.spec import NSASpec

FAILS = []
DEVICE = "cuda"
TOL = 1e-2
HBM_TBPS = 3.35

PAPER = NSASpec(heads=64, kv_heads=4, head_dim=128, dtype="float16",
                compression=dict(block=32, stride=16, pool="mean"),
                selection=dict(block=64, top_n=16, initial=1, local=2), window=dict(size=512))
ODD = NSASpec(heads=16, kv_heads=2, head_dim=192, v_head_dim=128, dtype="bfloat16",
              compression=dict(block=32, stride=16, pool="mean", first_block=1),
              selection=dict(block=32, top_n=8, initial=1, local=2), window=dict(size=128))


def check(name, x, ref, tol=TOL):
    x, ref = x.double(), ref.double()
    finite = bool(torch.isfinite(x).all())
    rel = ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item() if finite else float("nan")
    ok = finite and rel < tol
    print(f"{'PASS' if ok else 'FAIL'}  {name}: rel err {rel:.3e}{'' if finite else ' (non-finite)'}", flush=True)
    if not ok:
        FAILS.append(name)
    return ok


def note(name, ok, msg=""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + msg if msg else ''}", flush=True)
    if not ok:
        FAILS.append(name)


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------
def run_correctness(tag, spec, q_len, lens0, steps, separate_window, seed=0):
    dev = DEVICE
    torch.manual_seed(seed)
    dt = getattr(torch, spec.dtype)
    B = len(lens0)
    HQ, H, Dk, Dv = spec.heads, spec.kv_heads, spec.head_dim, spec.v_head_dim
    final = [L + steps * q_len for L in lens0]
    Tm = max(final)
    q = torch.randn(B, Tm, HQ, Dk, device=dev, dtype=dt)
    k = torch.randn(B, Tm, H, Dk, device=dev, dtype=dt)
    v = torch.randn(B, Tm, H, Dv, device=dev, dtype=dt)
    kw = torch.randn(B, Tm, H, Dk, device=dev, dtype=dt) if separate_window else None
    vw = torch.randn(B, Tm, H, Dv, device=dev, dtype=dt) if separate_window else None
    g = torch.sigmoid(torch.randn(B, Tm, 3, HQ, device=dev)).to(dt)
    cache = NSAKVCache(spec, B, Tm + 3, device=dev, dtype=dt, separate_window=separate_window)
    T0 = max(lens0)
    cache.prefill(k[:, :T0], v[:, :T0], kw[:, :T0] if kw is not None else None,
                  vw[:, :T0] if vw is not None else None, seqlens=lens0)
    outs, idxs = [], []
    lens = list(lens0)
    bi = torch.arange(B, device=dev)[:, None]
    for step in range(steps):
        pos = torch.tensor(lens, device=dev)[:, None] + torch.arange(q_len, device=dev)[None]
        sel = lambda x: x[bi, pos] if x is not None else None  # noqa: E731
        cache.append(sel(k), sel(v), sel(kw), sel(vw))
        lens = [L + q_len for L in lens]
        gg = sel(g)
        o, idx = nsa_decode(sel(q), cache, gg[:, :, 0], gg[:, :, 1], gg[:, :, 2], return_indices=True)
        outs.append(o)
        idxs.append(idx)
    if dev == "cuda":
        torch.cuda.synchronize()
    note(f"{tag} lengths", cache.lengths == final and cache.cache_seqlens.tolist() == final,
         f"{cache.cache_seqlens.tolist()} vs {final}")
    # compressed cache vs compress() from scratch
    c = spec.compression
    kc_err, kc_ref = [], []
    for b in range(B):
        rk = reference.compress(k[b:b + 1, :final[b]], c.block, c.stride, c.first_block)[0]
        rv = reference.compress(v[b:b + 1, :final[b]], c.block, c.stride, c.first_block)[0]
        N = rk.shape[0]
        if cache.num_cmp_host[b] != N or int(cache.num_cmp[b]) != N:
            note(f"{tag} num_cmp[{b}]", False, f"{cache.num_cmp_host[b]} / {int(cache.num_cmp[b])} vs {N}")
        kc_err += [cache.k_cmp[b, :N].flatten(), cache.v_cmp[b, :N].flatten()]
        kc_ref += [rk.flatten(), rv.flatten()]
    check(f"{tag} compressed cache vs reference.compress", torch.cat(kc_err), torch.cat(kc_ref), tol=1e-3)
    # outputs / indices vs the reference on each whole sequence
    o_all, r_all, ties_total = [], [], 0
    idx_ok = True
    for b in range(B):
        L = final[b]
        args = (q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L], g[b:b + 1, :L, 0], g[b:b + 1, :L, 1],
                g[b:b + 1, :L, 2], spec)
        kwin = dict(k_win=kw[b:b + 1, :L] if kw is not None else None, v_win=vw[b:b + 1, :L] if vw is not None else None)
        ref_o, ref_idx = reference.nsa_reference(*args, return_indices=True, **kwin)
        positions = [lens0[b] + s * q_len + i for s in range(steps) for i in range(q_len)]
        kidx = torch.cat([idxs[s][b] for s in range(steps)])            # [P, H, n]
        kout = torch.cat([outs[s][b] for s in range(steps)])            # [P, HQ, Dv]
        P = torch.tensor(positions, device=dev)
        ridx = ref_idx[0, P]
        k_cmp_ref = reference.compress(k[b:b + 1, :L], c.block, c.stride, c.first_block)
        v_cmp_ref = reference.compress(v[b:b + 1, :L], c.block, c.stride, c.first_block)
        keys = reference.block_keys(q[b:b + 1, positions[0]:positions[-1] + 1], k_cmp_ref, v_cmp_ref, spec, L,
                                    positions[0])[0]
        ok, ties, msg = reference.compare_block_indices(kidx, ridx, keys)
        ties_total += ties
        if not ok:
            idx_ok = False
            note(f"{tag} top-n indices entry {b} (L={L})", False, msg)
        if ties:
            sub = ref_idx.clone()
            sub[0, P] = kidx.to(sub.dtype)
            ref_o = reference.nsa_reference(*args, block_indices=sub, **kwin)
        o_all.append(kout)
        r_all.append(ref_o[0, P])
    if idx_ok:
        note(f"{tag} top-n indices", True, f"equal to the reference ({ties_total} (position, head) lists differ "
                                           f"only by near-tied blocks)")
    check(f"{tag} decode output vs nsa_reference (full sequence)", torch.cat(o_all), torch.cat(r_all))


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def random_paper_cache(B, capacity):
    """NSAKVCache of the paper config (fp16) for B entries, every raw and compressed K/V row random
    (lengths still 0: set_lengths picks the context)."""
    cache = NSAKVCache(PAPER, B, capacity, device="cuda", dtype=torch.float16)
    for t in (cache.kv_k, cache.kv_v, cache.k_cmp, cache.v_cmp):
        for i in range(t.shape[0]):
            t[i].normal_()
    return cache


def paper_step_inputs(B):
    """q [B, 1, HQ, D] and the three gates [B, 1, HQ] of one paper-config decode step (fp16)."""
    q = torch.randn(B, 1, PAPER.heads, PAPER.head_dim, device="cuda", dtype=torch.float16)
    return q, [torch.rand(B, 1, PAPER.heads, device="cuda", dtype=torch.float16) for _ in range(3)]


def capture_graph(fn):
    """A CUDA graph of fn(), captured after a warm-up call on a side stream (raises if capture fails)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    return gr


def profile_calls(fn, iters):
    """torch.profiler (CUDA activity) over `iters` calls of fn, after one call outside it."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof


def _time(fn, iters=50, graph=True):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    mode = "eager"
    run = fn
    if graph:
        try:
            gr = capture_graph(fn)
            gr.replay()
            torch.cuda.synchronize()
            run, mode = gr.replay, "graph"
        except Exception as e:  # fall back to eager launches
            print(f"      (CUDA graph capture failed: {type(e).__name__}: {e}; timing eager)")
            torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        run()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters, mode


def _breakdown(fn, iters=20):
    """Average device time per kernel of one call (torch.profiler)."""
    prof = profile_calls(fn, iters)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t and e.count:
            rows.append((e.key, t / iters, e.count / iters))
    rows.sort(key=lambda r: -r[1])
    print("        per call: " + "; ".join(f"{k[:40]} {t:.1f} us x{c:g}" for k, t, c in rows[:8]), flush=True)


def run_timing(contexts, batches):
    spec = PAPER
    Bm, cap = max(batches), max(contexts)
    big = random_paper_cache(Bm, cap)
    H, G, D = spec.kv_heads, spec.group, spec.head_dim
    print(f"timing: paper config fp16, q_len 1; HBM peak taken as {HBM_TBPS} TB/s", flush=True)
    for B in batches:
        c = big.narrow_batch(B)
        q, gs = paper_step_inputs(B)
        for L in contexts:
            try:
                c.set_lengths([L] * B)
                # median of 3 runs of 50 replays: B = 1 steps are ~20 us, where a run's clock
                # ramp alone moves the mean by a few percent
                runs = sorted(_time(lambda: nsa_decode(q, c, *gs)) for _ in range(3))
                t_nsa, mode = runs[1]
                qd = q.view(B, H, G, D)
                kd = c.k[:, :L].transpose(1, 2)
                vd = c.v[:, :L].transpose(1, 2)
                t_dense, mode_d = _time(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd),
                                        iters=20)
                nbytes = B * nsa_decode_bytes(spec, L)
                gbs = nbytes / (t_nsa * 1e-3) / 1e9
                print(f"      ctx {L // 1024:>4}k B {B:>3}: nsa {t_nsa:8.4f} ms ({mode})  dense SDPA {t_dense:8.4f} ms "
                      f"({mode_d})  speedup {t_dense / t_nsa:6.2f}x  nsa {gbs:7.0f} GB/s "
                      f"({100 * gbs / (HBM_TBPS * 1e3):4.1f}% of HBM) over {nbytes / 1e6:.1f} MB", flush=True)
            except Exception:
                traceback.print_exc()
                note(f"timing ctx {L} B {B}", False, "exception")
            if L == 65536 and B in (1, 16):
                try:
                    _breakdown(lambda: nsa_decode(q, c, *gs))
                except Exception as e:
                    print(f"      (profiler breakdown failed: {type(e).__name__}: {e})")
    del big
    torch.cuda.empty_cache()


def _variant_keys(updates):
    """part -> KernelKey of the paper config's decode kernels (q_len 1) with updates[part] (a schedule
    dict) applied over the resolved schedule; `updates` may also be one dict for every part."""
    from nsa_codegen.cache import get_kernel
    out = {}
    for c in lower_decode(PAPER, "sm90", 1, False, 128 * 1024):
        part = c.kind[len("decode_"):]
        up = updates.get(part, {}) if all(k in ("cmp", "topn", "sparse", "combine") for k in updates) else updates
        base = get_kernel(c.key).key
        out[part] = base.with_schedule({**dict(base.schedule), **up}) if up else base
    return out


def _kernels_with(updates):
    """part -> CompiledKernel for _variant_keys(updates) (compiled here unless in the disk cache)."""
    from nsa_codegen.cache import CompiledKernel, tilelang_cache_dir, get_kernel, versioned_dir
    from nsa_codegen.codegen import compile_kernel
    out = {}
    for part, key in _variant_keys(updates).items():
        resolved = get_kernel(key.problem)
        if key.schedule == resolved.key.schedule:
            out[part] = resolved
            continue
        with tilelang_cache_dir(versioned_dir() / "tilelang"):
            out[part] = CompiledKernel(key, compile_kernel(key), "variant", 0.0)
    return out


def run_variants(variants, L=65536, batches=(1, 16, 64), rounds=5):
    """Step time of schedule variants (name -> {part: schedule update}, and optionally "num_splits":
    [cmp, sel, win] and "num_parts": n, capped at B) against the resolved schedules, each variant's output compared with the
    baseline's: reported as the same or not (split and thread counts change the summation order),
    a failure past the relative tolerance."""
    from nsa_codegen import decode
    from nsa_codegen.cache import precompile_scheduled
    splits = {name: v.pop("num_splits", None) for name, v in variants.items()}
    nparts = {name: v.pop("num_parts", None) for name, v in variants.items()}
    keys = [k for v in variants.values() for k in _variant_keys(v).values()]
    t0 = time.time()
    errs = [e for e in precompile_scheduled(keys) if e]
    print(f"variants: compiled {len(set(keys))} kernels in {time.time() - t0:.0f} s; errors: {errs}", flush=True)
    kerns = {name: _kernels_with(v) for name, v in variants.items()}
    big = random_paper_cache(max(batches), 128 * 1024)
    real = decode._decode_kernels
    print(f"variants: paper config fp16, q_len 1, context {L}", flush=True)
    try:
        for B in batches:
            c = big.narrow_batch(B)
            c.set_lengths([L] * B)
            q, gs = paper_step_inputs(B)
            base = nsa_decode(q, c, *gs).float()
            times, same = {name: [] for name in kerns}, {}
            for _ in range(rounds):     # interleaved rounds: a clock or thermal drift hits every variant
                for name, ks in kerns.items():
                    decode._decode_kernels = lambda *a, **k: ks
                    ns, npt = splits[name], nparts[name] and min(nparts[name], B)
                    if name not in same:
                        o = nsa_decode(q, c, *gs, num_splits=ns, num_parts=npt).float()
                        same[name] = torch.equal(o, base)
                        err = ((o - base).norm() / base.norm()).item()
                        if not err < TOL:   # NaN fails too
                            note(f"variant {name} B {B} output", False, f"relative difference {err:.2e}")
                    times[name].append(_time(lambda: nsa_decode(q, c, *gs, num_splits=ns, num_parts=npt))[0])
                    decode._decode_kernels = real
            for name, ts in times.items():
                ts = sorted(ts)
                print(f"  B {B:>3} {name:<24} median {ts[len(ts) // 2] * 1e3:7.1f} us  min {ts[0] * 1e3:7.1f}  "
                      f"({rounds} rounds of 50 graph replays)  "
                      f"{'same output' if same[name] else 'output differs by rounding'}",
                      flush=True)
    finally:
        decode._decode_kernels = real
    del big
    torch.cuda.empty_cache()


def run_sweep(L=65536, batches=(1, 16, 64)):
    from nsa_codegen import decode
    spec, H = PAPER, PAPER.kv_heads
    big = random_paper_cache(max(batches), 128 * 1024)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    no_pdl = _kernels_with({"pdl": False})
    real = decode._decode_kernels
    print(f"sweep: paper config fp16, q_len 1, context {L}; {sms} SMs", flush=True)
    for B in batches:
        c = big.narrow_batch(B)
        c.set_lengths([L] * B)
        q, gs = paper_step_inputs(B)
        kern = decode.decode_kernels(spec, 1, capacity=c.capacity)
        cmp_bn = dict(kern["cmp"].key.schedule)["cmp_block_N"]
        heur = decode._splits(B, H, spec, 1, L, sms, cmp_bn, None)
        t_h, _ = _time(lambda: nsa_decode(q, c, *gs))
        try:
            decode._decode_kernels = lambda *a, **k: no_pdl
            t_np, _ = _time(lambda: nsa_decode(q, c, *gs))
        finally:
            decode._decode_kernels = real
        print(f"  B {B:>3}: heuristic splits {heur}: {t_h * 1e3:7.1f} us with PDL, {t_np * 1e3:7.1f} us without",
              flush=True)
        _breakdown(lambda: nsa_decode(q, c, *gs))
        grid = {}
        nw = -(-min(L, spec.window.size) // spec.selection.block) + 1
        for sc in sorted({1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64} | {heur[0]}):
            for ss, sw in sorted({(1, 1), (2, 1), (2, 2), (4, 2), (4, 3), (8, 3), (8, 5), (16, 5), (16, nw)}
                                 | {heur[1:]}):
                if sc * B * H > 64 * sms:
                    continue
                try:
                    grid[(sc, ss, sw)] = _time(lambda: nsa_decode(q, c, *gs, num_splits=(sc, ss, sw)))[0]
                except Exception as e:
                    print(f"      {(sc, ss, sw)}: {type(e).__name__}: {e}", flush=True)
        best = min(grid, key=grid.get)
        by_sc = {sc: min(t for k, t in grid.items() if k[0] == sc) for sc in sorted({k[0] for k in grid})}
        by_sel = {k[1:]: min(t for kk, t in grid.items() if kk[1:] == k[1:]) for k in grid}
        print("      best per cmp splits: " + "  ".join(f"{k}: {v * 1e3:.1f}" for k, v in by_sc.items()), flush=True)
        print("      best per (sel, win) splits: " + "  ".join(f"{k}: {v * 1e3:.1f}" for k, v in sorted(by_sel.items())),
              flush=True)
        print(f"      best {best}: {grid[best] * 1e3:.1f} us (heuristic {heur}: {grid.get(heur, t_h) * 1e3:.1f} us)",
              flush=True)
        _breakdown(lambda: nsa_decode(q, c, *gs, num_splits=best))
    del big
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="paper config only, q_len 1")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="split-count / PDL sweep at 64k instead of the checks")
    ap.add_argument("--context", type=int, default=65536, help="--variants: the context length")
    ap.add_argument("--batches", default="1,16,64", help="--variants: batch sizes, comma-separated")
    ap.add_argument("--variants", default=None,
                    help='JSON {name: {part: {knob: value}}, ...}: time step variants (at --context) instead of the checks')
    a = ap.parse_args()
    if a.variants:
        import json
        run_variants({"resolved": {}, **json.loads(a.variants)}, L=a.context,
                     batches=tuple(int(b) for b in a.batches.split(",")))
        print(f"{'FAILED: ' + ', '.join(FAILS) if FAILS else 'ALL PASSED'}", flush=True)
        sys.exit(1 if FAILS else 0)
    if a.sweep:
        precompile([c.key for c in lower_decode(PAPER, "sm90", 1, False, 128 * 1024)], jobs=a.jobs)
        run_sweep()
        return
    cases = [("paper fp16 q_len=1", PAPER, 1, [37, 700, 2000, 3001], 20, False),
             ("paper fp16 q_len=4", PAPER, 4, [7, 515, 1337, 2949], 6, False)]
    if a.quick:
        cases = cases[:1]
    else:
        cases.append(("bf16 G=8 Dk=192 f=1 l'=32 w=128 sep-window q_len=2", ODD, 2, [3, 97, 1201], 9, True))
    t0 = time.time()
    keys = []
    for _, spec, ql, lens, steps, sep in cases:
        keys += [c.key for c in lower_decode(spec, "sm90", ql, sep, max(lens) + steps * ql + 3)]
    if not a.no_bench:
        keys += [c.key for c in lower_decode(PAPER, "sm90", 1, False, 128 * 1024)]
    for key, err, sec in precompile(keys, jobs=a.jobs):
        if err:
            note(f"compile {key}", False, err)
    print(f"compiled {len(set(keys))} kernels in {time.time() - t0:.0f} s", flush=True)
    os.environ["NSA_CODEGEN_POISON_OUTPUTS"] = "1"
    for tag, spec, ql, lens, steps, sep in cases:
        try:
            run_correctness(tag, spec, ql, lens, steps, sep)
        except Exception:
            traceback.print_exc()
            note(tag, False, "exception")
    os.environ.pop("NSA_CODEGEN_POISON_OUTPUTS", None)
    if not a.no_bench:
        try:
            run_timing([8192, 32768, 65536, 131072], [1, 16, 64])
        except Exception:
            traceback.print_exc()
            note("timing", False, "exception")
    print(f"{'FAILED: ' + ', '.join(FAILS) if FAILS else 'ALL PASSED'}  ({time.time() - t0:.0f} s)", flush=True)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
