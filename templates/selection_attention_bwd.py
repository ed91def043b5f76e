"""NSA selection-branch attention backward, TileLang.  Three kernels (cfg.part).

Forward: templates/selection_attention.py.  Block j covers keys [j*block, (j+1)*block);
query t (all G = HQ/H heads of kv head h) sees the keys s <= t (s < T) of each block
selected in BlockIndices[b, t, h, :] (-1 = pad).  P = exp(scale*q.k - lse); a row with no
visible key has lse = -inf and gets zero gradients.  With Delta = rowsum(dO*O) - DLSE:
    dP = dO V^T,  dS = P (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO.
No atomics: every output element is written by exactly one program, sums run in a fixed order.

Layouts (contiguous, row-major); B, T (and P, U, NBU, NBG below) dynamic:
  part "dq"     (Q [B,T,HQ,Dk], K [B,T,H,Dk], V [B,T,H,Dv], O [B,T,HQ,Dv], dO [B,T,HQ,Dv],
                 LSE [B,T,HQ] f32, DLSE [B,T,HQ] f32, BlockIndices [B,T,H,top_n] int32,
                 SeqStart [B,T] int32 (block ids count from it, as in the forward),
                 dQ [B,T,HQ,Dk] dtype (out), Delta [B,T,HQ] f32 (out))
      Group-centric like the forward: one program per (token t, kv head h, batch b); the G
      query heads are the M rows (padded to 16).  Delta is computed first (fp32, from the
      dtype O and dO) and written out; then a num_stages-deep cp.async pipeline walks the
      top_n slots: S = Q K^T, dP = dO V^T, dS = P (dP - Delta) (masked), dQ += dS K (fp32
      registers), dQ written once.  Unusable slots load the block holding t, fully masked.
      tile_tokens = BT > 1 (token tile, as the forward's): one program per (BT consecutive
      tokens, kv head h, batch b), M = BT * G rows (64 or 128: WGMMA on sm90); the union of
      the tile's block lists forms in shared memory (templates/_token_tile.py) and each union
      block is loaded once (TMA) for all BT tokens; rows whose token did not choose a block get
      dS = 0 there (the logit is replaced), a block listed c > 1 times weighs c-fold as in the
      reference.  warp_skip (as the forward's): the token tile on mma.sync, one warp per 16 rows,
      a warp skipping the union blocks none of its tokens chose (MMA work of the tokens' own
      blocks only; K/V bytes still the union's).  Both schedules take K with its non-finite values zeroed (the op passes it): in
      dQ += dS K a NaN key a row must not see (a block only other tokens chose, a key after t in
      t's block) would reach it through 0 * NaN in the MMA; a row that does see it still gets NaN,
      through its forward lse (NaN), as in the reference.
  part "dkdv"   (Q, K, V, dO, LSE, Delta, TokIdx [P] int32, UnitBlock [U] int32,
                 UnitStart [U] int32, UnitEnd [U] int32, BlockRow0 [NBG] int32, BlockRowEnd [NBG] int32,
                 PartK [U, block, Dk] f32 (out), PartV [U, block, Dv] f32 (out))
      Blocks are those of each sequence (a pack's sequences tile from their own starts): block g
      holds keys [BlockRow0[g], BlockRowEnd[g]) (for a batch: g * block .. min((g+1) * block, T)).
      Key-major over a transposed map (block CSR, ops_backward.selection_block_units): the valid
      selections sorted by flat block id bid = (b*H + h)*NBG + g, then t;
      TokIdx[p] = t of entry p; unit u = entries [UnitStart[u], UnitEnd[u]) of block UnitBlock[u].
      One program per unit: K/V of the block (rows >= T zero) in smem, then a pipelined loop
      over chunks of chunk_rows // G tokens: gather their G query-head rows of Q, dO, LSE,
      Delta (cp.async; rows past the unit's end repeat its last token and are masked),
      S^T = K Q^T, dP^T = V dO^T (M = block rows, WGMMA on sm90 when block >= 64),
      dV += P^T dO, dK += dS^T Q in fp32 registers; all `block` rows of the unit's partial
      written to PartK[u], PartV[u] (exact zeros where no query sees a key).
  part "reduce" (PartK [U, block, Dk] f32, PartV [U, block, Dv] f32,
                 BlockUnitStart [B*H*NBG + 1] int32, BlockRow0 [NBG] int32, BlockRowEnd [NBG] int32,
                 dK [B,T,H,Dk] dtype (out), dV [B,T,H,Dv] dtype (out))
      One program per flat block id (grid NBG x H x B): sums units BlockUnitStart[bid] ..
      BlockUnitStart[bid+1]-1 in unit order (deterministic) and writes rows
      BlockRow0[g] .. BlockRowEnd[g]-1 of head h; a block without units writes zeros (the blocks
      partition the T rows).

Schedule fields (defaults):
  threads = 0            auto: dq 128, dkdv 256, reduce 256.
  num_stages = 0         auto: dq 2 (K/V slot ring); dkdv 1 (the gather of chunk i+1 is issued
                         right after chunk i's last use of each buffer).  dkdv > 1 pipelines
                         static groups of chunk_group chunks (TileLang 0.1.15 can't emit a
                         multi-stage cp.async epilogue for a dynamic trip count).
  chunk_rows = 0         dkdv GEMM N rows per chunk (= tokens per chunk * G, >= G); auto 64, or
                         32 where 64 would not let two programs share an SM.
  chunk_group = 4        dkdv with num_stages > 1 only.
  min_blocks_per_sm = 0  auto from smem and registers (dq 2; dkdv 2 when single-stage).
  tile_tokens = 1        dq only: 1 = per token; > 1 = token tile of that many tokens; 0 = auto
                         (64 // G tokens where G >= 8, else per token).
In dkdv, P^T / dS^T stay in registers as the A operand of the dV / dK GEMMs when all warps
split the block rows (block >= 16 * warps), else they go through one smem tile.
"""

import dataclasses

import tilelang.language as T

from ._problem import check_problem, warps_cover
from ._token_tile import union_builder, warp_uses_block

_PARTS = ("dq", "dkdv", "reduce")
_LOG2E = 1.4426950408889634
# dkdv with async_mma: setmaxnreg counts (consumer + producer = 256, so two programs of one consumer
# warpgroup share an SM's 64K registers) and what the consumer's fp32 / 16-bit tiles may take of it
_CONSUMER_REGS, _PRODUCER_REGS = 232, 24
_MAX_REGS_ASYNC = 208


@dataclasses.dataclass(frozen=True)
class SelectionAttentionBwdConfig:
    heads_q: int = 64          # HQ
    heads_kv: int = 4          # H
    head_dim_qk: int = 128     # Dk
    head_dim_v: int = 128      # Dv
    block: int = 64            # selection block size bs
    top_n: int = 16            # selected blocks per (token, kv head)
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"    # "float16" | "bfloat16"
    part: str = "dq"           # "dq" | "dkdv" | "reduce"
    # schedule
    threads: int = 0           # 0 = auto (dq 128, dkdv 128 or 256 by head dims, reduce 256)
    num_stages: int = 0        # 0 = auto (dq 2, dkdv 1); dq: K/V slot ring depth;
                               # dkdv: gathered Q/dO chunk ring depth (1 = next chunk's gather
                               # overlaps the current chunk after each buffer's last use)
    chunk_rows: int = 0        # dkdv: GEMM rows (tokens * G) per chunk; 0 = auto (64, or 32
                               # when two programs per SM would not fit 64 in smem)
    chunk_group: int = 4       # dkdv with num_stages > 1: chunks per static pipelined group
    min_blocks_per_sm: int = 0  # dq/dkdv __launch_bounds__ hint; 0 = auto
    async_mma: bool = False    # dkdv (sm90): one consumer warpgroup per 64 block rows fed by a TMA
                               # producer (each token's G query rows of Q | dO as one box), async
                               # WGMMA with P^T / dS^T in registers, two programs per SM
    tile_tokens: int = 1       # dq: tokens per program (1 = per token, > 1 = token tile over the
                               # union of their block lists, 0 = auto: 64 // G where G >= 8)
    warp_skip: bool = False    # dq token tile on mma.sync, one warp per 16 rows: a warp skips the
                               # union blocks none of its tokens chose (the forward's warp_skip)
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)


def _stages(cfg):
    if cfg.num_stages:
        return cfg.num_stages
    return 2 if cfg.part == "dq" or cfg.async_mma else 1


def _group(cfg):
    return cfg.heads_q // cfg.heads_kv


def _threads(cfg):
    if cfg.threads:
        return cfg.threads
    if cfg.part == "dq":
        return 128
    if cfg.part == "dkdv" and cfg.async_mma:
        return 128 * max(1, cfg.block // 64)   # one warpgroup per 64 block rows
    return 256


# ---------------------------------------------------------------- dq
def _dq_tile_tokens(cfg):
    if cfg.part != "dq":
        return 1
    if cfg.tile_tokens:
        return cfg.tile_tokens
    G = _group(cfg)
    if G >= 8 and 64 % G == 0 and _threads(cfg) >= 128 and (64 // G) * cfg.top_n <= 4 * _threads(cfg):
        return 64 // G
    return 1


def _dq_rows(cfg):
    bt = _dq_tile_tokens(cfg)
    # per token: the group padded to whole 16-row MMA slabs (G = 6 -> 16, 24 -> 32)
    return -(-_group(cfg) // 16) * 16 if bt == 1 else bt * _group(cfg)


def _dq_ds_in_regs(cfg):
    # dS is the A operand of dS @ K: each warp needs whole rows, so it stays in
    # registers only when the warps split just the M rows (as in the forward).
    return _threads(cfg) // 32 <= _dq_rows(cfg) // 16


def _dq_smem(cfg):
    e = 2
    m = _dq_rows(cfg)
    bt = _dq_tile_tokens(cfg)
    # Q tile + dQ staging (the token tile stores dQ from registers, and keeps the union instead)
    q = m * cfg.head_dim_qk * e * (2 if bt == 1 else 1)
    union = 0 if bt == 1 else bt * cfg.top_n * (3 + bt) * 4 + 16
    do = m * cfg.head_dim_v * e
    ds = 0 if _dq_ds_in_regs(cfg) else m * cfg.block * e
    kv = _stages(cfg) * cfg.block * (cfg.head_dim_qk + cfg.head_dim_v) * e
    return q + do + ds + kv + union + 8 * m + 1024


# ---------------------------------------------------------------- dkdv
def _chunk_rows(cfg):
    if cfg.chunk_rows:
        return cfg.chunk_rows
    if cfg.async_mma:
        return _group(cfg)      # one token a step
    for r in (64, 32):
        if 2 * (_kv_smem(cfg, r) + 1024) <= cfg.smem_sm:
            return r
    return 32


def _kv_pt_in_regs(cfg):
    if cfg.async_mma:
        return True
    # The S^T / dP^T GEMMs (M = block) put warps on M first (16 rows each); if some
    # warps split the N (= chunk row) columns, P^T rows are spread over warps and
    # must go through smem to be the A operand of P^T @ dO.
    return cfg.block % (16 * (_threads(cfg) // 32)) == 0


def _kv_smem(cfg, R=None):
    e = 2
    R = R or _chunk_rows(cfg)
    BS = cfg.block
    kv = BS * (cfg.head_dim_qk + cfg.head_dim_v) * e
    if cfg.async_mma:   # K, V and the ring of Q | dO and LSE, Delta rows (mbarriers in the 1024 slack)
        return kv + _stages(cfg) * R * ((cfg.head_dim_qk + cfg.head_dim_v) * e + 8) + 1024
    chunk = _stages(cfg) * (R * (cfg.head_dim_qk + cfg.head_dim_v) * e + 12 * R)
    pt = 0 if _kv_pt_in_regs(cfg) else BS * R * e    # one tile, P^T then dS^T
    return kv + chunk + pt + 1024


def _kv_regs(cfg):
    # fp32 accumulators per thread: dK, dV, S^T, dP^T (+ 16-bit P^T, dS^T if in registers)
    th = _threads(cfg)
    BS, R = cfg.block, _chunk_rows(cfg)
    f = BS * (cfg.head_dim_qk + cfg.head_dim_v) / th + 2 * BS * R / th
    if _kv_pt_in_regs(cfg):
        f += BS * R / th     # two 16-bit tiles
    return f


def _smem_bytes(cfg):
    if cfg.part == "dq":
        return _dq_smem(cfg)
    if cfg.part == "dkdv":
        return _kv_smem(cfg)
    return 1024


def _min_blocks(cfg):
    if cfg.min_blocks_per_sm:
        return cfg.min_blocks_per_sm
    by_smem = cfg.smem_sm // _smem_bytes(cfg)
    if cfg.part == "dkdv" and cfg.async_mma:
        # registers per SM: the consumers' _CONSUMER_REGS and the producer's _PRODUCER_REGS each
        return max(1, min(2, by_smem, 65536 // (_threads(cfg) * (_CONSUMER_REGS + _PRODUCER_REGS))))
    if cfg.part == "dkdv":
        # Two programs per SM cap registers at 128 (256 threads): fine for the
        # single-stage loop (~160 wanted, a few spilled words), heavy spills for
        # num_stages > 1, which therefore runs one program per SM by default.
        by_regs = int(65536 // (_threads(cfg) * (_kv_regs(cfg) + 32)))
        if _stages(cfg) > 1:
            by_regs = 1
        return max(1, min(4, by_smem, by_regs))
    if cfg.part == "dq" and _dq_tile_tokens(cfg) > 1:
        # The token tile's fp32 dQ, S and dP accumulators (+ 16-bit dS) per consumer thread, beside
        # the 128-thread TMA producer warpgroup: capping registers below that fails to allocate.
        m, th = _dq_rows(cfg), _threads(cfg)
        regs = (m * cfg.head_dim_qk + 2.5 * m * cfg.block) / th + 40
        by_regs = int(65536 // ((th + 128) * regs))
        return max(1, min(4, by_smem, by_regs))
    return max(1, min(4, by_smem))


def check_config(cfg) -> None:
    """Raise ValueError naming the offending field if build(cfg) can't work."""
    check_problem(cfg, parts=_PARTS)
    if cfg.block not in (32, 64, 128):
        raise ValueError("block: must be 32, 64 or 128")
    if not (1 <= cfg.top_n <= 256):
        raise ValueError("top_n: must be in 1..256")
    if cfg.threads not in (0, 64, 128, 256):
        raise ValueError("threads: must be 0 (auto), 64, 128 or 256")
    if not (0 <= cfg.num_stages <= 4):
        raise ValueError("num_stages: must be 0 (auto) or in 1..4")
    if cfg.chunk_rows not in (0, 16, 32, 64, 128):
        raise ValueError("chunk_rows: must be 0 (auto), 16, 32, 64 or 128")
    if cfg.chunk_group not in (2, 4, 8, 16):
        raise ValueError("chunk_group: must be 2, 4, 8 or 16")
    if not (0 <= cfg.min_blocks_per_sm <= 8):
        raise ValueError("min_blocks_per_sm: must be in 0..8")
    warps = _threads(cfg) // 32
    G = _group(cfg)
    if cfg.tile_tokens not in (0, 1, 2, 4, 8, 16, 32, 64):
        raise ValueError("tile_tokens: must be 0 (auto), 1, 2, 4, 8, 16, 32 or 64")
    if cfg.warp_skip and (cfg.part != "dq" or _dq_tile_tokens(cfg) == 1):
        raise ValueError("warp_skip: needs the dq token tile (part dq, tile_tokens > 1 or auto where G >= 8)")
    if cfg.part == "dq":
        m = _dq_rows(cfg)
        if _dq_tile_tokens(cfg) > 1:
            if m not in (64, 128):
                raise ValueError(f"tile_tokens: tile_tokens * group = {m} rows, must be 64 or 128")
            if cfg.warp_skip:
                if _threads(cfg) != 2 * m:
                    raise ValueError(f"threads: warp_skip needs one warp per 16 rows ({2 * m} threads)")
            elif _threads(cfg) < 128 or m % (64 * (_threads(cfg) // 128)):
                raise ValueError("threads: a token tile needs 128 threads per 64 rows")
            if _dq_tile_tokens(cfg) * cfg.top_n > 4 * _threads(cfg):
                raise ValueError("tile_tokens: tile_tokens * top_n must be at most 4 * threads")
        n_split = max(1, warps // (m // 16))
        if not (warps_cover(cfg.block, n_split) and warps_cover(cfg.head_dim_qk, n_split)):
            raise ValueError("threads: too many warps for this block / head_dim_qk (each needs whole 8-column tiles)")
    elif cfg.part == "dkdv" and cfg.async_mma:
        if cfg.block not in (64, 128):
            raise ValueError("async_mma: block must be 64 or 128 (one 64-row WGMMA warpgroup per 64 rows)")
        if _threads(cfg) != 128 * (cfg.block // 64):
            raise ValueError(f"threads: async_mma runs one warpgroup per 64 block rows ({128 * (cfg.block // 64)})")
        if _chunk_rows(cfg) != G or G % 16:
            raise ValueError(f"chunk_rows: async_mma steps one token (G = {G} rows, a multiple of 16: "
                             "the WGMMA N) at a time")
        if _kv_regs(cfg) > _MAX_REGS_ASYNC:
            raise ValueError(f"async_mma: G = {G} rows of S^T/dP^T beside dK/dV need too many registers "
                             "for one warpgroup")
    elif cfg.part == "dkdv":
        if _chunk_rows(cfg) < G:
            raise ValueError("chunk_rows: must be >= the group size heads_q/heads_kv")
        m_split = min(warps, cfg.block // 16)
        while warps % m_split:
            m_split -= 1
        n_split = warps // m_split
        if _chunk_rows(cfg) // n_split < 8 or cfg.head_dim_v // n_split < 8:
            raise ValueError("threads: too many warps for this block / chunk_rows")
        if _kv_regs(cfg) > 192:
            raise ValueError("threads: fp32 accumulators need too many registers; raise threads "
                             "or lower chunk_rows")
    if _smem_bytes(cfg) > cfg.smem_block:
        raise ValueError(f"num_stages: shared memory for these tiles/num_stages exceeds the arch's {cfg.smem_block // 1024} KiB")


def pass_configs(cfg) -> dict:
    """TileLang pass configs this kernel is compiled with: warp_skip's MMAs are per warp (mma.sync)."""
    return {"tl.disable_wgmma": True} if cfg.warp_skip else {}


def build(cfg):
    """Return the (uncompiled) T.prim_func of cfg.part (see the module docstring)."""
    check_config(cfg)
    if cfg.part == "dq":
        return _build_dq(cfg) if _dq_tile_tokens(cfg) == 1 else _build_dq_tile(cfg)
    if cfg.part == "dkdv":
        return _build_dkdv_async(cfg) if cfg.async_mma else _build_dkdv(cfg)
    return _build_reduce(cfg)


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _build_dq(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    M = _dq_rows(cfg)
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    Dp = _pow2_ceil(Dv)   # Delta's row sum runs over Dp columns
    BS, NSEL = cfg.block, cfg.top_n
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    threads = _threads(cfg)
    ds_in_regs = _dq_ds_in_regs(cfg)
    copy_ann = {"disable_tma": True}   # cp.async pipeline, as in the forward
    min_blocks = _min_blocks(cfg)
    ninf = -T.infinity(acc)
    pinf = T.infinity(acc)

    B, S = T.dynamic("B, T")

    @T.prim_func
    def selection_attention_bwd_dq(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        O: T.Tensor([B, S, HQ, Dv], dtype),
        dO: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
        DLSE: T.Tensor([B, S, HQ], acc),
        BlockIndices: T.Tensor([B, S, H, NSEL], "int32"),
        SeqStart: T.Tensor([B, S], "int32"),
        dQ: T.Tensor([B, S, HQ, Dk], dtype),
        Delta: T.Tensor([B, S, HQ], acc),
    ):
        with T.Kernel(S, H, B, threads=threads) as (t, h, b):
            Q_s = T.alloc_shared([M, Dk], dtype)
            dO_s = T.alloc_shared([M, Dv], dtype)
            K_s = T.alloc_shared([BS, Dk], dtype)
            V_s = T.alloc_shared([BS, Dv], dtype)
            dQ_s = T.alloc_shared([M, Dk], dtype)
            lse_s = T.alloc_shared([M], acc)
            delta_s = T.alloc_shared([M], acc)
            od = T.alloc_fragment([M, Dp], acc)
            delta_f = T.alloc_fragment([M], acc)
            acc_s = T.alloc_fragment([M, BS], acc)
            acc_dp = T.alloc_fragment([M, BS], acc)
            if ds_in_regs:
                ds = T.alloc_fragment([M, BS], dtype)
            else:
                ds = T.alloc_shared([M, BS], dtype)
            acc_dq = T.alloc_fragment([M, Dk], acc)
            T.no_set_max_nreg()
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)

            # Group rows; padding rows are zero and never stored.
            for i, d in T.Parallel(M, Dk):
                Q_s[i, d] = T.if_then_else(i < G, Q[b, t, h * G + i, d], T.cast(0, dtype))
            for i, d in T.Parallel(M, Dv):
                dO_s[i, d] = T.if_then_else(i < G, dO[b, t, h * G + i, d], T.cast(0, dtype))
            # Delta = rowsum(dO * O) - DLSE, fp32 from the dtype values.
            if Dp == Dv:
                for i, d in T.Parallel(M, Dv):
                    od[i, d] = T.if_then_else(
                        i < G, T.cast(dO[b, t, h * G + i, d], acc) * T.cast(O[b, t, h * G + i, d], acc), 0)
            else:   # zero columns up to a power of two: the row reduction needs one
                for i, d in T.Parallel(M, Dp):
                    od[i, d] = T.if_then_else(
                        i < G and d < Dv, T.cast(dO[b, t, h * G + i, T.min(d, Dv - 1)], acc)
                        * T.cast(O[b, t, h * G + i, T.min(d, Dv - 1)], acc), 0)
            T.reduce_sum(od, delta_f, dim=1, clear=True)
            for i in T.Parallel(M):
                delta_s[i] = T.if_then_else(i < G, delta_f[i] - DLSE[b, t, h * G + i], 0)
                # lse = -inf (no visible key) or a padding row -> +inf so P = exp(-inf) = 0.
                lse_s[i] = T.if_then_else(i < G and LSE[b, t, h * G + i] != ninf,
                                          LSE[b, t, h * G + i], pinf)
            for i in T.Parallel(M):
                if i < G:
                    Delta[b, t, h * G + i] = delta_s[i]
            T.fill(acc_dq, 0)

            s0 = SeqStart[b, t]
            for it in T.Pipelined(NSEL, num_stages=_stages(cfg)):
                j = BlockIndices[b, t, h, it]
                ok = (j >= 0) & (j * BS <= t - s0)
                # Unusable slot: load a valid, L2-hot block (block 0 for a pad, the one holding t
                # for a later block) and mask it all. min / max, not a select on `ok`: nvcc turned
                # that select into two branches per copied row (the forward ran 34% slower).
                r0 = s0 + T.min(T.max(j, 0), (t - s0) // BS) * BS   # the block's first key
                T.copy(K[b, r0:r0 + BS, h, :], K_s, annotations=copy_ann)
                T.copy(V[b, r0:r0 + BS, h, :], V_s, annotations=copy_ann)
                T.clear(acc_s)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.clear(acc_dp)
                T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for i, c in T.Parallel(M, BS):
                    ds[i, c] = T.if_then_else(
                        ok and (r0 + c <= t),
                        T.__exp(acc_s[i, c] * sc - lse_s[i]) * (acc_dp[i, c] - delta_s[i]),
                        0)
                T.gemm(ds, K_s, acc_dq, policy=T.GemmWarpPolicy.FullRow)

            for i, d in T.Parallel(M, Dk):
                dQ_s[i, d] = acc_dq[i, d] * sc
            T.copy(dQ_s[0:G, :], dQ[b, t, h * G:(h + 1) * G, :])

    return selection_attention_bwd_dq


def _build_dq_tile(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    BT = _dq_tile_tokens(cfg)
    M = _dq_rows(cfg)
    E = BT * cfg.top_n
    NT = _threads(cfg)
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    Dp = _pow2_ceil(Dv)   # Delta's row sum runs over Dp columns
    BS, NSEL = cfg.block, cfg.top_n
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    # K/V loads are TMA in TileLang's warp-specialized pipeline, as in the forward's token tile:
    # the union's size is known only at run time (no cp.async epilogue for that in TileLang 0.1.15).
    min_blocks = _min_blocks(cfg)
    ninf = -T.infinity(acc)
    pinf = T.infinity(acc)
    build_union = union_builder(BT, NSEL, BS, NT, sc)
    WS = cfg.warp_skip
    warp_uses = warp_uses_block(G)

    @T.macro
    def block_dq(it, t0, Q_s, dO_s, K_s, V_s, acc_s, acc_dp, ds, acc_dq, Blk_s, Bias_s, lse_s, delta_s):
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
        T.gemm(dO_s, V_s, acc_dp, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
        # dS = P (dP - Delta) where the row's token chose the block and sees the key, else
        # exactly 0 (replaced, so a NaN key or value there never enters the row); the bias
        # weighs a block listed c times c-fold.
        for i, cc in T.Parallel(M, BS):
            ds[i, cc] = T.if_then_else(
                (Blk_s[it] + cc <= t0 + i // G) & (Bias_s[it, i // G] > ninf),
                T.__exp((acc_s[i, cc] + Bias_s[it, i // G]) * sc - lse_s[i]) * (acc_dp[i, cc] - delta_s[i]),
                0)
        # (K comes with its non-finite values zeroed: see the module docstring.)
        T.gemm(ds, K_s, acc_dq, policy=T.GemmWarpPolicy.FullRow)

    B, S = T.dynamic("B, T")

    @T.prim_func
    def selection_attention_bwd_dq(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        O: T.Tensor([B, S, HQ, Dv], dtype),
        dO: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
        DLSE: T.Tensor([B, S, HQ], acc),
        BlockIndices: T.Tensor([B, S, H, NSEL], "int32"),
        SeqStart: T.Tensor([B, S], "int32"),
        dQ: T.Tensor([B, S, HQ, Dk], dtype),
        Delta: T.Tensor([B, S, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(S, BT), H, B, threads=NT) as (tt, h, b):
            Q_s = T.alloc_shared([M, Dk], dtype)
            dO_s = T.alloc_shared([M, Dv], dtype)
            K_s = T.alloc_shared([BS, Dk], dtype)
            V_s = T.alloc_shared([BS, Dv], dtype)
            lse_s = T.alloc_shared([M], acc)
            delta_s = T.alloc_shared([M], acc)
            Ent_s = T.alloc_shared([E], "int32")
            First_s = T.alloc_shared([E], "int32")
            Blk_s = T.alloc_shared([E], "int32")
            Bias_s = T.alloc_shared([E, BT], acc)
            Num_s = T.alloc_shared([1], "int32")
            Blk_r = T.alloc_local([E], "int32")
            od = T.alloc_fragment([M, Dp], acc)
            delta_f = T.alloc_fragment([M], acc)
            acc_s = T.alloc_fragment([M, BS], acc)
            acc_dp = T.alloc_fragment([M, BS], acc)
            ds = T.alloc_fragment([M, BS], dtype)
            acc_dq = T.alloc_fragment([M, Dk], acc)
            nu = T.alloc_var("int32")
            T.no_set_max_nreg()
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)

            tx = T.get_thread_binding()
            t0 = tt * BT
            # Row i = token t0 + i // G, head h * G + i % G; rows past T are zero and never stored.
            for i, d in T.Parallel(M, Dk):
                Q_s[i, d] = T.if_then_else(t0 + i // G < S, Q[b, T.min(t0 + i // G, S - 1), h * G + i % G, d],
                                           T.cast(0, dtype))
            for i, d in T.Parallel(M, Dv):
                dO_s[i, d] = T.if_then_else(t0 + i // G < S, dO[b, T.min(t0 + i // G, S - 1), h * G + i % G, d],
                                            T.cast(0, dtype))
            # Delta = rowsum(dO * O) - DLSE, fp32 from the dtype values.
            if Dp == Dv:
                for i, d in T.Parallel(M, Dv):
                    od[i, d] = T.if_then_else(
                        t0 + i // G < S,
                        T.cast(dO[b, T.min(t0 + i // G, S - 1), h * G + i % G, d], acc)
                        * T.cast(O[b, T.min(t0 + i // G, S - 1), h * G + i % G, d], acc), 0)
            else:   # zero columns up to a power of two: the row reduction needs one
                for i, d in T.Parallel(M, Dp):
                    od[i, d] = T.if_then_else(
                        t0 + i // G < S and d < Dv,
                        T.cast(dO[b, T.min(t0 + i // G, S - 1), h * G + i % G, T.min(d, Dv - 1)], acc)
                        * T.cast(O[b, T.min(t0 + i // G, S - 1), h * G + i % G, T.min(d, Dv - 1)], acc), 0)
            T.reduce_sum(od, delta_f, dim=1, clear=True)
            for i in T.Parallel(M):
                delta_s[i] = T.if_then_else(t0 + i // G < S,
                                            delta_f[i] - DLSE[b, T.min(t0 + i // G, S - 1), h * G + i % G], 0)
                # lse = -inf (no visible key) or a row past T -> +inf so P = exp(-inf) = 0.
                lse_s[i] = T.if_then_else(
                    (t0 + i // G < S) and LSE[b, T.min(t0 + i // G, S - 1), h * G + i % G] != ninf,
                    LSE[b, T.min(t0 + i // G, S - 1), h * G + i % G], pinf)

            build_union(BlockIndices, SeqStart, b, h, t0, S, tx, Ent_s, First_s, Blk_s, Bias_s, Num_s, Blk_r)
            nu = T.max(Num_s[0], 1)
            for i in T.Parallel(M):
                if t0 + i // G < S:
                    Delta[b, t0 + i // G, h * G + i % G] = delta_s[i]
            T.fill(acc_dq, 0)

            for it in T.Pipelined(nu, num_stages=_stages(cfg)):
                T.copy(K[b, Blk_r[it]:Blk_r[it] + BS, h, :], K_s)
                T.copy(V[b, Blk_r[it]:Blk_r[it] + BS, h, :], V_s)
                if WS:
                    # a warp none of whose tokens chose the block skips it (its dS rows would be 0)
                    if warp_uses(Bias_s, it, tx):
                        block_dq(it, t0, Q_s, dO_s, K_s, V_s, acc_s, acc_dp, ds, acc_dq, Blk_s, Bias_s, lse_s, delta_s)
                else:
                    block_dq(it, t0, Q_s, dO_s, K_s, V_s, acc_s, acc_dp, ds, acc_dq, Blk_s, Bias_s, lse_s, delta_s)

            for i, d in T.Parallel(M, Dk):
                if t0 + i // G < S:
                    dQ[b, t0 + i // G, h * G + i % G, d] = T.cast(acc_dq[i, d] * sc, dtype)

    return selection_attention_bwd_dq


def _build_dkdv(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    BS = cfg.block
    R = _chunk_rows(cfg)
    C = R // G                       # tokens per chunk
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    threads = _threads(cfg)
    pt_in_regs = _kv_pt_in_regs(cfg)
    min_blocks = _min_blocks(cfg)
    NSTAGE, CG = _stages(cfg), cfg.chunk_group

    B, S, P, U, NBG = T.dynamic("B, T, P, U, NBG")

    # Chunk ci: entries p0 + ci*C .. (+C); row r <-> (entry p0 + ci*C + r // G,
    # query head h*G + r % G).  Entries past p1 repeat entry p1-1 (loads stay
    # in bounds) and are masked out, so a chunk past the unit's end adds 0. When G
    # does not divide R, rows C*G.. would repeat the next chunk's first entry: masked.
    def live(ci, p0, p1, k0, i, r, tok_s):
        # (a Python helper, written out where it is used: bound to a name in the kernel it would
        # become a let, and change the code of the groups that need no row mask)
        both = T.And(p0 + ci * C + r // G < p1, k0 + i <= tok_s[r])
        return T.And(both, r < C * G) if R % G else both

    @T.macro
    def chunk(ci, b, h, k0, p0, p1, Q, dO, LSE, Delta, TokIdx, K_s, V_s, Qc, dOc, tok_s, lse_s,
              delta_s, acc_st, acc_dpt, pt, dst, acc_dk, acc_dv):
        for r, d in T.Parallel(R, Dk):
            Qc[r, d] = Q[b, TokIdx[T.min(p0 + ci * C + r // G, p1 - 1)], h * G + r % G, d]
        for r, d in T.Parallel(R, Dv):
            dOc[r, d] = dO[b, TokIdx[T.min(p0 + ci * C + r // G, p1 - 1)], h * G + r % G, d]
        for r in T.Parallel(R):
            tok_s[r] = TokIdx[T.min(p0 + ci * C + r // G, p1 - 1)]
        for r in T.Parallel(R):
            lse_s[r] = LSE[b, TokIdx[T.min(p0 + ci * C + r // G, p1 - 1)], h * G + r % G]
        for r in T.Parallel(R):
            delta_s[r] = Delta[b, TokIdx[T.min(p0 + ci * C + r // G, p1 - 1)], h * G + r % G]
        T.clear(acc_st)
        T.gemm(K_s, Qc, acc_st, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        T.clear(acc_dpt)
        T.gemm(V_s, dOc, acc_dpt, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        for i, r in T.Parallel(BS, R):
            acc_st[i, r] = T.if_then_else(live(ci, p0, p1, k0, i, r, tok_s), T.__exp(acc_st[i, r] * sc - lse_s[r]), 0)
            pt[i, r] = acc_st[i, r]
        T.gemm(pt, dOc, acc_dv, policy=T.GemmWarpPolicy.FullRow)
        # dS^T = 0 where P^T is (masked, or underflowed): a NaN Delta of a token that cannot see
        # the key must not reach dK through 0 * NaN.
        for i, r in T.Parallel(BS, R):
            dst[i, r] = T.if_then_else(acc_st[i, r] != 0, acc_st[i, r] * (acc_dpt[i, r] - delta_s[r]), 0)
        T.gemm(dst, Qc, acc_dk, policy=T.GemmWarpPolicy.FullRow)


    @T.prim_func
    def selection_attention_bwd_dkdv(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        dO: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
        Delta: T.Tensor([B, S, HQ], acc),
        TokIdx: T.Tensor([P], "int32"),
        UnitBlock: T.Tensor([U], "int32"),
        UnitStart: T.Tensor([U], "int32"),
        UnitEnd: T.Tensor([U], "int32"),
        BlockRow0: T.Tensor([NBG], "int32"),
        BlockRowEnd: T.Tensor([NBG], "int32"),
        PartK: T.Tensor([U, BS, Dk], acc),
        PartV: T.Tensor([U, BS, Dv], acc),
    ):
        with T.Kernel(U, threads=threads) as u:
            K_s = T.alloc_shared([BS, Dk], dtype)
            V_s = T.alloc_shared([BS, Dv], dtype)
            Qc = T.alloc_shared([R, Dk], dtype)
            dOc = T.alloc_shared([R, Dv], dtype)
            tok_s = T.alloc_shared([R], "int32")
            lse_s = T.alloc_shared([R], acc)
            delta_s = T.alloc_shared([R], acc)
            acc_st = T.alloc_fragment([BS, R], acc)
            acc_dpt = T.alloc_fragment([BS, R], acc)
            if pt_in_regs:
                pt = T.alloc_fragment([BS, R], dtype)
                dst = T.alloc_fragment([BS, R], dtype)
            else:
                # One smem tile holds P^T for the dV GEMM, then dS^T for the dK GEMM.
                pt = T.alloc_shared([BS, R], dtype)
                dst = pt
            acc_dk = T.alloc_fragment([BS, Dk], acc)
            acc_dv = T.alloc_fragment([BS, Dv], acc)
            T.no_set_max_nreg()
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)

            bid = UnitBlock[u]          # (b*H + h)*NBG + g, >= 0
            g = T.truncmod(bid, NBG)
            h = T.truncmod(T.truncdiv(bid, NBG), H)
            b = T.truncdiv(bid, NBG * H)
            p0 = UnitStart[u]
            p1 = UnitEnd[u]
            k0 = BlockRow0[g]
            k1 = BlockRowEnd[g]

            # The block's keys/values, rows past its sequence's end zero (they are masked anyway).
            for i, d in T.Parallel(BS, Dk):
                K_s[i, d] = T.if_then_else(k0 + i < k1, K[b, T.min(k0 + i, S - 1), h, d], T.cast(0, dtype))
            for i, d in T.Parallel(BS, Dv):
                V_s[i, d] = T.if_then_else(k0 + i < k1, V[b, T.min(k0 + i, S - 1), h, d], T.cast(0, dtype))
            T.fill(acc_dk, 0)
            T.fill(acc_dv, 0)

            n_chunks = T.ceildiv(p1 - p0, C)
            if NSTAGE == 1:
                for ci in T.Pipelined(n_chunks, num_stages=1):
                    chunk(ci, b, h, k0, p0, p1, Q, dO, LSE, Delta, TokIdx, K_s, V_s, Qc, dOc, tok_s, lse_s,
                          delta_s, acc_st, acc_dpt, pt, dst, acc_dk, acc_dv)
            else:
                # TileLang 0.1.15 can't emit the cp.async epilogue of a multi-stage
                # pipeline with a dynamic trip count, so the pipelined loop runs over
                # static groups of CG chunks (the last group's surplus chunks are masked).
                for og in T.serial(T.ceildiv(n_chunks, CG)):
                    for cj in T.Pipelined(CG, num_stages=NSTAGE):
                        chunk(og * CG + cj, b, h, k0, p0, p1, Q, dO, LSE, Delta, TokIdx, K_s, V_s, Qc, dOc, tok_s, lse_s,
                              delta_s, acc_st, acc_dpt, pt, dst, acc_dk, acc_dv)

            for i, d in T.Parallel(BS, Dk):
                acc_dk[i, d] = acc_dk[i, d] * sc
            T.copy(acc_dk, PartK[u, 0:BS, 0:Dk])
            T.copy(acc_dv, PartV[u, 0:BS, 0:Dv])

    return selection_attention_bwd_dkdv


def _build_dkdv_async(cfg):
    """dkdv with async_mma (sm90): per program one unit, as _build_dkdv, but one token a step: a
    producer warpgroup brings its G query heads' rows of Q | dO and of LSE / Delta (TMA boxes) into
    a num_stages ring, and one consumer warpgroup per 64 block rows runs S^T and dP^T as one async
    WGMMA batch, P^T while dP^T runs, dV += P^T dO queued before dS^T is formed, then dK += dS^T Q
    synchronously (the ring's stage is released after that full wait). P^T / dS^T are the register
    A operands. Only steps whose token does not see every row of the block pay for the mask."""
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    BS = cfg.block
    R = _chunk_rows(cfg)             # = G: a chunk is one token
    dtype, acc = cfg.dtype, "float32"
    sc = float(cfg.scale)
    sc2 = sc * _LOG2E
    threads = _threads(cfg)
    min_blocks = _min_blocks(cfg)

    B, S, P, U, NBG = T.dynamic("B, T, P, U, NBG")

    @T.prim_func
    def selection_attention_bwd_dkdv(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        dO: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
        Delta: T.Tensor([B, S, HQ], acc),
        TokIdx: T.Tensor([P], "int32"),
        UnitBlock: T.Tensor([U], "int32"),
        UnitStart: T.Tensor([U], "int32"),
        UnitEnd: T.Tensor([U], "int32"),
        BlockRow0: T.Tensor([NBG], "int32"),
        BlockRowEnd: T.Tensor([NBG], "int32"),
        PartK: T.Tensor([U, BS, Dk], acc),
        PartV: T.Tensor([U, BS, Dv], acc),
    ):
        with T.Kernel(U, threads=threads) as u:
            K_s = T.alloc_shared([BS, Dk], dtype)
            V_s = T.alloc_shared([BS, Dv], dtype)
            # One ring buffer for Q | dO: a stage is freed after its last reader, which must be the
            # synchronous dK gemm, not an async one that may still read it when it is refilled.
            QdO_s = T.alloc_shared([R, Dk + Dv], dtype)
            # A TMA destination is 128-byte aligned: each ring stage of these rows holds >= 32 floats.
            lse_s = T.alloc_shared([max(R, 32)], acc)
            dlt_s = T.alloc_shared([max(R, 32)], acc)
            P_x = T.alloc_fragment([BS, R], dtype)
            dS_x = T.alloc_fragment([BS, R], dtype)
            lse_v = T.alloc_fragment([R], acc)
            dlt_v = T.alloc_fragment([R], acc)
            acc_st = T.alloc_fragment([BS, R], acc)
            acc_dpt = T.alloc_fragment([BS, R], acc)
            acc_dk = T.alloc_fragment([BS, Dk], acc)
            acc_dv = T.alloc_fragment([BS, Dv], acc)
            T.annotate_producer_reg_dealloc(_PRODUCER_REGS)
            T.annotate_consumer_reg_alloc(_CONSUMER_REGS)
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)

            bid = UnitBlock[u]          # (b*H + h)*NBG + g, >= 0
            g = T.truncmod(bid, NBG)
            h = T.truncmod(T.truncdiv(bid, NBG), H)
            b = T.truncdiv(bid, NBG * H)
            p0 = UnitStart[u]
            p1 = UnitEnd[u]
            k0 = BlockRow0[g]
            k1 = BlockRowEnd[g]

            # The block's keys / values (TMA: rows past T come in as zeros; rows of a pack's next
            # sequence are never seen by this block's tokens, which end before k1, and their dK /
            # dV rows are not written by the reduce).
            T.copy(K[b, k0:k0 + BS, h, :], K_s)
            T.copy(V[b, k0:k0 + BS, h, :], V_s)
            T.fill(acc_dk, 0)
            T.fill(acc_dv, 0)

            for ci in T.Pipelined(p1 - p0, num_stages=_stages(cfg)):
                # The step's token (TMA boxes of its G query heads' rows; chunks are whole tokens:
                # a box into part of the buffer's rows is not one contiguous swizzled tile)
                T.copy(Q[b, TokIdx[p0 + ci], h * G:(h + 1) * G, :], QdO_s[:, 0:Dk])
                T.copy(dO[b, TokIdx[p0 + ci], h * G:(h + 1) * G, :], QdO_s[:, Dk:Dk + Dv])
                # and its rows' LSE and Delta (the tokens are scattered: read by the consumer from
                # global memory, their latency stood in every step)
                T.copy(LSE[b, TokIdx[p0 + ci], h * G:(h + 1) * G], lse_s[0:R])
                T.copy(Delta[b, TokIdx[p0 + ci], h * G:(h + 1) * G], dlt_s[0:R])
                for r in T.Parallel(R):
                    lse_v[r] = lse_s[r] * _LOG2E
                    dlt_v[r] = dlt_s[r]
                # clear_accum, not a fill: register writes between the two issues make ptxas
                # wait for the first before the second (C7517)
                T.wgmma_gemm(K_s, QdO_s[:, 0:Dk], acc_st, transpose_B=True, clear_accum=True,
                             policy=T.GemmWarpPolicy.FullRow)
                T.wgmma_gemm(V_s, QdO_s[:, Dk:Dk + Dv], acc_dpt, transpose_B=True, clear_accum=True,
                             policy=T.GemmWarpPolicy.FullRow)
                T.wait_wgmma(1)
                # Interior: the token sees every row of the block. Elsewhere keys after the token
                # are selected (never multiplied) to 0, so a NaN/Inf of a key it cannot see stays
                # out of its P / dS.
                if TokIdx[p0 + ci] >= k1 - 1:
                    for i, r in T.Parallel(BS, R):
                        acc_st[i, r] = T.exp2(acc_st[i, r] * sc2 - lse_v[r])
                else:
                    for i, r in T.Parallel(BS, R):
                        acc_st[i, r] = T.if_then_else(k0 + i <= TokIdx[p0 + ci],
                                                      T.exp2(acc_st[i, r] * sc2 - lse_v[r]), 0)
                T.copy(acc_st, P_x)
                # dV queues behind dP^T; wait for dP^T only, dS^T then overlaps dV
                T.wgmma_gemm(P_x, QdO_s[:, Dk:Dk + Dv], acc_dv, policy=T.GemmWarpPolicy.FullRow)
                T.wait_wgmma(1)
                # dS^T selected to 0 where masked too (a NaN Delta of the token times P^T = 0 would
                # reach the keys after it)
                if TokIdx[p0 + ci] >= k1 - 1:
                    for i, r in T.Parallel(BS, R):
                        dS_x[i, r] = acc_st[i, r] * (acc_dpt[i, r] - dlt_v[r])
                else:
                    for i, r in T.Parallel(BS, R):
                        dS_x[i, r] = T.if_then_else(k0 + i <= TokIdx[p0 + ci],
                                                    acc_st[i, r] * (acc_dpt[i, r] - dlt_v[r]), 0)
                # synchronous (waits for dV too), so the stage is free once it returns
                T.gemm(dS_x, QdO_s[:, 0:Dk], acc_dk, policy=T.GemmWarpPolicy.FullRow)

            for i, d in T.Parallel(BS, Dk):
                acc_dk[i, d] = acc_dk[i, d] * sc
            T.copy(acc_dk, PartK[u, 0:BS, 0:Dk])
            T.copy(acc_dv, PartV[u, 0:BS, 0:Dv])

    return selection_attention_bwd_dkdv


def _build_reduce(cfg):
    H = cfg.heads_kv
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    BS = cfg.block
    dtype = cfg.dtype
    acc = "float32"
    threads = _threads(cfg)

    B, S, U, NBU, NBG = T.dynamic("B, T, U, NBU, NBG")

    @T.prim_func
    def selection_attention_bwd_reduce(
        PartK: T.Tensor([U, BS, Dk], acc),
        PartV: T.Tensor([U, BS, Dv], acc),
        BlockUnitStart: T.Tensor([NBU], "int32"),
        BlockRow0: T.Tensor([NBG], "int32"),
        BlockRowEnd: T.Tensor([NBG], "int32"),
        dK: T.Tensor([B, S, H, Dk], dtype),
        dV: T.Tensor([B, S, H, Dv], dtype),
    ):
        # Block on grid x (NBG can exceed 65535); block 0 of every head (the most
        # units: it is forced for every query) is in the first wave.
        with T.Kernel(NBG, H, B, threads=threads) as (j, h, b):
            acc_k = T.alloc_fragment([BS, Dk], acc)
            acc_v = T.alloc_fragment([BS, Dv], acc)
            bid = (b * H + h) * NBG + j
            k0 = BlockRow0[j]
            k1 = BlockRowEnd[j]
            u0 = BlockUnitStart[bid]
            u1 = BlockUnitStart[bid + 1]
            T.fill(acc_k, 0)
            T.fill(acc_v, 0)
            for u in T.serial(u1 - u0):
                for i, d in T.Parallel(BS, Dk):
                    acc_k[i, d] += PartK[u0 + u, i, d]
                for i, d in T.Parallel(BS, Dv):
                    acc_v[i, d] += PartV[u0 + u, i, d]
            for i, d in T.Parallel(BS, Dk):
                if k0 + i < k1:
                    dK[b, k0 + i, h, d] = T.cast(acc_k[i, d], dtype)
            for i, d in T.Parallel(BS, Dv):
                if k0 + i < k1:
                    dV[b, k0 + i, h, d] = T.cast(acc_v[i, d], dtype)

    return selection_attention_bwd_reduce
