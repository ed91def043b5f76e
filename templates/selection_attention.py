"""NSA selection-branch attention forward (group-centric), TileLang.

Layouts (contiguous, row-major), B and T dynamic:
    Q            [B, T, HQ, Dk]  dtype
    K            [B, T, H,  Dk]  dtype
    V            [B, T, H,  Dv]  dtype
    BlockIndices [B, T, H, top_n] int32, selection block ids j >= 0, or -1 = pad
    O            [B, T, HQ, Dv]  dtype   (output)
    LSE          [B, T, HQ]      float32 (output, natural-log logsumexp of scale*q.k)
Block j covers keys [j*block, (j+1)*block); query t sees the keys s <= t of each
selected block.  No visible key at all -> o = 0, lse = -inf.

Schedule: one program per (token t, kv head h, batch b).  The G = HQ/H query
heads of the group form the M dimension of the GEMMs (padded to 16 rows, the
mma.sync minimum; padded rows are zero queries and are never stored), so each
selected K/V block is read once for the whole group.  The main loop walks the
top_n slots with a static trip count as a `num_stages`-deep cp.async software
pipeline (block i+1.. loads in flight while block i is computed); GEMMs are
mma.sync (M = 16/32 rows is below WGMMA's 64).
"""

import dataclasses

import tilelang.language as T

from ._problem import check_problem

_SMEM_LIMIT = 227 * 1024


@dataclasses.dataclass(frozen=True)
class SelectionAttentionConfig:
    heads_q: int = 64          # HQ
    heads_kv: int = 4          # H
    head_dim_qk: int = 128     # Dk
    head_dim_v: int = 128      # Dv
    block: int = 64           # selection block size bs
    top_n: int = 16           # selected blocks per (token, kv head)
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"    # "float16" | "bfloat16"
    # schedule
    threads: int = 128         # 32..256; warps split the key/feature (N) dims
    num_stages: int = 2        # K/V block ring depth
    min_blocks_per_sm: int = 0 # __launch_bounds__ occupancy hint; 0 = as many as smem fits


def _rows(cfg):
    return max(16, cfg.heads_q // cfg.heads_kv)


def _p_in_regs(cfg):
    # With more warps than 16-row slabs, warps split the key columns of S but
    # each needs whole P rows as the A operand of P @ V, so P must go through
    # shared memory; otherwise it stays in registers.
    return cfg.threads // 32 <= _rows(cfg) // 16


def _smem_bytes(cfg):
    e = 2
    m = _rows(cfg)
    qo = m * max(cfg.head_dim_qk, cfg.head_dim_v) * e  # O tile reuses Q's space
    p = 0 if _p_in_regs(cfg) else m * cfg.block * e
    kv = cfg.num_stages * cfg.block * (cfg.head_dim_qk + cfg.head_dim_v) * e
    return qo + p + kv + 1024  # + cross-warp reduce scratch


def _min_blocks(cfg):
    if cfg.min_blocks_per_sm:
        return cfg.min_blocks_per_sm
    # Auto: as many programs per SM as shared memory allows (228 KiB per SM).
    return max(1, min(4, (228 * 1024) // _smem_bytes(cfg)))


def check_config(cfg) -> None:
    """Raise ValueError naming the offending field if build(cfg) can't work."""
    check_problem(cfg)
    if cfg.block not in (32, 64, 128):
        raise ValueError("block: must be 32, 64 or 128")
    if not (1 <= cfg.top_n <= 256):
        raise ValueError("top_n: must be in 1..256")
    if cfg.threads not in (32, 64, 128, 256):
        raise ValueError("threads: must be 32, 64, 128 or 256")
    warps = cfg.threads // 32
    m = _rows(cfg)
    # FullRow policy: warps first split the M rows (16 each), then the N dim;
    # every warp needs >= 8 columns of both the S = QK^T tile and the O tile.
    n_split = max(1, warps // (m // 16))
    if cfg.block // n_split < 8 or cfg.head_dim_v // n_split < 8:
        raise ValueError("threads: too many warps for this block / head_dim_v")
    if not (1 <= cfg.num_stages <= 4):
        raise ValueError("num_stages: must be in 1..4")
    if not (0 <= cfg.min_blocks_per_sm <= 8):
        raise ValueError("min_blocks_per_sm: must be in 0..8")
    if _smem_bytes(cfg) > _SMEM_LIMIT:
        raise ValueError("num_stages: shared memory for block/head dims/num_stages exceeds 227 KiB")


def build(cfg):
    """Return the (uncompiled) T.prim_func (Q, K, V, BlockIndices, O, LSE)."""
    check_config(cfg)
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    M = _rows(cfg)
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    BS, NSEL = cfg.block, cfg.top_n
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    p_in_regs = _p_in_regs(cfg)
    # K/V block loads go through cp.async (multi-stage software pipeline), not
    # TMA: with TMA TileLang warp-specializes this loop, and on H100 that
    # variant gave rare non-deterministic wrong rows (run-to-run differences,
    # lse off by up to ~1e-2) that the cp.async pipeline never showed.  It was
    # also only ~6% faster.
    copy_ann = {"disable_tma": True}
    min_blocks = _min_blocks(cfg)
    ninf = -T.infinity(acc)

    B, S = T.dynamic("B, T")

    @T.prim_func
    def selection_attention_fwd(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        BlockIndices: T.Tensor([B, S, H, NSEL], "int32"),
        O: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
    ):
        # Token on grid x: T can exceed the 65535 limit of grid y/z.
        with T.Kernel(S, H, B, threads=cfg.threads) as (t, h, b):
            Q_s = T.alloc_shared([M, Dk], dtype)
            K_s = T.alloc_shared([BS, Dk], dtype)
            V_s = T.alloc_shared([BS, Dv], dtype)
            O_s = T.alloc_shared([M, Dv], dtype)
            acc_s = T.alloc_fragment([M, BS], acc)
            if p_in_regs:
                p = T.alloc_fragment([M, BS], dtype)
            else:
                p = T.alloc_shared([M, BS], dtype)
            acc_o = T.alloc_fragment([M, Dv], acc)
            m = T.alloc_fragment([M], acc)
            m_prev = T.alloc_fragment([M], acc)
            alpha = T.alloc_fragment([M], acc)
            ms = T.alloc_fragment([M], acc)
            rsum = T.alloc_fragment([M], acc)
            l = T.alloc_fragment([M], acc)
            # Latency bound: several programs per SM hide the gather latency, so
            # ask ptxas to fit min_blocks of them (caps registers), and keep any
            # warp-specialized lowering from raising registers via setmaxnreg.
            T.no_set_max_nreg()
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)
            # Plain (non-TMA) load of the 16..32 query rows, padding rows zeroed
            # so they stay finite.  It is tiny, and a synchronous load can't be
            # left in flight when the program ends.
            for i, d in T.Parallel(M, Dk):
                Q_s[i, d] = T.if_then_else(i < G, Q[b, t, h * G + i, d], T.cast(0, dtype))
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, ninf)

            # Static trip count over all top_n slots.  An unusable slot (pad -1
            # or a block starting after t) still runs, but loads the block
            # holding t (always valid, L2-hot) and is fully masked, so it adds
            # nothing.  This keeps the loop free of data-dependent control flow
            # (TileLang's pipeliner needs a uniform body).
            for it in T.Pipelined(NSEL, num_stages=cfg.num_stages):
                j = BlockIndices[b, t, h, it]
                ok = (j >= 0) and (j * BS <= t)
                jl = T.if_then_else(ok, j, t // BS)
                T.copy(K[b, jl * BS:(jl + 1) * BS, h, :], K_s, annotations=copy_ann)
                # Causal mask only bites in the block holding t; folding it into
                # the accumulator init costs nothing extra.
                for i, c in T.Parallel(M, BS):
                    acc_s[i, c] = T.if_then_else(ok and (jl * BS + c <= t), 0, ninf)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)

                T.copy(m, m_prev)
                T.reduce_max(acc_s, m, dim=1, clear=True)
                for i in T.Parallel(M):
                    m[i] = T.max(m[i], m_prev[i])
                # Rows stay at m = -inf until the first usable slot; exponentiate
                # against 0 then so no (-inf) - (-inf) = NaN appears.
                # T.__exp is __expf (ex2.approx), fast even without fast-math.
                for i in T.Parallel(M):
                    ms[i] = T.if_then_else(m[i] == ninf, 0, m[i] * sc)
                    alpha[i] = T.__exp(m_prev[i] * sc - ms[i])
                for i, c in T.Parallel(M, BS):
                    acc_s[i, c] = T.__exp(acc_s[i, c] * sc - ms[i])
                T.reduce_sum(acc_s, rsum, dim=1)
                for i in T.Parallel(M):
                    l[i] = l[i] * alpha[i] + rsum[i]
                T.copy(acc_s, p)
                for i, d in T.Parallel(M, Dv):
                    acc_o[i, d] *= alpha[i]
                T.copy(V[b, jl * BS:(jl + 1) * BS, h, :], V_s, annotations=copy_ann)
                T.gemm(p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            # No usable slot leaves l == 0: write o = 0, lse = -inf.
            for i, d in T.Parallel(M, Dv):
                acc_o[i, d] = T.if_then_else(l[i] > 0, acc_o[i, d] / l[i], 0)
            T.copy(acc_o, O_s)
            T.copy(O_s[0:G, :], O[b, t, h * G:(h + 1) * G, :])
            for i in T.Parallel(M):
                if i < G:
                    LSE[b, t, h * G + i] = T.if_then_else(
                        l[i] > 0, m[i] * cfg.scale + T.log(l[i]), ninf)

    return selection_attention_fwd
