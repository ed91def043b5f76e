"""Decode step timing with cold caches: NSA against dense decode peers on the same caches.

    PYTHONPATH=<repo> python benchmarks/bench_decode_cold.py [--contexts 65536] [--batches 1 16 64]
        [--rounds 5] [--iters 8] [--out DIR]

Paper config with D = 128 (HQ = 64, H = 4, l = 32, d = 16, l' = 64, n = 16, w = 512), fp16, q_len 1.
For each (batch B, context L):
  - caches: n copies of a random NSAKVCache at length L, n the larger of 4 and what it takes for n
    steps to read 4x the L2 cache (B = 1 at 64k reads ~5 MB a step: ~40 copies), capped by memory;
    every timed launch reads the next copy (cold: its bytes are not in L2). `nsa_warm` replays one
    copy (its bytes stay in L2) for comparison;
  - cases, interleaved round by round, each launch timed by CUDA events (benchmarks/timing.py):
    `nsa` (nsa_decode, one CUDA graph per copy), `nsa_warm`, `nsa_paged` (the same sequences in a
    PagedNSAKVCache of --paged-token pages handed out shuffled, checked against `nsa` first: same
    blocks, outputs within 1e-2), and the dense peers over the same
    copies' K/V: SDPA pinned to each backend that runs it (flash, efficient, cuDNN; GQA through
    enable_gqa, no copies of K/V), graphed the same way;
  - bytes, counted once: NSA's unique rows (decode.nsa_decode_bytes), dense B x L x H x (Dk + Dv) x 2;
    "of HBM" divides by the H100's 3.35 TB/s.
No split-KV dense peer other than SDPA's is on the device (flash-attn's flash_attn_with_kvcache and
FlashInfer are not installed there); the md says so. Writes <out>/<date>-<gpu>-decode_cold.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import HBM_TBPS, PAPER, capture_graph, random_paper_cache  # noqa: E402
from bench_forward import run_info  # noqa: E402
from timing import Rounds, say  # noqa: E402

from nsa_codegen.decode import nsa_decode, nsa_decode_bytes  # noqa: E402


def random_cache(B, L):
    """A random paper-config cache of B entries at length L."""
    c = random_paper_cache(B, L)
    c.set_lengths([L] * B)
    return c


def paged_copy(c, L, page_size=64, seed=0):
    """The same sequences as cache c (B entries at length L) in a PagedNSAKVCache of page_size-token
    pages handed out in a shuffled order (pages of one sequence are not adjacent, as in a server),
    as a batch of its B slots."""
    from nsa_codegen.paged_kv_cache import PagedNSAKVCache
    B = c.batch_size
    per = -(-L // page_size)
    pool = PagedNSAKVCache(PAPER, B * per + 1, page_size=page_size, max_seqs=B, max_seq_len=L + 256,
                           device=c.device, dtype=c.dtype)
    g = torch.Generator().manual_seed(seed)
    pool._free = [pool._free[i] for i in torch.randperm(len(pool._free), generator=g).tolist()]
    batch = pool.batch([pool.add_sequence() for _ in range(B)])
    batch.append(c.kv_k[:, :L, 0], c.kv_v[:, :L, 0])
    # the random caches' compressed rows are random too, not phi of their tokens: copy them over
    N = c.num_cmp_host[0]
    H = PAPER.kv_heads
    for i, slot in enumerate(batch.slots):
        rows = pool._flat(pool._cmp_pages[slot], torch.arange(N, device=c.device))
        pool.k_cmp.view(-1, H, PAPER.head_dim)[rows] = c.k_cmp[i, :N]
        pool.v_cmp.view(-1, H, PAPER.v_head_dim)[rows] = c.v_cmp[i, :N]
    return batch


def graphed(fn):
    """fn captured in a CUDA graph (bench_decode.capture_graph): its replay."""
    return capture_graph(fn).replay


def rotate(fns):
    """One callable that runs the next of fns on each call."""
    state = [0]

    def run():
        fns[state[0] % len(fns)]()
        state[0] += 1
    return run


def copies_needed(B, L, l2_bytes, mem_budget):
    step = B * nsa_decode_bytes(PAPER, L)
    per_cache = B * (L + 256) * PAPER.kv_heads * (PAPER.head_dim + PAPER.v_head_dim) * 2 * 1.1
    want = max(4, math.ceil(4 * l2_bytes / step))
    return max(1, min(want, int(mem_budget // per_cache))), step


def dense_fn(backend, q, c, L):
    """SDPA over cache c's first L rows, pinned to `backend` (GQA without copying K/V)."""
    from torch.nn.attention import sdpa_kernel
    B, H, G, D = q.shape[0], PAPER.kv_heads, PAPER.group, PAPER.head_dim
    qd = q.view(B, 1, H * G, D).transpose(1, 2)
    kd, vd = c.k[:, :L].transpose(1, 2), c.v[:, :L].transpose(1, 2)

    def run():
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[65536])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--mem-gib", type=float, default=40.0, help="memory for the cache copies of one (B, L)")
    ap.add_argument("--paged", type=int, default=64, help="also time the step over a paged copy of the caches "
                    "with pages of this many tokens (0: off)")
    ap.add_argument("--paged-copies", type=int, default=0, help="paged copies (default: as many as the caches)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2 ** 20)
    rows = []
    for L in args.contexts:
        for B in args.batches:
            # with paged copies beside them, each set gets half the memory
            n, step_bytes = copies_needed(B, L, l2, args.mem_gib * 2 ** 30 / (2 if args.paged else 1))
            say(f"B={B} L={L}: {n} cache copies ({n * step_bytes / 2 ** 20:.0f} MiB read per rotation, L2 "
                f"{l2 / 2 ** 20:.0f} MiB)")
            caches = [random_cache(B, L) for _ in range(n)]
            q = torch.randn(B, 1, PAPER.heads, PAPER.head_dim, device="cuda", dtype=torch.float16)
            gs = [torch.rand(B, 1, PAPER.heads, device="cuda", dtype=torch.float16) for _ in range(3)]
            r = Rounds(args.rounds, args.iters)
            nsa = [graphed(lambda c=c: nsa_decode(q, c, *gs)) for c in caches]
            dense_bytes = B * L * PAPER.kv_heads * (PAPER.head_dim + PAPER.v_head_dim) * 2
            r.add("nsa", rotate(nsa), bytes=B * nsa_decode_bytes(PAPER, L), copies=n)
            r.add("nsa_warm", nsa[0], bytes=B * nsa_decode_bytes(PAPER, L), copies=1)
            if args.paged:   # the same sequences in paged pools (64-token pages, shuffled)
                paged = [paged_copy(c, L, args.paged, seed=i) for i, c in enumerate(caches[:args.paged_copies or n])]
                o_c, i_c = nsa_decode(q, caches[0], *gs, return_indices=True)
                o_p, i_p = nsa_decode(q, paged[0], *gs, return_indices=True)
                same = torch.equal(i_c, i_p)
                diff = ((o_p.float() - o_c.float()).norm() / o_c.float().norm()).item()
                say(f"paged vs contiguous: same blocks {same}, output relative difference {diff:.2e}")
                if not same or diff > 1e-2:
                    raise SystemExit(f"paged decode differs from contiguous (blocks equal: {same}, rel {diff:.2e})")
                r.add("nsa_paged", rotate([graphed(lambda c=c: nsa_decode(q, c, *gs)) for c in paged]),
                      bytes=B * nsa_decode_bytes(PAPER, L), copies=len(paged))
            for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                             ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                             ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    fns = [graphed(dense_fn(be, q, c, L)) for c in caches]
                except Exception as e:   # a backend that does not run this shape
                    rows.append(dict(B=B, L=L, case=name, ms=None, error=f"{type(e).__name__}: {str(e)[:160]}"))
                    say(f"{name}: {rows[-1]['error']}")
                    continue
                r.add(name, rotate(fns), bytes=dense_bytes, copies=n)
            for row in r.run():
                row.update(B=B, L=L)
                if row.get("ms"):
                    row["gb_s"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                    row["of_hbm"] = row["gb_s"] / (HBM_TBPS * 1e3)
                rows.append(row)
                say(f"B={B} L={L} {row['case']}: {row.get('ms')} ms")
            del caches, nsa
            paged = None
            torch.cuda.empty_cache()
    save(args, rows)


def save(args, rows):
    info = run_info()
    stem = Path(args.out) / f"{info['date']}-{info['gpu'].replace(' ', '_')}-decode_cold"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=dict(info, rounds=args.rounds, iters=args.iters,
                                                                   spec=PAPER.to_dict()), rows=rows), indent=1))
    lines = [f"# Decode step, cold caches, {info['gpu']}, {info['date']}", "",
             f"commit {info['git_sha'][:12]} (dirty: {info['git_dirty']}), paper config D=128 fp16, q_len 1. Median "
             f"of {args.rounds} interleaved rounds x {args.iters} launches (CUDA events; CUDA graphs), [q1, q3]; every "
             "launch reads the next of `copies` caches (cold) except nsa_warm. Bytes counted once; % of 3.35 TB/s. "
             "vs best dense: the fastest SDPA backend's median over the case's. flash-attn and FlashInfer are not "
             "installed on the device: SDPA is the only dense peer.", "",
             "| L | B | case | ms | q1-q3 | GB/s | of HBM | copies | vs best dense |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("ms") is None:
            lines.append(f"| {row['L']} | {row['B']} | {row['case']} | failed: {row.get('error', '')} | | | | | |")
            continue
        dense = [x["ms"] for x in rows if x["L"] == row["L"] and x["B"] == row["B"] and x["case"].startswith("sdpa")
                 and x.get("ms")]
        vs = f"{min(dense) / row['ms']:.1f}x" if dense else ""
        lines.append(f"| {row['L']} | {row['B']} | {row['case']} | {row['ms']:.4f} | {row['q1_ms']:.4f}-{row['q3_ms']:.4f} "
                     f"| {row['gb_s']:.0f} | {100 * row['of_hbm']:.1f}% | {row['copies']} | {vs} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
