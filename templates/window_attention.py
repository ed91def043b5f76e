"""Sliding-window causal attention forward (NSA sliding-window branch), TileLang.

Layouts (contiguous, row-major), B and T dynamic:
    Q   [B, T, HQ, Dk]   dtype
    K   [B, T, H,  Dk]   dtype
    V   [B, T, H,  Dv]   dtype
    SeqStart [B, T]      int32   (the first token of t's sequence: 0 for a batch, cu_seqlens of a pack)
    O   [B, T, HQ, Dv]   dtype   (output)
    LSE [B, T, HQ]       float32 (output, natural log of sum_s exp(scale * q.k_s))
Query t attends keys s with max(t - window, SeqStart[t] - 1) < s <= t.  GQA: query head hq reads kv
head hq // G, G = HQ // H.  A packed batch (B = 1, sequences back to back) runs in one launch:
a tile may straddle sequences, and each row masks the keys before its own sequence's start.

Schedule: FlashAttention-2 style.  One program = block_M consecutive query
tokens of one query head; it walks only the block_N key tiles that intersect the
band [t0 - window + 1, t0 + block_M - 1].  GQA maps query head hq to KV head
hq // G (heads are not packed into M).  The grid puts the query head on the
fastest axis so the G heads sharing a KV head run back to back and hit the same
K/V tiles in L2.  On sm90 TileLang lowers this to TMA loads in a
warp-specialized producer/consumer pipeline with WGMMA (P @ V reads P from
registers).
"""

import dataclasses

import tilelang.language as T

from ._online_softmax import online_softmax as _online_softmax
from ._problem import check_problem


@dataclasses.dataclass(frozen=True)
class WindowAttentionConfig:
    heads_q: int = 64          # HQ
    heads_kv: int = 4          # H
    head_dim_qk: int = 128     # Dk
    head_dim_v: int = 128      # Dv
    window: int = 512          # w >= 1
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"    # "float16" | "bfloat16"
    # schedule
    block_M: int = 128         # query tokens per program
    block_N: int = 0           # keys per pipelined step; 0 = 128 if smem fits, else 64
    fast_math: bool = True     # compile with TileLang's fast-math pass config (faster exp; ~20% at w=512)
    threads: int = 256         # consumer threads (multiple of 128 for WGMMA)
    num_stages: int = 2        # K/V smem ring depth
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)


def _block_n(cfg, bn=None):
    if bn is None:
        bn = cfg.block_N
    if bn:
        return bn
    return 128 if _smem_bytes(cfg, 128) <= cfg.smem_block else 64


def _smem_bytes(cfg, bn=None):
    # Q tile (the O staging tile reuses its space) + the K/V ring.  P stays in
    # registers (WGMMA RS operand), so it costs no smem.
    bn = _block_n(cfg, bn)
    e = 2
    qo = cfg.block_M * max(cfg.head_dim_qk, cfg.head_dim_v) * e
    kv = cfg.num_stages * bn * (cfg.head_dim_qk + cfg.head_dim_v) * e
    return qo + kv + 1024


def check_config(cfg) -> None:
    """Raise ValueError naming the offending field if build(cfg) can't work."""
    check_problem(cfg)
    if cfg.window < 1:
        raise ValueError("window: must be >= 1")
    if cfg.block_M not in (64, 128, 192, 256):
        raise ValueError("block_M: must be one of 64, 128, 192, 256")
    if cfg.block_N not in (0, 32, 64, 128, 256):
        raise ValueError("block_N: must be 0 (auto), 32, 64, 128 or 256")
    if cfg.threads not in (128, 256, 384):
        raise ValueError("threads: must be 128, 256 or 384")
    # WGMMA: each consumer warpgroup (128 threads) owns a multiple of 64 rows.
    if cfg.block_M % (64 * (cfg.threads // 128)) != 0:
        raise ValueError("threads: block_M must be a multiple of 64 rows per 128 threads")
    if cfg.num_stages < 1 or cfg.num_stages > 4:
        raise ValueError("num_stages: must be in 1..4")
    # fp32 accumulators live in registers: acc_o + acc_s per thread.
    regs = (cfg.block_M * (cfg.head_dim_v + _block_n(cfg))) // cfg.threads
    if regs > 160:
        raise ValueError("block_M: fp32 accumulators exceed register budget for these threads")
    if _smem_bytes(cfg) > cfg.smem_block:
        raise ValueError(f"num_stages: shared memory for this block_M/block_N/num_stages exceeds the arch's {cfg.smem_block // 1024} KiB")


def pass_configs(cfg) -> dict:
    """TileLang pass configs this kernel is compiled with."""
    return {"tl.enable_fast_math": bool(cfg.fast_math)}


def build(cfg):
    """Return the (uncompiled) T.prim_func (Q, K, V, SeqStart, O, LSE) for cfg."""
    check_config(cfg)
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv, W = cfg.head_dim_qk, cfg.head_dim_v, cfg.window
    bm, bn = cfg.block_M, _block_n(cfg)
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    ninf = -T.infinity(acc)
    online_softmax = _online_softmax(bm, bn, Dv, sc)

    B, S = T.dynamic("B, T")

    @T.prim_func
    def window_attention_fwd(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        SeqStart: T.Tensor([B, S], "int32"),
        O: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
    ):
        with T.Kernel(HQ, T.ceildiv(S, bm), B, threads=cfg.threads) as (hq, mt, b):
            Q_s = T.alloc_shared([bm, Dk], dtype)
            K_s = T.alloc_shared([bn, Dk], dtype)
            V_s = T.alloc_shared([bn, Dv], dtype)
            O_s = T.alloc_shared([bm, Dv], dtype)
            acc_s = T.alloc_fragment([bm, bn], acc)
            p = T.alloc_fragment([bm, bn], dtype)
            acc_o = T.alloc_fragment([bm, Dv], acc)
            m = T.alloc_fragment([bm], acc)
            m_prev = T.alloc_fragment([bm], acc)
            alpha = T.alloc_fragment([bm], acc)
            ms = T.alloc_fragment([bm], acc)
            rsum = T.alloc_fragment([bm], acc)
            l = T.alloc_fragment([bm], acc)
            lo = T.alloc_fragment([bm], "int32")

            h = hq // G
            t0 = mt * bm
            # Row i sees keys lo[i] <= s <= t0 + i: its window, cut at its sequence's start.
            for i in T.Parallel(bm):
                lo[i] = T.max(t0 + i - W + 1, SeqStart[b, T.min(t0 + i, S - 1)])
            # Key tiles intersecting the band of this query tile (SeqStart rises along a pack, so the
            # first row's bound is the tile's).  Rows past T (tail tile) are computed on zero-filled
            # Q but never stored.
            k_lo = T.max(t0 - W + 1, SeqStart[b, t0]) // bn
            k_hi = T.ceildiv(T.min(t0 + bm, S), bn)
            # Keys from here on are in every row's window (rows below only end later; the last row's
            # sequence starts last): a key tile from k_full up to the tile's first row needs no mask.
            k_full = T.max(t0 + bm - W, SeqStart[b, T.min(t0 + bm - 1, S - 1)])

            # (The TMA load of Q is awaited in the first loop step; the loop
            # always runs >= 1 step since t0 < T, so it never stays in flight.)
            T.copy(Q[b, t0:t0 + bm, hq, :], Q_s)
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, ninf)

            for kk in T.Pipelined(k_hi - k_lo, num_stages=cfg.num_stages):
                kt = k_lo + kk
                T.copy(K[b, kt * bn:(kt + 1) * bn, h, :], K_s)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                # The band mask replaces the logits outside it (rather than adding -inf before the
                # GEMM): a NaN/Inf key a row cannot see, later in its sequence or in another
                # sequence of a pack, never reaches the row. Only the tiles on the band's two edges
                # need it (about 4 of the 10 at w = 512 with 128 x 64 tiles).
                if (kt * bn + bn - 1 > t0) | (kt * bn < k_full):
                    for i, j in T.Parallel(bm, bn):
                        acc_s[i, j] = T.if_then_else(
                            (kt * bn + j <= t0 + i) & (kt * bn + j >= lo[i]), acc_s[i, j], ninf)

                online_softmax(acc_s, m, m_prev, alpha, ms, rsum, l, p, acc_o)
                T.copy(V[b, kt * bn:(kt + 1) * bn, h, :], V_s)
                T.gemm(p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            # Every in-range row has >= 1 key (itself), but guard l == 0 anyway (`== 0`: a NaN the
            # row sees leaves l NaN, which must reach o).
            for i, j in T.Parallel(bm, Dv):
                acc_o[i, j] = T.if_then_else(l[i] == 0, 0, acc_o[i, j] / l[i])
            T.copy(acc_o, O_s)
            T.copy(O_s, O[b, t0:t0 + bm, hq, :])
            for i in T.Parallel(bm):
                if t0 + i < S:
                    LSE[b, t0 + i, hq] = T.if_then_else(l[i] == 0, ninf, m[i] * cfg.scale + T.log(l[i]))

    return window_attention_fwd
