"""NSA selection-branch attention forward (group-centric), TileLang.

Layouts (contiguous, row-major), B and T dynamic:
    Q            [B, T, HQ, Dk]  dtype
    K            [B, T, H,  Dk]  dtype
    V            [B, T, H,  Dv]  dtype
    BlockIndices [B, T, H, top_n] int32, selection block ids j >= 0, or -1 = pad
    SeqStart     [B, T]          int32   (the first token of t's sequence: 0 for a batch, cu_seqlens
                                          of a pack)
    O            [B, T, HQ, Dv]  dtype   (output)
    LSE          [B, T, HQ]      float32 (output, natural-log logsumexp of scale*q.k)
Block j of token t covers keys [s0 + j*block, s0 + (j+1)*block), s0 = SeqStart[t] (block ids count
from the token's own sequence start, so a packed batch runs in one launch); query t sees the keys
s <= t of each selected block.  No visible key at all -> o = 0, lse = -inf.

Two schedules, picked by the `tile_tokens` knob:

tile_tokens = 1 (per token): one program per (token t, kv head h, batch b).  The G = HQ/H query
heads of the group form the M dimension of the GEMMs (padded to whole 16-row slabs, the
mma.sync minimum; padded rows are zero queries and are never stored), so each
selected K/V block is read once for the whole group.  The main loop walks the
top_n slots with a static trip count as a `num_stages`-deep cp.async software
pipeline (block i+1.. loads in flight while block i is computed); GEMMs are
mma.sync (M = 16/32 rows is below WGMMA's 64).  Every token gathers its n blocks
again: at G = 16, Dk = 192 that is 655 KB through L2 per token and KV head, and
L2 bandwidth, not the tensor cores, bounds it.

tile_tokens = BT > 1 (token tile): one program per (tile of BT consecutive
tokens, kv head h, batch b); M = BT * G rows (row i = token i // G, head i % G),
64 or 128, so the GEMMs run on WGMMA on sm90.  The program first forms the union
of its BT tokens' block lists in shared memory (ascending, each block once) and
then loads each union block once for all BT tokens; a row's logits get a bias of
-inf for a block its token did not choose (log(count) for a block it lists more
than once, so duplicates weigh as in the reference).  Bytes and FLOPs scale with
the union size U: U = n when the tokens agree (a BT-fold cut of the L2 traffic),
up to BT * n when they share nothing (BT-fold more MMA work than per token).

warp_skip (token tile on mma.sync, one warp per 16 rows, threads = 2 * M): every warp waits for each
union block's stage, but issues its MMAs and softmax step only if a token of its rows chose the block
(the test reads the block's bias column of the warp's token; the branch is warp-uniform and holds no
barrier: the softmax's row reductions are quad shuffles, codegen.barriers_in_warp_branches checks).
K/V bytes stay the union's (U * bs * (Dk + Dv) * 2 per tile); MMA work falls from U blocks x M rows
to about n blocks per token (n * bs * G * (Dk + Dv) * 2 FLOPs a token, as per token), on mma.sync
instead of WGMMA. Paper config (G = 16, Dk = 192, Dv = 128, bs = 64, n = 16) at 64k, per token and KV
head: the WGMMA tile of 4 tokens issues U4 / 4 * 2.6 MFLOP (U4 = 50 on uniform lists, 25 on a
trained model's: 33 / 17 MFLOP) where warp_skip issues 10.5 MFLOP; both move U4 / 4 * 40 KB (516 / 261 KB).
"""

import dataclasses

import tilelang.language as T

from ._problem import check_problem, warps_cover
from ._online_softmax import online_softmax as _online_softmax
from ._token_tile import union_builder, warp_uses_block


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
    tile_tokens: int = 0       # tokens per program: 1 = per token; > 1 = token tile over the union;
                               # 0 = auto (64 // G tokens, 64 rows, when G >= 8; else per token)
    warp_skip: bool = False    # token tile on mma.sync, one warp per 16 rows: a warp skips the union
                               # blocks none of its tokens chose (no MMA on masked rows)
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)


def _tile_tokens(cfg):
    if cfg.tile_tokens:
        return cfg.tile_tokens
    # Auto: a 64-row tile where the group is large enough (G >= 8: 8 tokens at most), fills it
    # (G | 64) and the schedule can run it; per token otherwise.
    G = cfg.heads_q // cfg.heads_kv
    if G >= 8 and 64 % G == 0 and cfg.threads >= 128 and (64 // G) * cfg.top_n <= 4 * cfg.threads:
        return 64 // G
    return 1


def _rows(cfg):
    G = cfg.heads_q // cfg.heads_kv
    # per token: the group padded to whole 16-row MMA slabs (G = 6 -> 16, 24 -> 32)
    return -(-G // 16) * 16 if _tile_tokens(cfg) == 1 else _tile_tokens(cfg) * G


def _entries(cfg):
    # The tile's (token, slot) entries: the union has at most this many blocks.
    return _tile_tokens(cfg) * cfg.top_n


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
    union = 0 if _tile_tokens(cfg) == 1 else _entries(cfg) * (3 + _tile_tokens(cfg)) * 4 + 16
    return qo + p + kv + union + 1024  # + cross-warp reduce scratch


def _min_blocks(cfg):
    if cfg.min_blocks_per_sm:
        return cfg.min_blocks_per_sm
    if _tile_tokens(cfg) > 1 and cfg.threads > 128:
        # A 64-row WGMMA tile per warpgroup holds ~130 fp32 accumulators a thread: with the
        # producer warpgroup, two programs of 384 threads would cap them at 80 registers.
        return 1
    # Auto: as many programs per SM as shared memory allows (smem_sm per SM).
    return max(1, min(4, cfg.smem_sm // _smem_bytes(cfg)))


def pass_configs(cfg) -> dict:
    """TileLang pass configs this kernel is compiled with."""
    # warp_skip: each warp issues its own MMAs under a per-warp branch, which WGMMA (a warpgroup's
    # collective) cannot do
    return {"tl.disable_wgmma": True} if cfg.warp_skip else None


def check_config(cfg) -> None:
    """Raise ValueError naming the offending field if build(cfg) can't work."""
    check_problem(cfg)
    if cfg.block not in (32, 64, 128):
        raise ValueError("block: must be 32, 64 or 128")
    if not (1 <= cfg.top_n <= 256):
        raise ValueError("top_n: must be in 1..256")
    if cfg.threads not in (32, 64, 128, 256):
        raise ValueError("threads: must be 32, 64, 128 or 256")
    if cfg.tile_tokens not in (0, 1, 2, 4, 8, 16, 32, 64):
        raise ValueError("tile_tokens: must be 0 (auto), 1, 2, 4, 8, 16, 32 or 64")
    warps = cfg.threads // 32
    m = _rows(cfg)
    if cfg.warp_skip and _tile_tokens(cfg) == 1:
        raise ValueError("warp_skip: needs a token tile (tile_tokens > 1, or auto where G >= 8)")
    if _tile_tokens(cfg) > 1:
        # WGMMA: every warpgroup owns 64 rows of the tile (sm80's mma.sync takes the same shapes).
        if m not in (64, 128):
            raise ValueError(f"tile_tokens: tile_tokens * group = {m} rows, must be 64 or 128")
        if cfg.warp_skip:
            if cfg.threads != 2 * m:
                raise ValueError(f"threads: warp_skip needs one warp per 16 rows ({2 * m} threads)")
        elif cfg.threads < 128 or m % (64 * (cfg.threads // 128)):
            raise ValueError("threads: a token tile needs 128 threads per 64 rows")
        if _entries(cfg) > 4 * cfg.threads:
            raise ValueError("tile_tokens: tile_tokens * top_n must be at most 4 * threads")
    # FullRow policy: warps first split the M rows (16 each), then the N dim;
    # every warp needs >= 8 columns of both the S = QK^T tile and the O tile.
    n_split = max(1, warps // (m // 16))
    if not (warps_cover(cfg.block, n_split) and warps_cover(cfg.head_dim_v, n_split)):
        raise ValueError("threads: too many warps for this block / head_dim_v (each needs whole 8-column tiles)")
    if not (1 <= cfg.num_stages <= 4):
        raise ValueError("num_stages: must be in 1..4")
    if not (0 <= cfg.min_blocks_per_sm <= 8):
        raise ValueError("min_blocks_per_sm: must be in 0..8")
    if _smem_bytes(cfg) > cfg.smem_block:
        raise ValueError(f"num_stages: shared memory for block/head dims/num_stages exceeds the arch's {cfg.smem_block // 1024} KiB")


def build(cfg):
    """Return the (uncompiled) T.prim_func (Q, K, V, BlockIndices, O, LSE)."""
    check_config(cfg)
    return _build_per_token(cfg) if _tile_tokens(cfg) == 1 else _build_token_tile(cfg)


def _build_per_token(cfg):
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
    online_softmax = _online_softmax(M, BS, Dv, sc)

    B, S = T.dynamic("B, T")

    @T.prim_func
    def selection_attention_fwd(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        BlockIndices: T.Tensor([B, S, H, NSEL], "int32"),
        SeqStart: T.Tensor([B, S], "int32"),
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
            # or a block starting after t) still runs, but loads a valid block
            # (block 0 for a pad, the one holding t for a later block: both
            # L2-hot) and is fully masked, so it adds nothing.  This keeps the
            # loop free of data-dependent control flow (TileLang's pipeliner
            # needs a uniform body).
            s0 = SeqStart[b, t]
            for it in T.Pipelined(NSEL, num_stages=cfg.num_stages):
                j = BlockIndices[b, t, h, it]
                ok = (j >= 0) & (j * BS <= t - s0)
                # The block's first key (min / max, not a select on `ok`: nvcc turned that select
                # into two branches per copied row, 34% slower on the H100).
                r0 = s0 + T.min(T.max(j, 0), (t - s0) // BS) * BS
                T.copy(K[b, r0:r0 + BS, h, :], K_s, annotations=copy_ann)
                # The causal mask (it bites only in the block holding t) replaces the logits after
                # the product, not -inf added to them: a NaN key after t in t's block (a later token,
                # or a packed neighbour's) would make -inf + NaN = NaN (found by the pack NaN test).
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                for i, c in T.Parallel(M, BS):
                    acc_s[i, c] = T.if_then_else(ok & (r0 + c <= t), acc_s[i, c], ninf)

                online_softmax(acc_s, m, m_prev, alpha, ms, rsum, l, p, acc_o)
                T.copy(V[b, r0:r0 + BS, h, :], V_s, annotations=copy_ann)
                T.gemm(p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            # No usable slot leaves l == 0: write o = 0, lse = -inf. (`== 0`, not `> 0`: a NaN the
            # row sees makes l NaN, and it must reach o, as in the reference.)
            for i, d in T.Parallel(M, Dv):
                acc_o[i, d] = T.if_then_else(l[i] == 0, 0, acc_o[i, d] / l[i])
            T.copy(acc_o, O_s)
            T.copy(O_s[0:G, :], O[b, t, h * G:(h + 1) * G, :])
            for i in T.Parallel(M):
                if i < G:
                    LSE[b, t, h * G + i] = T.if_then_else(l[i] == 0, ninf, m[i] * cfg.scale + T.log(l[i]))

    return selection_attention_fwd


def _build_token_tile(cfg):
    HQ, H = cfg.heads_q, cfg.heads_kv
    G = HQ // H
    BT = _tile_tokens(cfg)
    M = _rows(cfg)
    E = _entries(cfg)
    NT = cfg.threads
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    BS, NSEL = cfg.block, cfg.top_n
    dtype = cfg.dtype
    acc = "float32"
    sc = float(cfg.scale)
    # K/V loads are TMA copies in TileLang's warp-specialized pipeline: the union's size is known
    # only at run time, and TileLang 0.1.15 cannot emit a cp.async pipeline epilogue for a dynamic
    # trip count (codegen fails). The per-token kernel avoided TMA after rare run-to-run wrong rows
    # on the H100; here the block ids come from shared memory written before a barrier, and the
    # GPU tests run each case twice for bit-identity.
    min_blocks = _min_blocks(cfg)
    ninf = -T.infinity(acc)
    online_softmax = _online_softmax(M, BS, Dv, sc)
    build_union = union_builder(BT, NSEL, BS, NT, sc)

    WS = cfg.warp_skip
    warp_uses = warp_uses_block(G)

    @T.macro
    def qk_softmax(it, t0, Q_s, K_s, acc_s, Bias_s, Blk_s, m, m_prev, alpha, ms, rsum, l, p, acc_o):
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
        # The bias, and the causal mask that bites only in the block holding a token. Masked
        # logits are replaced (not added to), so a NaN/Inf key in a block only the tile's other
        # tokens chose, or after the token, never reaches its row. (The causal test is written
        # doubled on purpose: as `Blk_s[it] + cc <= t0 + i // G` TVM's simplifier puts the
        # thread's column offsets first, nvcc hoists them as 32 loop invariants and spills
        # them inside the loop (37 vs 28 spill stores; the tile ran 21% slower on the H100).)
        for i, cc in T.Parallel(M, BS):
            acc_s[i, cc] = T.if_then_else(
                (Blk_s[it] * 2 + cc * 2 <= (t0 + i // G) * 2) & (Bias_s[it, i // G] > ninf),
                acc_s[i, cc] + Bias_s[it, i // G], ninf)
        online_softmax(acc_s, m, m_prev, alpha, ms, rsum, l, p, acc_o)

    B, S = T.dynamic("B, T")

    @T.prim_func
    def selection_attention_fwd(
        Q: T.Tensor([B, S, HQ, Dk], dtype),
        K: T.Tensor([B, S, H, Dk], dtype),
        V: T.Tensor([B, S, H, Dv], dtype),
        BlockIndices: T.Tensor([B, S, H, NSEL], "int32"),
        SeqStart: T.Tensor([B, S], "int32"),
        O: T.Tensor([B, S, HQ, Dv], dtype),
        LSE: T.Tensor([B, S, HQ], acc),
    ):
        with T.Kernel(T.ceildiv(S, BT), H, B, threads=NT) as (tt, h, b):
            Q_s = T.alloc_shared([M, Dk], dtype)
            K_s = T.alloc_shared([BS, Dk], dtype)
            V_s = T.alloc_shared([BS, Dv], dtype)
            O_s = T.alloc_shared([M, Dv], dtype)
            # The union of the tile's block lists (templates/_token_tile.py says what each holds).
            Ent_s = T.alloc_shared([E], "int32")
            First_s = T.alloc_shared([E], "int32")
            Blk_s = T.alloc_shared([E], "int32")
            Bias_s = T.alloc_shared([E, BT], acc)
            Num_s = T.alloc_shared([1], "int32")
            Blk_r = T.alloc_local([E], "int32")
            acc_s = T.alloc_fragment([M, BS], acc)
            p = T.alloc_fragment([M, BS], dtype)
            acc_o = T.alloc_fragment([M, Dv], acc)
            m = T.alloc_fragment([M], acc)
            m_prev = T.alloc_fragment([M], acc)
            alpha = T.alloc_fragment([M], acc)
            ms = T.alloc_fragment([M], acc)
            rsum = T.alloc_fragment([M], acc)
            l = T.alloc_fragment([M], acc)
            nu = T.alloc_var("int32")
            T.no_set_max_nreg()
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)

            tx = T.get_thread_binding()
            t0 = tt * BT
            # Q rows first (a plain load, in flight while the union forms); rows past T are zero.
            for i, d in T.Parallel(M, Dk):
                Q_s[i, d] = T.if_then_else(t0 + i // G < S, Q[b, T.min(t0 + i // G, S - 1), h * G + i % G, d],
                                           T.cast(0, dtype))

            build_union(BlockIndices, SeqStart, b, h, t0, S, tx, Ent_s, First_s, Blk_s, Bias_s, Num_s, Blk_r)
            nu = T.max(Num_s[0], 1)

            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, ninf)
            for it in T.Pipelined(nu, num_stages=cfg.num_stages):
                T.copy(K[b, Blk_r[it]:Blk_r[it] + BS, h, :], K_s)
                if WS:
                    # Every warp waits for the stage; a warp none of whose tokens chose the block skips it.
                    T.copy(V[b, Blk_r[it]:Blk_r[it] + BS, h, :], V_s)
                    if warp_uses(Bias_s, it, tx):
                        qk_softmax(it, t0, Q_s, K_s, acc_s, Bias_s, Blk_s, m, m_prev, alpha, ms, rsum, l, p, acc_o)
                        T.gemm(p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
                else:
                    qk_softmax(it, t0, Q_s, K_s, acc_s, Bias_s, Blk_s, m, m_prev, alpha, ms, rsum, l, p, acc_o)
                    T.copy(V[b, Blk_r[it]:Blk_r[it] + BS, h, :], V_s)
                    T.gemm(p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            for i, d in T.Parallel(M, Dv):
                acc_o[i, d] = T.if_then_else(l[i] == 0, 0, acc_o[i, d] / l[i])
            T.copy(acc_o, O_s)
            for i, d in T.Parallel(M, Dv):
                if t0 + i // G < S:
                    O[b, t0 + i // G, h * G + i % G, d] = O_s[i, d]
            for i in T.Parallel(M):
                if t0 + i // G < S:
                    LSE[b, t0 + i // G, h * G + i % G] = T.if_then_else(l[i] == 0, ninf, m[i] * cfg.scale + T.log(l[i]))

    return selection_attention_fwd
