"""NSA compression-branch attention forward (TileLang template).

Layouts (contiguous, row-major):
    Q      [B, T, HQ, Dk]   dtype
    K_cmp  [B, N, H,  Dk]   dtype
    V_cmp  [B, N, H,  Dv]   dtype
    SeqStart [B, T]         int32    (the first token of t's sequence: 0 for a batch, cu_seqlens of a pack)
    CmpStart [B, T]         int32    (the first compressed row of t's sequence in K_cmp / V_cmp)
    O      [B, T, HQ, Dv]   dtype    (output)
    LSE    [B, T, HQ]       float32  (output, natural-log logsumexp of scale*q.k)

B, T and N are dynamic; everything else is fixed by the config.
Compressed row CmpStart[t] + c is compressed block i = first_block + c of t's sequence, covering
its tokens [i*stride, i*stride + cmp_block); it is visible to query t iff
i*stride + cmp_block - 1 <= t - SeqStart[t].  A query that sees no row gets O = 0, LSE = -inf.
A packed batch (B = 1, sequences and their compressed rows back to back) runs in one launch:
a tile may straddle sequences; it walks the rows from its first token's sequence start to its
last token's newest visible row, and each row keeps only its own sequence's visible rows (the
logits are replaced, so a NaN in another sequence's rows never reaches it).

GQA: the G = HQ // H query heads that share a KV head are packed into the M
dimension of the tile, head-major: tile row r <-> (token t0 + r % BT,
query head h*G + r // BT) with BT = block_M // G tokens per program.  When G does
not divide block_M (G = 6, 12, ...) the last block_M - BT*G rows are padding: zero
queries that see no row and are never stored.
One program handles block_M // G consecutive tokens of one KV head, so each
K/V tile is fetched once for all G heads and the causal loop bound is tight.
K/V tiles come in by TMA; the pipeline pass warp-specializes the loop (an extra
128-thread producer warpgroup), and both gemms are wgmma on sm_90a.

Perf note (H100, T=65536, fp16): block_M=128 with two consumer warpgroups
(threads=256), block_N auto (128 where smem allows), 1 stage and fast math take
the paper config (Dk=192, N=4095) from 26.5 to 11.9 ms and the FLA config from
5.8 to 3.1 ms.  The Q tile is loaded with 16-byte vectors (coalesced_width=8):
without it, tile shapes whose size does not divide the prologue's thread count
(producer warpgroup included) fell back to 2-byte loads.

Schedule overlap (sm90): step kt issues tile kt's QK^T as an async WGMMA and runs tile kt-1's
softmax (from S_prev) meanwhile; after the wait it rescales O and runs tile kt-1's P V (a step's
stage holds K of tile kt and V of tile kt-1; one extra step at the end). O is touched only after
the wait: rescaling it under the running QK^T made ptxas serialize the two (C7517). Interior tiles
(every row visible to every token row) skip the visibility mask (overlap schedule only).
"""

from dataclasses import dataclass

import tilelang.language as T

from ._problem import check_problem

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@dataclass(frozen=True)
class CompressionAttentionConfig:
    heads_q: int = 64           # HQ
    heads_kv: int = 4           # H
    dim_k: int = 128            # Dk
    dim_v: int = 128            # Dv
    cmp_block: int = 32         # l
    stride: int = 16            # d (d | l)
    first_block: int = 0        # f
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"     # "float16" | "bfloat16"
    # schedule
    # schedule (defaults: fastest GPU-verified setting at the FLA shape on H100;
    # block_N=128 was ~4% faster there but does not fit smem at dim_k=256)
    block_M: int = 64           # tile rows = (block_M // G) tokens x G heads
    block_N: int = 64           # compressed keys per tile; 0 = auto (128 where the registers
                                # and shared memory allow it, else 64)
    threads: int = 128          # consumer threads, 128, 256 or 384 (one wgmma warpgroup per 64 rows);
                                # the pipeline pass adds a 128-thread TMA producer warpgroup
    num_stages: int = 2         # K/V smem pipeline depth
    fast_math: bool = False     # compile with TileLang's fast-math pass config (approximate exp2/log2/div)
    overlap: bool = False       # (sm90) tile kt's QK^T runs as an async WGMMA while tile kt-1's softmax
                                # and P V run: a step brings K of tile kt and V of tile kt-1 (two logit
                                # accumulators, one extra step)
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)


def _smem_bytes(cfg, bn=None) -> int:
    # the O staging tile reuses the Q tile's space (Q is dead after the loop)
    bn = _block_n(cfg) if bn is None else bn
    e = 2
    qo = cfg.block_M * max(cfg.dim_k, cfg.dim_v) * e
    kv = bn * (cfg.dim_k + cfg.dim_v) * e * max(cfg.num_stages, 1)
    return qo + kv + 1024


def _regs(cfg, bn) -> float:
    # accumulator registers per consumer thread: O (fp32) + S (fp32, two with overlap) + P (16 bit)
    return (cfg.block_M * (cfg.dim_v + bn * (2.5 if cfg.overlap else 1.5))) / cfg.threads


def _block_n(cfg) -> int:
    if cfg.block_N:
        return cfg.block_N
    if _regs(cfg, 128) <= 200 and _smem_bytes(cfg, 128) <= cfg.smem_block:
        return 128
    return 64


def pass_configs(cfg) -> dict:
    """TileLang pass configs this kernel is compiled with."""
    return {"tl.enable_fast_math": bool(cfg.fast_math)}


def check_config(cfg) -> None:
    """Raise ValueError (naming the field) for configs this template cannot build."""
    check_problem(cfg, dk="dim_k", dv="dim_v")
    G = cfg.heads_q // cfg.heads_kv
    if cfg.cmp_block <= 0 or cfg.stride <= 0 or cfg.cmp_block % cfg.stride != 0:
        raise ValueError("stride must divide cmp_block")
    if cfg.first_block < 0:
        raise ValueError("first_block must be >= 0")
    if cfg.threads not in (128, 256, 384):
        raise ValueError("threads must be 128, 256 or 384 (one wgmma warpgroup per 64 rows)")
    if cfg.block_M % (64 * (cfg.threads // 128)) != 0 or cfg.block_M > 256:
        raise ValueError("block_M must be a multiple of 64*threads/128 and <= 256")
    if G > cfg.block_M:
        raise ValueError("block_M must be >= G = heads_q // heads_kv (one token's heads per tile)")
    if cfg.block_N != 0 and (cfg.block_N % 16 != 0 or not (16 <= cfg.block_N <= 256)):
        raise ValueError("block_N must be 0 (auto) or a multiple of 16 in [16, 256]")
    if cfg.num_stages < 1 or cfg.num_stages > 4:
        raise ValueError("num_stages must be in [1, 4]")
    # accumulator registers per consumer thread: O (fp32) + S (fp32) + P (16 bit)
    if _regs(cfg, _block_n(cfg)) > 200:
        raise ValueError("block_M: accumulator tiles need too many registers for these threads")
    if _smem_bytes(cfg) > cfg.smem_block:
        raise ValueError(f"block_N: shared memory (Q/O + pipelined K/V) exceeds the arch's {cfg.smem_block // 1024} KiB")


def build(cfg: CompressionAttentionConfig):
    """Return the (uncompiled) prim_func main(Q, K_cmp, V_cmp, SeqStart, CmpStart, O, LSE)."""
    check_config(cfg)
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv = cfg.dim_k, cfg.dim_v
    l, d, f = cfg.cmp_block, cfg.stride, cfg.first_block
    BM, BN = cfg.block_M, _block_n(cfg)
    BT = BM // G                     # tokens per program
    RG = BT * G                      # rows in use; rows RG.. (when G does not divide BM) are padding
    dtype = cfg.dtype
    acc = "float32"
    scale2 = float(cfg.scale) * _LOG2E   # softmax in base 2: exp(x*s) = exp2(x*s*log2e)
    # query t sees rows c < nvis(t) = max(t + 1 - l - f*d + d, 0) // d  (then clamp to N)
    off = d - l - f * d + 1
    OV = cfg.overlap

    B, Tn, N = T.dynamic("B, T, N")

    @T.macro
    def softmax_step(Sx, kt, c_lo, cf_max, ce_min, c_first, c_end, m_cur, m_prev, m_use, alpha, row_sum, l_sum,
                     acc_p):
        """Tile kt's logits Sx [BM, BN] -> P (acc_p, the MMA dtype) in the running base-2 softmax,
        l_sum rescaled to the new row max; alpha [BM]: the factor O must be rescaled by."""
        # masked logits are replaced (a NaN in a row another token cannot see stays out). Interior
        # tiles (every row of the tile visible to every token row: c_first rises and c_end never
        # falls along the tile, so its last token's first row and its first token's end bound them)
        # skip the mask; padding rows then see the tile too, but are never stored. (Overlap schedule
        # only, for now: the default's code stays the one verified on the GPU until this path has been.)
        if ((c_lo + kt * BN < cf_max) | (c_lo + (kt + 1) * BN > ce_min)) if OV else True:
            for i, j in T.Parallel(BM, BN):
                Sx[i, j] = T.if_then_else(
                    (c_lo + kt * BN + j >= c_first[i]) & (c_lo + kt * BN + j < c_end[i]),
                    Sx[i, j], -T.infinity(acc))
        T.copy(m_cur, m_prev)
        T.reduce_max(Sx, m_cur, dim=1, clear=False)
        # rows that have seen nothing yet keep m = -inf; use 0 as the
        # reference so exp2(-inf - ref) = 0 instead of NaN.
        for i in T.Parallel(BM):
            m_use[i] = T.if_then_else(m_cur[i] == -T.infinity(acc), 0, m_cur[i])
            alpha[i] = T.exp2((m_prev[i] - m_use[i]) * scale2)
        for i, j in T.Parallel(BM, BN):
            Sx[i, j] = T.exp2(Sx[i, j] * scale2 - m_use[i] * scale2)
        T.reduce_sum(Sx, row_sum, dim=1)
        for i in T.Parallel(BM):
            l_sum[i] = l_sum[i] * alpha[i] + row_sum[i]
        T.copy(Sx, acc_p)

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, Dk], dtype),
        K_cmp: T.Tensor([B, N, H, Dk], dtype),
        V_cmp: T.Tensor([B, N, H, Dv], dtype),
        SeqStart: T.Tensor([B, Tn], "int32"),
        CmpStart: T.Tensor([B, Tn], "int32"),
        O: T.Tensor([B, Tn, HQ, Dv], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(Tn, BT), H, B, threads=cfg.threads) as (bx, by, bz):
            Q_s = T.alloc_shared([BM, Dk], dtype)
            K_s = T.alloc_shared([BN, Dk], dtype)
            V_s = T.alloc_shared([BN, Dv], dtype)
            O_s = T.alloc_shared([BM, Dv], dtype)
            acc_s = T.alloc_fragment([BM, BN], acc)
            if OV:   # the previous tile's logits, softmaxed while the next tile's QK^T runs
                S_prev = T.alloc_fragment([BM, BN], acc)
                hold = T.alloc_local([1], dtype)
            acc_p = T.alloc_fragment([BM, BN], dtype)
            acc_o = T.alloc_fragment([BM, Dv], acc)
            m_cur = T.alloc_fragment([BM], acc)
            m_prev = T.alloc_fragment([BM], acc)
            m_use = T.alloc_fragment([BM], acc)
            alpha = T.alloc_fragment([BM], acc)
            row_sum = T.alloc_fragment([BM], acc)
            l_sum = T.alloc_fragment([BM], acc)
            c_first = T.alloc_fragment([BM], "int32")
            c_end = T.alloc_fragment([BM], "int32")

            t0 = bx * BT
            # Q tile, head-major rows: row g*BT + tt <-> (token t0+tt, head by*G+g).
            # One strided 2-D SIMT copy per head (an 8-row TMA box would not match the
            # 128B-swizzled smem layout); rows past T read as 0.
            for g in T.unroll(G):
                T.copy(Q[bz, t0:t0 + BT, by * G + g, :], Q_s[g * BT:(g + 1) * BT, :], disable_tma=True,
                       coalesced_width=8)
            if RG < BM:
                for i, k in T.Parallel(BM - RG, Dk):
                    Q_s[RG + i, k] = T.cast(0, dtype)

            T.fill(acc_o, 0)
            T.fill(l_sum, 0)
            T.fill(m_cur, -T.infinity(acc))
            # Row i (token t) sees rows [c_first, c_end): its sequence's first compressed row,
            # up to its newest complete one (clamped to N).
            for i in T.Parallel(BM):
                c_first[i] = CmpStart[bz, T.min(t0 + i % BT, Tn - 1)]
                c_end[i] = T.min(c_first[i] + T.max(
                    T.min(t0 + i % BT, Tn - 1) - SeqStart[bz, T.min(t0 + i % BT, Tn - 1)] + off, 0) // d, N)
                if RG < BM:
                    c_end[i] = T.if_then_else(i < RG, c_end[i], c_first[i])   # padding rows see nothing

            # Only the rows from the first token's sequence start to the last (valid) token's newest
            # visible one (both rise along a pack).
            t_last = T.min(t0 + BT, Tn) - 1
            c_lo = CmpStart[bz, t0]
            c_hi = T.min(CmpStart[bz, t_last] + T.max(t_last - SeqStart[bz, t_last] + off, 0) // d, N)
            # every token row of the tile sees the rows [cf_max, ce_min) (empty near the diagonal)
            cf_max = CmpStart[bz, t_last]
            ce_min = T.min(c_lo + T.max(t0 - SeqStart[bz, t0] + off, 0) // d, N)
            n_kt = T.ceildiv(c_hi - c_lo, BN)
            if OV:
                T.fill(S_prev, 0)   # (read only from the second step on)
                # Step kt: K of tile kt (past the last tile: TMA zero-fills, no gemm), V of tile kt-1
                # (tile 0 at step 0, unused).
                for kt in T.Pipelined(n_kt + 1, num_stages=cfg.num_stages):
                    T.copy(K_cmp[bz, c_lo + kt * BN:c_lo + (kt + 1) * BN, by, :], K_s)
                    T.copy(V_cmp[bz, c_lo + T.max(kt - 1, 0) * BN:c_lo + T.max(kt, 1) * BN, by, :], V_s)
                    if kt < n_kt:
                        T.wgmma_gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True,
                                     policy=T.GemmWarpPolicy.FullRow)
                    if kt > 0:
                        softmax_step(S_prev, kt - 1, c_lo, cf_max, ce_min, c_first, c_end, m_cur, m_prev, m_use, alpha,
                                     row_sum, l_sum, acc_p)
                    # O is rescaled only once no WGMMA is in flight: touching it under the running
                    # QK^T made ptxas serialize the two (C7517)
                    T.wait_wgmma(0)
                    T.copy(acc_s, S_prev)
                    if kt > 0:
                        for i, k in T.Parallel(BM, Dv):
                            acc_o[i, k] *= alpha[i]
                        T.gemm(acc_p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
                    # K is read here, after every wait, so its stage is freed only once the gemm
                    # reading it is done (TileLang frees a stage after its last reader)
                    hold[0] = K_s[0, 0]
            else:
                for kt in T.Pipelined(n_kt, num_stages=cfg.num_stages):
                    T.copy(K_cmp[bz, c_lo + kt * BN:c_lo + (kt + 1) * BN, by, :], K_s)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                    softmax_step(acc_s, kt, c_lo, cf_max, ce_min, c_first, c_end, m_cur, m_prev, m_use, alpha,
                                 row_sum, l_sum, acc_p)
                    for i, k in T.Parallel(BM, Dv):
                        acc_o[i, k] *= alpha[i]
                    # OOB V rows are zero-filled by the bounded copy; their P is 0.
                    T.copy(V_cmp[bz, c_lo + kt * BN:c_lo + (kt + 1) * BN, by, :], V_s)
                    T.gemm(acc_p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            # empty rows: l_sum == 0 -> O = 0, LSE = -inf (no division by zero). The test is
            # `== 0`, not `> 0`: a NaN the row can see leaves l_sum NaN, and it must reach O.
            for i, k in T.Parallel(BM, Dv):
                acc_o[i, k] = T.if_then_else(l_sum[i] == 0, 0, acc_o[i, k] / l_sum[i])
            T.copy(acc_o, O_s)
            for g in T.unroll(G):
                T.copy(O_s[g * BT:(g + 1) * BT, :], O[bz, t0:t0 + BT, by * G + g, :], disable_tma=True)
            for i in T.Parallel(BM):
                if t0 + i % BT < Tn if RG == BM else (t0 + i % BT < Tn) & (i < RG):
                    LSE[bz, t0 + i % BT, by * G + i // BT] = T.if_then_else(
                        l_sum[i] == 0, -T.infinity(acc), (T.log2(l_sum[i]) + m_cur[i] * scale2) * _LN2)

    return main
