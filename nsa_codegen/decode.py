"""One NSA decode step on the GPU kernels: `nsa_decode` over an `NSAKVCache` or a batch of a
`PagedNSAKVCache` (`cache.batch(slots)`: the kernels read its pools through the block tables).

`nsa_decode(q, cache, g_cmp, g_slc, g_win, spec)`: q [B, ql, HQ, Dk] are the queries of the last
ql cached tokens (positions L_b - ql .. L_b - 1; append first); returns o [B, ql, HQ, Dv] equal
to reference.nsa_reference on the whole sequence at those positions. Four kernels per step
(templates/decode_attention.py; lowering.lower_decode names them): split-KV compression attention
with the top-n scores, the chunked top-n, split-KV selection + window, and the gated combine. Large
batches run as parts on concurrent streams. `nsa_decode_bytes` is the K/V one step must read.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .buffers import KERNEL_DTYPES as _DTYPES
from .buffers import empty as _ws  # NaN / -7 poisoned under NSA_CODEGEN_POISON_OUTPUTS=1 (tests)
from .kinds import KINDS
from .kv_cache import NSAKVCache, check_step, compressed_rows
from .resources import template_module
from .spec import NSASpec


@functools.lru_cache(maxsize=None)
def _arch_of(device: torch.device) -> str:
    from .lowering import arch_of_capability
    return arch_of_capability(*torch.cuda.get_device_capability(device))


def decode_kernels(spec: NSASpec, q_len: int, *, separate_window: bool = False, capacity: int = 1 << 16,
                   arch: Optional[str] = None, page_size: int = 0) -> dict:
    """part ("cmp" | "topn" | "sparse" | "combine") -> CompiledKernel of one decode step, through the
    same lowering, schedules (tuned, else default), prebuilt generated/ kernels and disk cache as the
    forward. arch: the current GPU's unless given; page_size > 0: over a paged cache."""
    from .lowering import decode_seqlen_bucket
    return _decode_kernels(spec, int(q_len), bool(separate_window), decode_seqlen_bucket(capacity),
                           arch or _arch_of(torch.device("cuda")), int(page_size))


@functools.lru_cache(maxsize=None)  # a decode step looks its kernels up once per (spec, shape), not per call
def _decode_kernels(spec, q_len, separate_window, max_seqlen, arch, page_size=0):
    from .cache import get_kernel
    from .lowering import lower_decode
    calls = lower_decode(spec, arch, q_len, separate_window, max_seqlen, page_size=page_size)
    return {c.kind[len("decode_"):].removesuffix("_paged"): get_kernel(c.key) for c in calls}


def clear_decode_kernels() -> None:
    """Forget the decode kernels looked up so far (tuning swaps a candidate in; the next step
    looks its kernels up again)."""
    _decode_kernels.cache_clear()


def paged_decode_unsupported(batch) -> Optional[str]:
    """Why the decode kernels cannot read this PagedNSAKVCache batch, or None: they read float16 /
    bfloat16 pools of 16..256-token pages (a power of 2) that divide or are divided by the selection
    block."""
    c = batch.cache
    if c.kv_dtype != c.dtype:
        return f"the decode kernels read {c.dtype} pools; this cache stores {c.kv_dtype}"
    P, lp = c.page_size, c.spec.selection.block if c.spec.selection else 0
    if P not in (16, 32, 64, 128, 256) or (lp and lp % P and P % lp):
        return (f"the decode kernels read pages of 16, 32, 64, 128 or 256 tokens dividing or divided by the "
                f"selection block {lp}; this cache's pages hold {P}")
    return None


def _splits(B, H, spec, q_len, max_len, sms, cmp_block_N, num_splits):
    c, s, w = spec.compression, spec.selection, spec.window
    MAX_CMP_SPLITS = template_module("decode_attention").MAX_CMP_SPLITS
    BH = B * H
    n_cmp = compressed_rows(max_len, c)
    tiles = -(-n_cmp // cmp_block_N)
    # at most ~2 programs per SM, rounded down (an H100 at 64k context: B = 64 runs 7% faster with one
    # cmp split than with two, B = 16 3% faster with 4 than with 5; bench_decode.py --sweep), at least
    # 2 tiles each
    target = max(1, 2 * sms // BH)
    sc = max(1, min(MAX_CMP_SPLITS, target, max(1, -(-tiles // 2))))
    nw = -(-min(max_len, w.size + q_len - 1) // s.block) + 1
    # selection splits per query: the programs-per-SM target, at least 2, and a window split per two
    # of them (the best of the --sweep grid at B = 1 / 16 / 64: (16, 5-9) / (4, 2) / (2, 1))
    s_sel = max(1, min(s.top_n, max(2, target) // q_len))
    sw = max(1, min(nw, -(-s_sel // 2)))
    if num_splits is not None:
        sc, s_sel, sw = (int(x) for x in num_splits)
        if not (1 <= sc <= MAX_CMP_SPLITS and 1 <= s_sel <= s.top_n and 1 <= sw <= nw):
            raise ValueError(f"num_splits (cmp, sel per query, win) = {num_splits} out of range "
                             f"([1, {MAX_CMP_SPLITS}], [1, {s.top_n}], [1, {nw}])")
    return sc, s_sel, sw


def _batch_parts(B, H, num_parts):
    """[(b0, b1)]: the batch in contiguous parts, each decoded by its own chain of the four kernels on
    its own CUDA stream, with the split counts of the whole batch.  Alone, each kernel of a step
    ends in a tail where few programs are left (top-n, the selection programs and combine are
    short, dependent launches); with parts, one part's tail overlaps another part's work.  Four
    parts once B * H >= 64 (an H100 at 64k context, 1 -> 2 / 3 / 4 parts: B = 16 87.3 -> 86.0 /
    84.6 / 84.3 us, B = 32 157.7 -> 155.9 / 154.2 / 153.1 us, B = 64 304.9 -> 299.7 / 293.0 / 292.9
    us; at B = 4 and 8 one chain is fastest: bench_decode.py --variants)."""
    n = 1 if B * H < 64 else min(4, B)
    if num_parts is not None:
        n = int(num_parts)
        if not 1 <= n <= min(B, 8):
            raise ValueError(f"num_parts must be in 1..min(B, 8) = {min(B, 8)}, got {num_parts}")
    return [(i * B // n, (i + 1) * B // n) for i in range(n)]     # sizes differ by at most one


_SIDE_STREAMS: dict = {}


def _side_streams(dev: torch.device, n: int) -> list:
    """n CUDA streams of dev kept for the batch parts of nsa_decode (made once: creating streams per
    call would leak handles into captured graphs)."""
    got = _SIDE_STREAMS.setdefault(dev, [])
    while len(got) < n:
        got.append(torch.cuda.Stream(device=dev))
    return got[:n]


def nsa_decode(q: torch.Tensor, cache: NSAKVCache, g_cmp: torch.Tensor, g_slc: torch.Tensor,
               g_win: torch.Tensor, spec: Optional[NSASpec] = None, *, return_indices: bool = False,
               num_splits: Optional[tuple] = None, num_parts: Optional[int] = None):
    """NSA attention of the last q_len cached tokens of every entry.

    q [B, ql, HQ, Dk] (ql in 1..8; query i of entry b sits at cache_seqlens[b] - ql + i), gates
    [B, ql, HQ].  Returns o [B, ql, HQ, Dv] (q's dtype), plus block indices [B, ql, H, top_n]
    int32 (ascending, -1 padded) with return_indices.  num_splits = (cmp splits, selection
    splits per query, window splits) overrides the occupancy heuristic; num_parts (1..8) the
    number of batch parts run as concurrent kernel chains (_batch_parts).  No host sync; safe
    to capture in a CUDA graph (the parts fork from and join the current stream).
    """
    from .paged_kv_cache import PagedBatch
    spec, gates = check_step(q, cache, spec, (g_cmp, g_slc, g_win), max_q_len=8)
    if cache.dtype not in _DTYPES:
        raise ValueError(f"nsa_decode runs the kernels, which need a float16 / bfloat16 cache, got {cache.dtype} "
                         f"(nsa_decode_reference runs any)")
    paged = isinstance(cache, PagedBatch)
    why = paged_decode_unsupported(cache) if paged else None
    if why:
        raise ValueError(f"nsa_decode: {why} (nsa_decode_reference reads it)")
    B, ql, HQ, Dk = q.shape
    gates = [g.contiguous() for g in gates]
    kern = decode_kernels(spec, ql, separate_window=cache.separate_window, capacity=cache.capacity,
                          arch=_arch_of(q.device), page_size=cache.page_size if paged else 0)
    dev = q.device
    H, Dv, n = spec.kv_heads, spec.v_head_dim, spec.selection.top_n
    G = HQ // H
    MR = G * ql
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cmp_bn = dict(kern["cmp"].key.schedule)["cmp_block_N"]
    CB = template_module("decode_attention").DecodeAttentionConfig.topn_threads
    f32 = torch.float32
    ws_scores = cache.decode_workspaces.get(ql)
    if ws_scores is None:
        c = spec.compression
        sg, nbg, _ = template_module("decode_attention").score_groups(c.block, c.stride, c.first_block,
                                                                      spec.selection.block)
        # groups of the compressed rows a cmp kernel may write: its capacity (paged: table x page)
        cap_cmp = cache.cache.cmp_block_table.shape[1] * cache.page_size if paged else cache.cap_cmp_phys
        cg = -(-cap_cmp // sg)
        ws_scores = cache.decode_workspaces[ql] = (_ws((B, ql, cg, nbg, HQ), torch.float16, dev),
                                         _ws((B, ql, cg, HQ), f32, dev))
    scores, score_max = ws_scores
    q = q.contiguous()
    max_len = max(cache.lengths)
    sc, s_sel, sw = _splits(B, H, spec, ql, max_len, sms, cmp_bn, num_splits)
    ss = ql * s_sel
    nc = max(1, -(-(-(-max_len // spec.selection.block)) // CB))
    o_cmp, l_cmp = _ws((B, H, sc, MR, Dv), f32, dev), _ws((B, H, sc, MR), f32, dev)
    cand_s, cand_i = _ws((B, ql, H, nc, n), f32, dev), _ws((B, ql, H, nc, n), torch.int32, dev)
    idx = _ws((B, ql, H, n), torch.int32, dev)
    o_slc, l_slc = _ws((B, H, ss, MR, Dv), f32, dev), _ws((B, H, ss, MR), f32, dev)
    o_win, l_win = _ws((B, H, sw, MR, Dv), f32, dev), _ws((B, H, sw, MR), f32, dev)
    out = _ws((B, ql, HQ, Dv), q.dtype, dev)
    tables = cache.kernel_tables() if paged else {"cache_seqlens": cache.cache_seqlens}
    lens = tables["cache_seqlens"]
    # each batch part on its own stream, on its slice of every buffer.  The workspaces come from the
    # current stream's pool and stay referenced until after the join below, so nothing reuses them
    # while a part still runs
    parts = _batch_parts(B, H, num_parts)
    main = torch.cuda.current_stream(dev)
    streams = [main] + _side_streams(dev, len(parts) - 1)
    for s in streams[1:]:
        s.wait_stream(main)     # the appends / prefill before this step
    # Every tensor of the step under the registry's argument names (nsa_codegen.kinds): each kernel's
    # launch takes its args in registry order, each sliced to the batch part.
    env = {"q": q, "cache_seqlens": lens, "scores": scores, "score_max": score_max, "o_cmp_part": o_cmp,
           "lse_cmp_part": l_cmp, "candidate_scores": cand_s, "candidate_blocks": cand_i, "block_indices": idx,
           "o_slc_part": o_slc, "lse_slc_part": l_slc, "o_win_part": o_win, "lse_win_part": l_win,
           "g_cmp": gates[0], "g_slc": gates[1], "g_win": gates[2], "o": out}
    if paged:   # one pool of pages for all entries (never sliced per part) and the tables
        pc = cache.cache
        pools = {"kv_k_pool": pc.kv_k, "kv_v_pool": pc.kv_v, "k_cmp_pool": pc.k_cmp, "v_cmp_pool": pc.v_cmp}
        env.update(tables)
        env.update(pools)
    else:
        pools = {}
        env.update(k_cmp=cache.k_cmp, v_cmp=cache.v_cmp, kv_k=cache.kv_k, kv_v=cache.kv_v)
    launches = [(k, KINDS[k.key.kind].args) for k in kern.values()]  # in the plan's order
    for (b0, b1), stream in zip(parts, streams):
        r = slice(b0, b1)
        with torch.cuda.stream(stream):
            for k, names in launches:
                k(*[env[n] if n in pools else env[n][r] for n in names])
    for s in streams[1:]:
        main.wait_stream(s)
    return (out, idx) if return_indices else out


def nsa_decode_bytes(spec: NSASpec, length: int, elem_bytes: int = 2) -> int:
    """Unique bytes of K/V one decode step reads for one sequence of `length` tokens (all kv heads),
    each row counted once: the compressed rows, plus the union of the selected blocks' rows and the
    window's. The selected blocks are taken as the forced ones (the first `initial` and the `local`
    newest, whose rows the window mostly holds already) and the rest as far from the window as
    possible: the most bytes a selection can cost. (A cache with separate window K/V reads the
    window's rows from their own tensors: add them on top.)"""
    c, s, w = spec.compression, spec.selection, spec.window
    L = int(length)
    row = spec.kv_heads * (spec.head_dim + spec.v_head_dim) * elem_bytes
    n_cmp = compressed_rows(L, c) if c else 0
    win_lo = max(0, L - w.size) if w else L   # the window reads rows [win_lo, L)
    sel_rows = 0
    if s is not None and L > 0:
        nb = -(-L // s.block)
        forced = set(range(min(s.initial, nb))) | set(range(max(0, nb - s.local), nb))
        free = sorted((j for j in range(nb) if j not in forced), key=lambda j: (j * s.block >= win_lo, j))
        for j in sorted(forced) + free[:max(0, s.top_n - len(forced))]:
            lo, hi = j * s.block, min((j + 1) * s.block, L)
            sel_rows += (hi - lo) - max(0, hi - max(lo, win_lo))   # its rows outside the window
    return (n_cmp + sel_rows + (L - win_lo)) * row
