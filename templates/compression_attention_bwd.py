"""NSA compression-branch attention backward (TileLang template, two kernels).

Layouts (contiguous, row-major); B, T and N are dynamic, N >= 1 (the caller skips N = 0):
    Q     [B, T, HQ, Dk]  dtype        Kc   [B, N, H, Dk]  dtype     Vc [B, N, H, Dv] dtype
    O     [B, T, HQ, Dv]  dtype        dO   [B, T, HQ, Dv] dtype
    LSE   [B, T, HQ]      float32 (forward lse, natural log; -inf where no row is visible)
    DLSE  [B, T, HQ]      float32 (incoming gradient of lse)
    Delta [B, T, HQ]      float32 = sum_v dO*O - DLSE (written by "dq", read by "dkdv")
    dQ [B, T, HQ, Dk], dKc [B, N, H, Dk], dVc [B, N, H, Dv]: dtype, written once (no atomics).
    SeqStart, CmpStart [B, T] int32 ("dq"; as the forward's: a pack's token maps, 0 for a batch)
    RowFirst, RowEnd [N] int32 ("dkdv"): row c is visible to the tokens [RowFirst[c], RowEnd[c])
        (its sequence's tokens from the one that completes it; packing.compressed_row_spans)

Compressed row CmpStart[t] + c is block i = first_block + c of t's sequence, covering its tokens
[i*stride, i*stride + cmp_block); it is visible to query t iff i*stride + cmp_block - 1 <= t -
SeqStart[t] (for a batch: row c, token t).  GQA: query head hq reads kv head hq // G.  A packed
batch runs in one launch: tiles may straddle sequences, every (row, token) pair is masked by
sequence.
Math (FlashAttention-2): P = exp(scale*q.k - lse), dP = dO V^T, dS = P (dP - Delta),
dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO; fp32 accumulation, P and dS rounded to dtype
for the gemms.  Masked / padded / lse = -inf entries are selected to P = 0 (never NaN).

part "dq"   main(Q, Kc, Vc, O, dO, LSE, DLSE, SeqStart, CmpStart, dQ, Delta)
    Query-major, like the forward: the G heads of a KV group are packed head-major into the M
    rows of the tile (row r <-> token t0 + r % BT, head h*G + r // BT, BT = dq_block_M // G),
    so each K/V tile (TMA, warp-specialized pipeline) serves all G heads.  The program first
    forms Delta for its rows (writes it out), then walks the compressed-key tiles visible to its
    last token: S = Q K^T and dP = dO V^T (wgmma, smem operands), dS in registers, dQ += dS K
    (wgmma, dS from registers).  Q, dO and O come in once per program (16-byte SIMT copies, one
    per head); O is staged in the tile that later stages dQ.  Token tiles are launched last-first
    (heaviest first).
part "dkdv" main(Q, Kc, Vc, dO, LSE, Delta, RowFirst, RowEnd, dKcPart, dVcPart)
    dKcPart [S, B, N, H, Dk], dVcPart [S, B, N, H, Dv]: float32, S = kv_splits (see `splits`);
    the caller sums over S (a fixed order, so still deterministic) and rounds to dtype.
    Key-major: one program per (kv_block_N compressed rows, kv head, batch) keeps its K/V tile in
    smem and dK/dV in fp32 registers, and loops over every (block of kv_block_M query tokens,
    head g of the group) from the tile's first visible token to T: S^T = K Q^T, dP^T = V dO^T,
    P^T/dS^T go to smem (dtype), dV += P^T dO, dK += dS^T Q (wgmma, smem operands; with 256
    threads the two warpgroups split the query columns of S^T and the D columns of dK/dV).
    Q/dO blocks stream in by TMA (warp-specialized pipeline); LSE/Delta of the block are read by
    the consumers straight into registers before the gemms.  Grid (H, B, row tiles): the row tile is the slowest axis, so the
    heaviest tiles (early rows, seen by the most queries) start first.  Token blocks are walked
    from the end of the sequence backwards so that concurrently running tiles read the same
    Q/dO rows at about the same time (L2 reuse).
"""

from dataclasses import dataclass

import tilelang.language as T

from ._problem import check_problem

_LOG2E = 1.4426950408889634
_MAX_REGS = 200  # fp32 accumulator/tile registers per consumer thread we allow
_MAX_REGS_RS = 216  # the same with P^T / dS^T in registers (kv_regs): no smem tiles to stage them


@dataclass(frozen=True)
class CompressionAttentionBwdConfig:
    heads_q: int = 64           # HQ
    heads_kv: int = 4           # H
    dim_k: int = 128            # Dk
    dim_v: int = 128            # Dv
    cmp_block: int = 32         # l
    stride: int = 16            # d (d | l)
    first_block: int = 0        # f
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"     # "float16" | "bfloat16"
    part: str = "dq"            # "dq" | "dkdv"
    # schedule, part "dq"
    dq_block_M: int = 128       # tile rows = (dq_block_M // G) tokens x G heads
    dq_block_N: int = 0         # compressed keys per step; 0 = auto (64, or 32 if registers are short)
    dq_threads: int = 256       # consumer threads (128/256/384; one wgmma warpgroup per 64 rows)
    dq_num_stages: int = 2      # K/V smem pipeline depth
    # schedule, part "dkdv"
    kv_block_N: int = 64        # compressed rows per program (64: 2x more programs than 128 -> balance)
    kv_block_M: int = 64        # query tokens (one head) per pipelined step
    kv_threads: int = 256       # consumer threads (128 or 256)
    kv_num_stages: int = 2      # Q/dO smem pipeline depth
    kv_splits: int = 0          # programs per row tile, each over its own share of the tokens;
                                # 0 = auto: stride // 16 (so a program covers about as many
                                # (row, token) pairs as at stride 16; l=d=64 has 4x fewer rows)
    kv_regs: bool = False       # P^T / dS^T stay in registers as the A operand of dV/dK += .. (no
                                # smem round trip, no barrier between the warpgroups); needs each
                                # warpgroup to own 64 rows: kv_block_N = 64 * kv_threads / 128
    kv_async: bool = False      # issue S^T and dP^T (then dV and dK) back to back as async WGMMA and
                                # overlap P = exp2(..) with dP^T and dS^T with dV (needs kv_regs)
    fast_math: bool = False     # TileLang fast-math pass config (approximate exp2)
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)


def _G(cfg) -> int:
    return cfg.heads_q // cfg.heads_kv


def _dq_regs(cfg, bn) -> float:
    # dQ (fp32) + S, dP (fp32) + dS (16 bit) per consumer thread
    return cfg.dq_block_M * (cfg.dim_k + bn * 2.5) / cfg.dq_threads


def _dq_smem(cfg, bn) -> int:
    e = 2
    qdo = cfg.dq_block_M * (cfg.dim_k + cfg.dim_v) * e
    kv = bn * (cfg.dim_k + cfg.dim_v) * e * cfg.dq_num_stages
    x = cfg.dq_block_M * max(cfg.dim_k, cfg.dim_v) * e   # O tile, then the dQ staging tile
    return qdo + kv + x + 1024


def _dq_block_n(cfg) -> int:
    if cfg.dq_block_N:
        return cfg.dq_block_N
    for bn in (64, 32):
        if _dq_regs(cfg, bn) <= _MAX_REGS and _dq_smem(cfg, bn) <= cfg.smem_block:
            return bn
    return 16


def _kv_regs(cfg) -> float:
    # dK, dV (fp32) + S^T, dP^T (fp32) (+ P^T, dS^T in 16 bit with kv_regs)
    bn, bm = cfg.kv_block_N, cfg.kv_block_M
    return bn * (cfg.dim_k + cfg.dim_v + (3 if cfg.kv_regs else 2) * bm) / cfg.kv_threads


def _kv_smem(cfg) -> int:
    e = 2
    bn, bm = cfg.kv_block_N, cfg.kv_block_M
    kv = bn * (cfg.dim_k + cfg.dim_v) * e
    qdo = bm * (cfg.dim_k + cfg.dim_v) * e * cfg.kv_num_stages
    pds = 0 if cfg.kv_regs else 2 * bn * bm * e
    return kv + qdo + pds + 1024


def splits(cfg) -> int:
    """S, the leading dim of the dkdv partial outputs."""
    return cfg.kv_splits or max(1, cfg.stride // 16)


def pass_configs(cfg) -> dict:
    """TileLang pass configs this kernel is compiled with."""
    return {"tl.enable_fast_math": bool(cfg.fast_math)}


def check_config(cfg) -> None:
    """Raise ValueError (message starts with the offending field) for unbuildable configs."""
    check_problem(cfg, dk="dim_k", dv="dim_v", parts=("dq", "dkdv"))
    G = _G(cfg)
    if cfg.cmp_block <= 0 or cfg.stride <= 0 or cfg.cmp_block % cfg.stride != 0:
        raise ValueError("stride must divide cmp_block")
    if cfg.first_block < 0:
        raise ValueError("first_block must be >= 0")
    if cfg.part == "dq":
        if cfg.dq_threads not in (128, 256, 384):
            raise ValueError("dq_threads must be 128, 256 or 384")
        if cfg.dq_block_M % (64 * (cfg.dq_threads // 128)) != 0 or cfg.dq_block_M > 256:
            raise ValueError("dq_block_M must be a multiple of 64*dq_threads/128 and <= 256")
        if cfg.dq_block_M % G != 0:
            raise ValueError("dq_block_M must be a multiple of G = heads_q // heads_kv")
        if cfg.dq_block_N != 0 and (cfg.dq_block_N not in (16, 32, 64, 128) or cfg.dim_v % cfg.dq_block_N):
            raise ValueError("dq_block_N must be 0 (auto) or 16, 32, 64, 128 dividing dim_v")
        if not 1 <= cfg.dq_num_stages <= 4:
            raise ValueError("dq_num_stages must be in [1, 4]")
        bn = _dq_block_n(cfg)
        if _dq_regs(cfg, bn) > _MAX_REGS:
            raise ValueError("dq_block_M: dQ/S/dP tiles need too many registers for dq_threads")
        if _dq_smem(cfg, bn) > cfg.smem_block:
            raise ValueError(f"dq_num_stages: shared memory (Q, dO, dQ, pipelined K/V) exceeds the arch's {cfg.smem_block // 1024} KiB")
    else:
        if cfg.kv_threads not in (128, 256):
            raise ValueError("kv_threads must be 128 or 256")
        if cfg.kv_block_N not in (64, 128):
            raise ValueError("kv_block_N must be 64 or 128")
        nw = cfg.kv_threads // 128
        # wgmma: M = kv_block_N splits into 64-row warpgroups, the rest of the warpgroups split N
        split_n = max(1, nw // (cfg.kv_block_N // 64))
        if cfg.kv_block_M % (16 * split_n) != 0 or not (16 <= cfg.kv_block_M <= 256):
            raise ValueError("kv_block_M must be a multiple of 16 per N-split warpgroup, in [16, 256]")
        if not 1 <= cfg.kv_num_stages <= 4:
            raise ValueError("kv_num_stages must be in [1, 4]")
        if not 0 <= cfg.kv_splits <= 16:
            raise ValueError("kv_splits must be in [0, 16] (0 = auto)")
        if cfg.kv_regs and cfg.kv_block_N != 64 * nw:
            raise ValueError("kv_regs: each warpgroup must own 64 rows (kv_block_N = 64 * kv_threads / 128)")
        if cfg.kv_async and not cfg.kv_regs:
            raise ValueError("kv_async needs kv_regs (P^T / dS^T in registers)")
        if not cfg.kv_regs and splits(cfg) > 4:
            # TileLang 0.1.15's ThreadSync fails to lower the smem P^T / dS^T path then ("a required
            # shared-memory sync inside a divergent region with 4 participating threads")
            raise ValueError("kv_splits: at most 4 with P^T / dS^T in shared memory (kv_regs false)")
        if _kv_regs(cfg) > (_MAX_REGS_RS if cfg.kv_regs else _MAX_REGS):
            raise ValueError("kv_block_N: dK/dV/S/dP tiles need too many registers for kv_threads")
        if _kv_smem(cfg) > cfg.smem_block:
            raise ValueError(f"kv_num_stages: shared memory (K/V, pipelined Q/dO, P/dS) exceeds the arch's {cfg.smem_block // 1024} KiB")


def build(cfg: CompressionAttentionBwdConfig):
    """Return the (uncompiled) prim_func of cfg.part (see the module docstring for signatures)."""
    check_config(cfg)
    return _build_dq(cfg) if cfg.part == "dq" else _build_dkdv(cfg)


def _build_dq(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv = cfg.dim_k, cfg.dim_v
    l, d, f = cfg.cmp_block, cfg.stride, cfg.first_block
    BM, BN = cfg.dq_block_M, _dq_block_n(cfg)
    BT = BM // G
    dtype, acc = cfg.dtype, "float32"
    scale = float(cfg.scale)
    scale2 = scale * _LOG2E
    # query t sees rows c < nvis(t) = max(t + off, 0) // d (clamped to N)
    off = d - l - f * d + 1

    DX = max(Dk, Dv)
    B, Tn, N = T.dynamic("B, T, N")

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, Dk], dtype),
        Kc: T.Tensor([B, N, H, Dk], dtype),
        Vc: T.Tensor([B, N, H, Dv], dtype),
        O: T.Tensor([B, Tn, HQ, Dv], dtype),
        dO: T.Tensor([B, Tn, HQ, Dv], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
        DLSE: T.Tensor([B, Tn, HQ], acc),
        SeqStart: T.Tensor([B, Tn], "int32"),
        CmpStart: T.Tensor([B, Tn], "int32"),
        dQ: T.Tensor([B, Tn, HQ, Dk], dtype),
        Delta: T.Tensor([B, Tn, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(Tn, BT), H, B, threads=cfg.dq_threads) as (bx, by, bz):
            if cfg.kv_async:
                # One pipelined buffer for Q | dO: the pipeline frees a stage after its last
                # reader, and that must be a synchronous gemm (dK below), not an async one that
                # may still be reading when the producer refills the stage.
                QdO_s = T.alloc_shared([BM, Dk + Dv], dtype)
            else:
                Q_s = T.alloc_shared([BM, Dk], dtype)
                dO_s = T.alloc_shared([BM, Dv], dtype)
            K_s = T.alloc_shared([BN, Dk], dtype)
            V_s = T.alloc_shared([BN, Dv], dtype)
            X_s = T.alloc_shared([BM, DX], dtype)   # O tile, later the dQ staging tile
            dsum = T.alloc_fragment([BM], acc)
            acc_s = T.alloc_fragment([BM, BN], acc)
            acc_dp = T.alloc_fragment([BM, BN], acc)
            ds = T.alloc_fragment([BM, BN], dtype)
            acc_dq = T.alloc_fragment([BM, Dk], acc)
            lse2 = T.alloc_fragment([BM], acc)
            dlt = T.alloc_fragment([BM], acc)
            c_first = T.alloc_fragment([BM], "int32")
            c_end = T.alloc_fragment([BM], "int32")

            # heaviest (last) token tiles first
            t0 = (T.ceildiv(Tn, BT) - 1 - bx) * BT
            for g in T.unroll(G):
                T.copy(Q[bz, t0:t0 + BT, by * G + g, :], Q_s[g * BT:(g + 1) * BT, :], disable_tma=True,
                       coalesced_width=8)
                T.copy(dO[bz, t0:t0 + BT, by * G + g, :], dO_s[g * BT:(g + 1) * BT, :], disable_tma=True,
                       coalesced_width=8)
                T.copy(O[bz, t0:t0 + BT, by * G + g, :], X_s[g * BT:(g + 1) * BT, 0:Dv], disable_tma=True,
                       coalesced_width=8)

            # Delta = rowsum(dO * O) - DLSE, BN columns at a time through acc_dp (its wgmma
            # layout gives the row vectors the same layout the main loop uses); rows past T read 0
            T.fill(dlt, 0)
            for kc in T.serial(Dv // BN):
                for i, j in T.Parallel(BM, BN):
                    acc_dp[i, j] = T.cast(X_s[i, kc * BN + j], acc) * T.cast(dO_s[i, kc * BN + j], acc)
                T.reduce_sum(acc_dp, dsum, dim=1)
                for i in T.Parallel(BM):
                    dlt[i] = dlt[i] + dsum[i]
            for i in T.Parallel(BM):
                dlt[i] = dlt[i] - T.if_then_else(t0 + i % BT < Tn, DLSE[bz, t0 + i % BT, by * G + i // BT], 0)
                lse2[i] = T.if_then_else(t0 + i % BT < Tn, LSE[bz, t0 + i % BT, by * G + i // BT] * _LOG2E, 0)
                # row i (token t) sees rows [c_first, c_end) of its sequence; rows past T see nothing
                c_first[i] = CmpStart[bz, T.min(t0 + i % BT, Tn - 1)]
                c_end[i] = T.if_then_else(t0 + i % BT < Tn, T.min(c_first[i] + T.max(
                    t0 + i % BT - SeqStart[bz, T.min(t0 + i % BT, Tn - 1)] + off, 0) // d, N), 0)
            for i in T.Parallel(BM):
                if t0 + i % BT < Tn:
                    Delta[bz, t0 + i % BT, by * G + i // BT] = dlt[i]
            T.fill(acc_dq, 0)

            # rows from the first token's sequence start to the last token's newest visible one
            t_last = T.min(t0 + BT, Tn) - 1
            c_lo = CmpStart[bz, t0]
            c_hi = T.min(CmpStart[bz, t_last] + T.max(t_last - SeqStart[bz, t_last] + off, 0) // d, N)
            for kt in T.Pipelined(T.ceildiv(c_hi - c_lo, BN), num_stages=cfg.dq_num_stages):
                T.copy(Kc[bz, c_lo + kt * BN:c_lo + (kt + 1) * BN, by, :], K_s)
                T.copy(Vc[bz, c_lo + kt * BN:c_lo + (kt + 1) * BN, by, :], V_s)
                T.clear(acc_s)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.clear(acc_dp)
                T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                # select (never multiply) so exp2(+inf) of masked / lse=-inf entries becomes 0
                for i, j in T.Parallel(BM, BN):
                    ds[i, j] = T.if_then_else(
                        (c_lo + kt * BN + j >= c_first[i]) & (c_lo + kt * BN + j < c_end[i]),
                        T.exp2(acc_s[i, j] * scale2 - lse2[i]) * (acc_dp[i, j] - dlt[i]),
                        0,
                    )
                # OOB K rows are zero-filled by the bounded copy and their dS is 0
                T.gemm(ds, K_s, acc_dq, policy=T.GemmWarpPolicy.FullRow)

            for i, k in T.Parallel(BM, Dk):
                acc_dq[i, k] = acc_dq[i, k] * scale
            T.copy(acc_dq, X_s[:, 0:Dk])
            for g in T.unroll(G):
                T.copy(X_s[g * BT:(g + 1) * BT, 0:Dk], dQ[bz, t0:t0 + BT, by * G + g, :], disable_tma=True)

    return main


def _build_dkdv(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv = cfg.dim_k, cfg.dim_v
    BN, BM = cfg.kv_block_N, cfg.kv_block_M
    dtype, acc = cfg.dtype, "float32"
    scale = float(cfg.scale)
    scale2 = scale * _LOG2E
    S = splits(cfg)

    B, Tn, N = T.dynamic("B, T, N")

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, Dk], dtype),
        Kc: T.Tensor([B, N, H, Dk], dtype),
        Vc: T.Tensor([B, N, H, Dv], dtype),
        dO: T.Tensor([B, Tn, HQ, Dv], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
        Delta: T.Tensor([B, Tn, HQ], acc),
        RowFirst: T.Tensor([N], "int32"),
        RowEnd: T.Tensor([N], "int32"),
        dKcPart: T.Tensor([S, B, N, H, Dk], acc),
        dVcPart: T.Tensor([S, B, N, H, Dv], acc),
    ):
        # row tile slowest: the heaviest tiles (c0 small) are dispatched first
        with T.Kernel(H, B, T.ceildiv(N, BN) * S, threads=cfg.kv_threads) as (bx, by, bzs):
            K_s = T.alloc_shared([BN, Dk], dtype)
            V_s = T.alloc_shared([BN, Dv], dtype)
            if cfg.kv_async:
                # One pipelined buffer for Q | dO: the pipeline frees a stage after its last
                # reader, and that must be a synchronous gemm (dK below), not an async one that
                # may still be reading when the producer refills the stage.
                QdO_s = T.alloc_shared([BM, Dk + Dv], dtype)
            else:
                Q_s = T.alloc_shared([BM, Dk], dtype)
                dO_s = T.alloc_shared([BM, Dv], dtype)
            if cfg.kv_regs:   # P^T, dS^T: the A operands of dV / dK += .., in registers or in smem
                P_x = T.alloc_fragment([BN, BM], dtype)
                dS_x = T.alloc_fragment([BN, BM], dtype)
            else:
                P_x = T.alloc_shared([BN, BM], dtype)
                dS_x = T.alloc_shared([BN, BM], dtype)
            lse_v = T.alloc_fragment([BM], acc)
            dlt_v = T.alloc_fragment([BM], acc)
            acc_st = T.alloc_fragment([BN, BM], acc)
            acc_dpt = T.alloc_fragment([BN, BM], acc)
            acc_dk = T.alloc_fragment([BN, Dk], acc)
            acc_dv = T.alloc_fragment([BN, Dv], acc)
            row_first = T.alloc_fragment([BN], "int32")
            row_end = T.alloc_fragment([BN], "int32")
            bz = bzs // S
            sp = bzs % S
            c0 = bz * BN
            # The tile's tokens: from the one completing its first row to its last row's sequence
            # end (both rise with the row; for a batch: (f + c0) * d + l - 1 .. T).
            t_first = RowFirst[c0]
            t_end = T.min(RowEnd[T.min(c0 + BN, N) - 1], Tn)
            # This program's share of the tile's token blocks: [t_lo, t_hi).  It always runs at
            # least one (then fully masked) step, so its K/V loads are waited on before it exits.
            n_all = T.ceildiv(T.max(t_end - t_first, 0), BM)
            per = T.ceildiv(n_all, S)
            t_lo = t_first + sp * per * BM
            t_hi = T.min(t_first + (sp + 1) * per * BM, t_end)
            n_tb = T.max(T.min(per, n_all - sp * per), 1)

            T.copy(Kc[by, c0:c0 + BN, bx, :], K_s)
            T.copy(Vc[by, c0:c0 + BN, bx, :], V_s)
            # Row c0+i is seen by this program's tokens [row_first, row_end): its sequence's tokens
            # from the one completing it, cut to this split; a row past N by none. Two compares per
            # entry below: four `and`-ed ones compiled to 60% more branches.
            for i in T.Parallel(BN):
                row_first[i] = RowFirst[T.min(c0 + i, N - 1)]
                row_end[i] = T.if_then_else(c0 + i < N, T.min(RowEnd[T.min(c0 + i, N - 1)], t_hi), 0)
            T.fill(acc_dk, 0)
            T.fill(acc_dv, 0)

            # A step is interior when all its tokens see all the tile's rows: past the last row's
            # first token (rows complete in order) and before the first row's end (ends rise with
            # the row; in this split).  Rows past N see nothing, but their dK/dV are never written,
            # so they need no mask.  Only the other steps pay for the mask.
            first_all = RowFirst[T.min(c0 + BN, N) - 1]
            end_all = T.min(RowEnd[c0], t_hi)

            for it in T.Pipelined(n_tb * G, num_stages=cfg.kv_num_stages):
                # token blocks from the end backwards, the G heads of the group innermost
                t0 = t_lo + (n_tb - 1 - it // G) * BM
                hq = bx * G + it % G
                if cfg.kv_async:
                    T.copy(Q[by, t0:t0 + BM, hq, :], QdO_s[:, 0:Dk])
                    T.copy(dO[by, t0:t0 + BM, hq, :], QdO_s[:, Dk:Dk + Dv])
                else:
                    T.copy(Q[by, t0:t0 + BM, hq, :], Q_s)
                    T.copy(dO[by, t0:t0 + BM, hq, :], dO_s)
                # LSE / Delta for the BM columns: read by the consumer straight into registers
                # (issued before the gemms so their latency hides behind them); the index is
                # clamped in bounds and padded columns are masked below
                for j in T.Parallel(BM):
                    lse_v[j] = LSE[by, T.min(t0 + j, Tn - 1), hq] * _LOG2E
                    dlt_v[j] = Delta[by, T.min(t0 + j, Tn - 1), hq]
                if cfg.kv_async:
                    # clear_accum, not a fill: register writes between the two issues make ptxas
                    # wait for the first before the second (C7517)
                    T.wgmma_gemm(K_s, QdO_s[:, 0:Dk], acc_st, transpose_B=True, clear_accum=True,
                                 policy=T.GemmWarpPolicy.FullRow)
                    T.wgmma_gemm(V_s, QdO_s[:, Dk:Dk + Dv], acc_dpt, transpose_B=True, clear_accum=True,
                                 policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(1)
                else:
                    T.clear(acc_st)
                    T.clear(acc_dpt)
                    T.gemm(K_s, Q_s, acc_st, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    T.gemm(V_s, dO_s, acc_dpt, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                # visible: token t0+j in [row_first, row_end) of row c0+i.  Masked entries are
                # selected (never multiplied) to 0: a NaN/Inf of a token a row cannot see (its lse
                # or Delta) never reaches that row's dK/dV
                interior = (t0 >= first_all) & (t0 + BM <= end_all)
                if interior:
                    for i, j in T.Parallel(BN, BM):
                        acc_st[i, j] = T.exp2(acc_st[i, j] * scale2 - lse_v[j])
                else:
                    for i, j in T.Parallel(BN, BM):
                        acc_st[i, j] = T.if_then_else(
                            (row_first[i] <= t0 + j) & (t0 + j < row_end[i]),
                            T.exp2(acc_st[i, j] * scale2 - lse_v[j]), 0)
                T.copy(acc_st, P_x)
                if cfg.kv_async:
                    # dV queues behind dP^T; wait for dP^T only, dS^T then overlaps dV
                    T.wgmma_gemm(P_x, QdO_s[:, Dk:Dk + Dv], acc_dv, policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(1)
                else:
                    T.gemm(P_x, dO_s, acc_dv, policy=T.GemmWarpPolicy.FullRow)
                if interior:
                    for i, j in T.Parallel(BN, BM):
                        dS_x[i, j] = acc_st[i, j] * (acc_dpt[i, j] - dlt_v[j])
                else:
                    for i, j in T.Parallel(BN, BM):
                        dS_x[i, j] = T.if_then_else(
                            (row_first[i] <= t0 + j) & (t0 + j < row_end[i]),
                            acc_st[i, j] * (acc_dpt[i, j] - dlt_v[j]), 0)
                # synchronous (waits for dV too), so the stage is free once it returns
                if cfg.kv_async:
                    T.gemm(dS_x, QdO_s[:, 0:Dk], acc_dk, policy=T.GemmWarpPolicy.FullRow)
                else:
                    T.gemm(dS_x, Q_s, acc_dk, policy=T.GemmWarpPolicy.FullRow)

            for i, k in T.Parallel(BN, Dk):
                if c0 + i < N:
                    dKcPart[sp, by, c0 + i, bx, k] = acc_dk[i, k] * scale
            for i, k in T.Parallel(BN, Dv):
                if c0 + i < N:
                    dVcPart[sp, by, c0 + i, bx, k] = acc_dv[i, k]

    return main
