"""Sliding-window causal attention backward (NSA sliding-window branch), TileLang.

Query t sees keys s with max(t - window, SeqStart[t] - 1) < s <= t (SeqStart [B,T] int32: the first
token of t's sequence, 0 for a batch; a packed batch runs in one launch, as in the forward); GQA:
query head hq uses KV head hq // G.
Layouts (contiguous, row-major), B and T dynamic; P = exp(scale*q.k - LSE):

  part "dq"   (Q, K, V, O, dO, LSE, DLSE, SeqStart, dQ, Delta)
      Q [B,T,HQ,Dk], K [B,T,H,Dk], V [B,T,H,Dv], O [B,T,HQ,Dv], dO [B,T,HQ,Dv]   dtype
      LSE, DLSE [B,T,HQ] float32;   dQ [B,T,HQ,Dk] dtype (out);   Delta [B,T,HQ] float32 (out)
      Delta = rowsum(dO*O) - DLSE (folds the lse gradient in);  dS = P * (dO V^T - Delta);
      dQ = scale * dS K.
  part "dkdv" (Q, K, V, dO, LSE, Delta, SeqStart, dK, dV)
      dK [B,T,H,Dk], dV [B,T,H,Dv] dtype (out);  summed over the G query heads of the group:
      dK = scale * sum_g dS_g^T Q_g,  dV = sum_g P_g^T dO_g.
Rows past T get P = 0: zero gradient, never NaN (every query sees its own key, so a visible
pair's LSE is finite; dq also guards LSE = -inf).
Deterministic: no atomics, every output element is written once by one program.

Schedule.  "dq" is query-major like the forward: one program = block_M query tokens of one
query head (head on the fastest grid axis so a group's heads share K/V tiles in L2).  It
first reduces Delta for its rows (O and dO read from global), then walks the block_N key
tiles intersecting [t0 - window + 1, t0 + block_M - 1]: S = Q K^T (the band mask replaces
the logits outside it by -inf), dP = dO V^T, dS = exp2(S*scale*log2e - LSE*log2e) * (dP -
Delta) in registers, dQ += dS K (WGMMA with dS as the register A operand); dQ is scaled and
written once, through shared memory.
"dkdv" is key-major: one program = block_N keys of one KV head, K/V resident in shared memory,
dK/dV accumulated in fp32 registers.  It walks a flat pipelined loop over (query tile, head):
the block_M query tiles intersecting [s0, s0 + block_N - 1 + window - 1], and for each the G
heads of the group (heads inner).  It computes the transposed S^T = K Q^T and dP^T = V dO^T
so that P^T and dS^T come out in registers as the A operand of dV += P^T dO and dK += dS^T Q.
LSE and Delta come into registers per step (one value per query column); P^T = exp2(S^T *
scale*log2e - LSE*log2e), dS^T = P^T (dP^T - Delta). Steps whose queries all see all the
program's keys (most of them: the window is long against the tiles) skip the mask; the others
select masked entries to 0.
On sm_90a each pipelined loop becomes a 128-thread TMA producer warpgroup plus one consumer
warpgroup (WGMMA) per 64 program rows; the consumers get 240 registers.  On sm_80 use
num_stages=1 (multi-stage pipelining of these dynamic-bound loops does not lower there).
"""

import dataclasses

import tilelang.language as T

from ._problem import check_problem

_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class WindowAttentionBwdConfig:
    heads_q: int = 64          # HQ
    heads_kv: int = 4          # H
    head_dim_qk: int = 128     # Dk
    head_dim_v: int = 128      # Dv
    window: int = 512          # w >= 1
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"    # "float16" | "bfloat16"
    part: str = "dq"           # "dq" | "dkdv": which kernel build() returns
    # schedule.  block_M counts query rows, block_N key rows, in both parts:
    #   dq:   block_M query rows per program (WGMMA M), block_N keys per pipelined step
    #   dkdv: block_N keys per program (WGMMA M),       block_M query rows per pipelined step
    block_M: int = 0           # 0 = auto: dq 128; dkdv 64 if Dk+Dv <= 256, 32 if <= 320, else 16
    block_N: int = 0           # 0 = auto: dq 64;  dkdv 128
    threads: int = 256         # consumer threads = 128 per 64 program rows (dq: block_M*2,
                               # dkdv: block_N*2); on sm90 a 128-thread TMA producer is added
    num_stages: int = 2        # smem ring depth of the streamed (pipelined) tiles
    fast_math: bool = True     # compile with TileLang's fast-math pass config (ex2.approx)
    async_mma: bool = False    # dkdv: issue S^T with dP^T (then dV) as async WGMMA, overlapping
                               # P^T = exp2(..) with dP^T and dS^T with dV (sm90)
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)


def _tiles(cfg):
    """(program rows, streamed rows per pipelined step) with 0 = auto resolved."""
    if cfg.part == "dq":
        return cfg.block_M or 128, cfg.block_N or 64
    d = cfg.head_dim_qk + cfg.head_dim_v
    auto_m = 64 if d <= 256 else (32 if d <= 320 else 16)
    return cfg.block_N or 128, cfg.block_M or auto_m


def _regs(cfg):
    """Accumulator registers per consumer thread: each 128-thread warpgroup owns 64 rows."""
    _, step = _tiles(cfg)
    if cfg.part == "dq":
        # dQ (fp32) + S, dP (fp32) + dS (16 bit)
        return (cfg.head_dim_qk + step * 2.5) / 2
    # dK, dV (fp32) + S^T, dP^T (fp32) + P^T or dS^T (16 bit; not live together)
    return (cfg.head_dim_qk + cfg.head_dim_v + step * 2.5) / 2


def _smem_bytes(cfg):
    # The output staging tile (dQ, resp. dK then dV) reuses the space of the Q (resp. K/V)
    # tile, which is dead after the loop (TileLang merges them).
    rows, step = _tiles(cfg)
    dk, dv = cfg.head_dim_qk, cfg.head_dim_v
    fixed = rows * (dk + dv) * 2            # dq: Q + dO;  dkdv: K + V
    ring = cfg.num_stages * step * (dk + dv) * 2   # dq: K/V ring;  dkdv: Q/dO ring
    return fixed + ring + 1024


def check_config(cfg) -> None:
    """Raise ValueError naming the offending field if build(cfg) can't work."""
    check_problem(cfg, parts=("dq", "dkdv"))
    if not isinstance(cfg.window, int) or not (1 <= cfg.window <= 1 << 30):
        raise ValueError("window: must be an int in [1, 2**30]")
    if cfg.block_M not in (0, 16, 32, 48, 64, 96, 128):
        raise ValueError("block_M: must be 0 (auto), 16, 32, 48, 64, 96 or 128")
    if cfg.block_N not in (0, 16, 32, 48, 64, 96, 128):
        raise ValueError("block_N: must be 0 (auto), 16, 32, 48, 64, 96 or 128")
    if cfg.threads not in (128, 256):
        raise ValueError("threads: must be 128 or 256")
    rows, step = _tiles(cfg)
    name_rows, name_step = ("block_M", "block_N") if cfg.part == "dq" else ("block_N", "block_M")
    # WGMMA: each consumer warpgroup (128 threads) owns 64 rows of the program tile.
    if rows not in (64, 128):
        raise ValueError(f"{name_rows}: rows per program must be 64 or 128 ({cfg.part})")
    if rows != cfg.threads // 2:
        raise ValueError(f"threads: {name_rows} = {rows} needs threads = {rows * 2} "
                         "(one 128-thread warpgroup per 64 rows)")
    if not (1 <= cfg.num_stages <= 4):
        raise ValueError("num_stages: must be in 1..4")
    if cfg.async_mma and cfg.part != "dkdv":
        raise ValueError("async_mma: only the dkdv part has an async WGMMA schedule")
    # sm90 consumers get 240 registers (setmaxnreg); leave room for addresses and indices.
    if _regs(cfg) > 224:
        raise ValueError(f"{name_step}: accumulators need ~{_regs(cfg):.0f} registers per thread "
                         f"(> 224) at head_dim_qk={cfg.head_dim_qk}, head_dim_v={cfg.head_dim_v}")
    if _smem_bytes(cfg) > cfg.smem_block:
        raise ValueError(f"num_stages: shared memory for these tiles/num_stages exceeds the arch's {cfg.smem_block // 1024} KiB")


def pass_configs(cfg) -> dict:
    """TileLang pass configs this kernel is compiled with."""
    return {"tl.enable_fast_math": bool(cfg.fast_math)}


def build(cfg):
    """Return the (uncompiled) T.prim_func for cfg.part (see the module docstring)."""
    check_config(cfg)
    if cfg.part == "dq":
        return _build_dq(cfg)
    return _build_dkdv(cfg)


def _build_dq(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv, W = cfg.head_dim_qk, cfg.head_dim_v, cfg.window
    bm, bn = _tiles(cfg)
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    sc2 = sc * _LOG2E
    ninf = -T.infinity(acc)
    pinf = T.infinity(acc)
    n_chunks = (Dv + bn - 1) // bn  # Delta is reduced bn columns at a time in the dP fragment

    B, S = T.dynamic("B, T")

    @T.prim_func
    def window_attention_bwd_dq(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        O: T.Tensor([B, S, HQ, Dv], dtype),
        dO: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
        DLSE: T.Tensor([B, S, HQ], acc),
        SeqStart: T.Tensor([B, S], "int32"),
        dQ: T.Tensor([B, S, HQ, Dk], dtype),
        Delta: T.Tensor([B, S, HQ], acc),
    ):
        with T.Kernel(HQ, T.ceildiv(S, bm), B, threads=cfg.threads) as (hq, mt, b):
            Q_s = T.alloc_shared([bm, Dk], dtype)
            dO_s = T.alloc_shared([bm, Dv], dtype)
            K_s = T.alloc_shared([bn, Dk], dtype)
            V_s = T.alloc_shared([bn, Dv], dtype)
            dQ_s = T.alloc_shared([bm, Dk], dtype)
            acc_s = T.alloc_fragment([bm, bn], acc)
            acc_dp = T.alloc_fragment([bm, bn], acc)
            ds = T.alloc_fragment([bm, bn], dtype)
            acc_dq = T.alloc_fragment([bm, Dk], acc)
            lse2 = T.alloc_fragment([bm], acc)
            delta = T.alloc_fragment([bm], acc)
            lo = T.alloc_fragment([bm], "int32")

            h = hq // G
            t0 = mt * bm
            # Row i sees keys lo[i] <= s <= t0 + i (its window cut at its sequence's start).
            for i in T.Parallel(bm):
                lo[i] = T.max(t0 + i - W + 1, SeqStart[b, T.min(t0 + i, S - 1)])
            k_lo = T.max(t0 - W + 1, SeqStart[b, t0]) // bn
            k_hi = T.ceildiv(T.min(t0 + bm, S), bn)

            T.copy(Q[b, t0:t0 + bm, hq, :], Q_s)
            T.copy(dO[b, t0:t0 + bm, hq, :], dO_s)

            # Delta = rowsum(dO * O) - DLSE, reduced in the dP fragment so delta's rows
            # match the S/dP rows each thread owns in the loop.  O and dO are read
            # from global here (the TMA load of dO_s is only awaited inside the loop).
            # Rows past T: Delta 0, lse2 = +inf (P = exp2(-inf) = 0), as for lse = -inf.
            # Guarded loads also clamp the row, so they stay in bounds whatever order
            # the condition is evaluated in.
            T.fill(acc_dp, 0)
            for c in T.unroll(n_chunks):
                for i, j in T.Parallel(bm, bn):
                    if c * bn + j < Dv:
                        acc_dp[i, j] += T.if_then_else(
                            t0 + i < S,
                            T.cast(O[b, T.min(t0 + i, S - 1), hq, c * bn + j], acc)
                            * T.cast(dO[b, T.min(t0 + i, S - 1), hq, c * bn + j], acc),
                            0)
            T.reduce_sum(acc_dp, delta, dim=1)
            for i in T.Parallel(bm):
                delta[i] = delta[i] - T.if_then_else(t0 + i < S, DLSE[b, T.min(t0 + i, S - 1), hq], 0)
                lse2[i] = T.if_then_else(
                    t0 + i < S,
                    T.if_then_else(LSE[b, T.min(t0 + i, S - 1), hq] == ninf, pinf,
                                   LSE[b, T.min(t0 + i, S - 1), hq] * _LOG2E),
                    pinf)
            T.fill(acc_dq, 0)

            for kk in T.Pipelined(k_hi - k_lo, num_stages=cfg.num_stages):
                kt = k_lo + kk
                T.copy(K[b, kt * bn:(kt + 1) * bn, h, :], K_s)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                # the band mask replaces the logits outside it (a NaN key there stays out of S)
                for i, j in T.Parallel(bm, bn):
                    acc_s[i, j] = T.if_then_else(
                        (kt * bn + j <= t0 + i) & (kt * bn + j >= lo[i]), acc_s[i, j], ninf)
                T.copy(V[b, kt * bn:(kt + 1) * bn, h, :], V_s)
                T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullRow,
                       clear_accum=True)
                for i, j in T.Parallel(bm, bn):
                    ds[i, j] = T.exp2(acc_s[i, j] * sc2 - lse2[i]) * (acc_dp[i, j] - delta[i])
                T.gemm(ds, K_s, acc_dq, policy=T.GemmWarpPolicy.FullRow)

            for i, d in T.Parallel(bm, Dk):
                acc_dq[i, d] = acc_dq[i, d] * sc
            T.copy(acc_dq, dQ_s)
            T.copy(dQ_s, dQ[b, t0:t0 + bm, hq, :])
            for i in T.Parallel(bm):
                if t0 + i < S:
                    Delta[b, t0 + i, hq] = delta[i]

    return window_attention_bwd_dq


def _build_dkdv(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv, W = cfg.head_dim_qk, cfg.head_dim_v, cfg.window
    bn, bm = _tiles(cfg)  # bn keys per program, bm query rows per step
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    sc2 = sc * _LOG2E

    B, S = T.dynamic("B, T")

    @T.prim_func
    def window_attention_bwd_dkdv(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        dO: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
        Delta: T.Tensor([B, S, HQ], acc),
        SeqStart: T.Tensor([B, S], "int32"),
        dK: T.Tensor([B, S, H, Dk], dtype),
        dV: T.Tensor([B, S, H, Dv], dtype),
    ):
        with T.Kernel(T.ceildiv(S, bn), H, B, threads=cfg.threads) as (nt, h, b):
            K_s = T.alloc_shared([bn, Dk], dtype)
            V_s = T.alloc_shared([bn, Dv], dtype)
            if cfg.async_mma:
                # One pipelined buffer for Q | dO: the pipeline frees a stage after its last
                # reader, which must be the synchronous dK gemm, not an async one still reading.
                QdO_s = T.alloc_shared([bm, Dk + Dv], dtype)
            else:
                Q_s = T.alloc_shared([bm, Dk], dtype)
                dO_s = T.alloc_shared([bm, Dv], dtype)
            dK_s = T.alloc_shared([bn, Dk], dtype)
            dV_s = T.alloc_shared([bn, Dv], dtype)
            acc_st = T.alloc_fragment([bn, bm], acc)
            acc_dpt = T.alloc_fragment([bn, bm], acc)
            pt = T.alloc_fragment([bn, bm], dtype)
            dst = T.alloc_fragment([bn, bm], dtype)
            acc_dk = T.alloc_fragment([bn, Dk], acc)
            acc_dv = T.alloc_fragment([bn, Dv], acc)
            lse_v = T.alloc_fragment([bm], acc)
            dlt_v = T.alloc_fragment([bm], acc)
            lo_v = T.alloc_fragment([bm], "int32")
            hi_v = T.alloc_fragment([bm], "int32")

            s0 = nt * bn
            # query tiles intersecting [s0, s0 + bn - 1 + W - 1], clipped to T
            q_lo = s0 // bm
            n_q = T.ceildiv(T.min(s0 + bn + W - 1, S), bm) - q_lo

            T.copy(K[b, s0:s0 + bn, h, :], K_s)
            T.copy(V[b, s0:s0 + bn, h, :], V_s)
            T.fill(acc_dk, 0)
            T.fill(acc_dv, 0)

            # Heads inner (G is a power of two: no runtime division), query tiles outer.
            for it in T.Pipelined(G * n_q, num_stages=cfg.num_stages):
                hq = h * G + it % G
                q0 = (q_lo + it // G) * bm
                if cfg.async_mma:
                    T.copy(Q[b, q0:q0 + bm, hq, :], QdO_s[:, 0:Dk])
                    T.copy(dO[b, q0:q0 + bm, hq, :], QdO_s[:, Dk:Dk + Dv])
                else:
                    T.copy(Q[b, q0:q0 + bm, hq, :], Q_s)
                    T.copy(dO[b, q0:q0 + bm, hq, :], dO_s)
                # LSE (pre-scaled to log2) and Delta per query (= per column), read into registers
                # before the gemms so that their latency hides behind them; the index is clamped in
                # bounds and queries past T are masked below.
                # Key s0+i reaches query q0+j iff lo_v[j] <= s0+i <= hi_v[j]: its window cut at its
                # sequence's start, and nothing for a query past T.
                for j in T.Parallel(bm):
                    lse_v[j] = LSE[b, T.min(q0 + j, S - 1), hq] * _LOG2E
                    dlt_v[j] = Delta[b, T.min(q0 + j, S - 1), hq]
                    lo_v[j] = T.max(q0 + j - W + 1, SeqStart[b, T.min(q0 + j, S - 1)])
                    hi_v[j] = T.if_then_else(q0 + j < S, q0 + j, -1)
                # A step is interior when every query of it sees every key of the tile: the first
                # query is past the last key, the last query's window reaches the first key, no
                # query is past T, and the last query's sequence began at or before the first key
                # (sequence starts rise with t). Only the other steps pay for the mask; masked
                # entries are selected (never multiplied) to 0, so a NaN/Inf of a key or query
                # outside stays out. The async_mma schedule masks every step: with an unmasked
                # branch beside the masked one, nvcc copied an S^T register while dP^T was in
                # flight, and ptxas serialized the WGMMA (C7517).
                interior = False if cfg.async_mma else (
                    (q0 >= s0 + bn - 1) & (q0 + bm - W <= s0) & (q0 + bm <= S)
                    & (SeqStart[b, T.min(q0 + bm, S) - 1] <= s0))
                if cfg.async_mma:
                    # clear_accum, not a fill: register writes between the two issues make ptxas
                    # wait for the first before the second (C7517)
                    T.wgmma_gemm(K_s, QdO_s[:, 0:Dk], acc_st, transpose_B=True, clear_accum=True,
                                 policy=T.GemmWarpPolicy.FullRow)
                    T.wgmma_gemm(V_s, QdO_s[:, Dk:Dk + Dv], acc_dpt, transpose_B=True, clear_accum=True,
                                 policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(1)   # S^T done; dP^T runs on
                else:
                    T.gemm(K_s, Q_s, acc_st, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                    T.gemm(V_s, dO_s, acc_dpt, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                if interior:
                    for i, j in T.Parallel(bn, bm):
                        acc_st[i, j] = T.exp2(acc_st[i, j] * sc2 - lse_v[j])
                else:
                    # two compares joined by `&` (`and`-ed ones compiled to branches)
                    for i, j in T.Parallel(bn, bm):
                        acc_st[i, j] = T.if_then_else((s0 + i <= hi_v[j]) & (s0 + i >= lo_v[j]),
                                                      T.exp2(acc_st[i, j] * sc2 - lse_v[j]), 0)
                T.copy(acc_st, pt)
                if cfg.async_mma:
                    T.wgmma_gemm(pt, QdO_s[:, Dk:Dk + Dv], acc_dv, policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(1)   # dP^T done; dV runs on
                else:
                    T.gemm(pt, dO_s, acc_dv, policy=T.GemmWarpPolicy.FullRow)
                # dS^T selected to 0 where masked too: P^T = 0 there, but a query's NaN Delta (a NaN in
                # its q / dO) times that 0 would reach keys it cannot see
                if interior:
                    for i, j in T.Parallel(bn, bm):
                        dst[i, j] = acc_st[i, j] * (acc_dpt[i, j] - dlt_v[j])
                else:
                    for i, j in T.Parallel(bn, bm):
                        dst[i, j] = T.if_then_else((s0 + i <= hi_v[j]) & (s0 + i >= lo_v[j]),
                                                   acc_st[i, j] * (acc_dpt[i, j] - dlt_v[j]), 0)
                if cfg.async_mma:   # synchronous: waits for dV too, so the stage is free after it
                    T.gemm(dst, QdO_s[:, 0:Dk], acc_dk, policy=T.GemmWarpPolicy.FullRow)
                else:
                    T.gemm(dst, Q_s, acc_dk, policy=T.GemmWarpPolicy.FullRow)

            for i, d in T.Parallel(bn, Dk):
                acc_dk[i, d] = acc_dk[i, d] * sc
            T.copy(acc_dk, dK_s)
            T.copy(dK_s, dK[b, s0:s0 + bn, h, :])
            T.copy(acc_dv, dV_s)
            T.copy(dV_s, dV[b, s0:s0 + bn, h, :])

    return window_attention_bwd_dkdv
