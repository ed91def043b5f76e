"""NSA selection-block scoring + online top-n (TileLang template).

Layouts (contiguous, row-major):
    Q             [B, T, HQ, Dk]  dtype
    K_cmp         [B, N, H,  Dk]  dtype
    LSE           [B, T, HQ]      float32  (natural-log lse of the compression branch)
    SeqStart      [B, T]          int32    (the first token of t's sequence: 0 for a batch)
    CmpStart      [B, T]          int32    (the first compressed row of t's sequence in K_cmp)
    TileStart     [P]             int32    (the first token of each program's tile, -1: no tile)
    BlockIndices  [B, T, H, n]    int32    (output: selected blocks ascending, then -1)
    Counts        [B, T, H]       int32    (output: number of valid entries)

B, T, N and P are dynamic; everything else is fixed by the config.  Block ids, visibility and
scores are those of t's own sequence (local position t - SeqStart[t], compressed rows from
CmpStart[t]).  A tile never straddles sequences: the op's tile table starts one at every
multiple of BT tokens into each sequence (packing.tile_starts; for a batch, every BT tokens),
so a packed batch runs in one launch.

For token t and KV head h:
    p[c]     = sum_{hq in group h} exp(scale * q_t[hq].k_cmp[c] - lse[t, hq])   (visible c)
    score[j] = sum_c w(first_block + c, j) * p[c]          (w = shared stride units)
Visible selection blocks (j*sel_block <= t) are ranked by (score desc, index asc);
blocks 0..initial-1 and the `local` newest visible blocks are forced (+inf).

Structure: one program per (tile of at most BT = block_M // G tokens of one sequence, KV head, batch).
The G query heads of the group are packed (head-major) into the M dimension of
the Q tile (row g*BT + b <-> token t0+b, head h*G+g), so one gemm scores all
heads.  Selection blocks are processed in chunks of BS = block_N // r blocks
(r = sel_block // stride): chunk kc runs the gemm against the block_N
compressed rows c = kc*block_N + x (blocks i = c + first_block).  Scoring chunk
kc needs blocks i in [kc*block_N - (m-1), (kc+1)*block_N) (m = cmp_block //
stride: blocks reach m-1 stride units forward); the m-1+first_block of them
computed by the previous chunk are carried in a small smem halo of
group-summed probabilities.  K rows never go negative, so the K tile can come
in by TMA for every first_block.  Scores never leave the SM:
TPR = threads // BT threads share a token row, each scores a strided subset of
the chunk's blocks and keeps a private sorted top-n in registers (insertion
network; candidates arrive in increasing index order, so strict '>' keeps the
lower index on ties).  At the end the TPR lists of a row are tree-merged in
shared memory with the full (score desc, index asc) order, and each entry is
written at its rank among the selected indices.  Nothing of size
[B, T, H, num_blocks] is ever written to global memory.

Schedule overlap (sm90, k_load="tma"): the tensor cores would idle while a chunk is scored (exp2,
group sum, insertion: SIMT work about as long as the chunk's gemm). With overlap, step kc issues
chunk kc's gemm as an async WGMMA into S, scores chunk kc-1 from S_prev meanwhile, then waits and
copies S to S_prev (one extra step at the end; its K rows, past the last chunk, are TMA zero-fill).
Interior chunks (every block visible to the tile's first token) skip the visibility mask (overlap
schedule only).

Schedule ring_halo: Pg_s is a ring of 2 * block_N columns (chunk kc's column c at (kc * BN + c) %
(2 * BN)), so the previous chunk's last HALO group sums stay where they are: no halo copy, and a
chunk needs only the barriers after its exp2 (P_s complete) and after its group sums (Pg_s
complete). The group sums of chunk kc overwrite chunk kc-2's columns, which chunk kc-1's scoring
read before every thread passed chunk kc's first barrier; one barrier after the last chunk keeps
its reads apart from the merge buffers.
"""

import dataclasses
import math
from dataclasses import dataclass

import tilelang.language as T

from ._problem import check_problem

_LOG2E = 1.4426950408889634
_BIG = 1 << 30


@dataclass(frozen=True)
class SelectionTopNConfig:
    heads_q: int = 64           # HQ
    heads_kv: int = 4           # H
    dim_k: int = 128            # Dk
    cmp_block: int = 32         # l
    stride: int = 16            # d (d | l, d | sel_block)
    first_block: int = 0        # f
    sel_block: int = 64         # l'
    top_n: int = 16             # n (<= 32)
    initial: int = 1            # forced leading blocks
    local: int = 2              # forced most-recent blocks
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"     # "float16" | "bfloat16"
    # schedule (defaults: fastest GPU-verified setting valid for every first_block)
    block_M: int = 128          # gemm rows = (block_M // G) tokens x G heads
    block_N: int = 32           # compressed blocks per chunk (multiple of sel_block//stride);
                                # 0 = auto: the largest of 128, 64, 32, 16 this config accepts
    threads: int = 128          # 128, 256 or 512; threads // (block_M // G) threads share a token row
    num_stages: int = 1         # K pipeline depth, used by k_load="tma" (1-3); cp_async needs 1;
                                # ignored by "sync" (nothing to pipeline)
    k_load: str = "sync"        # "sync" | "cp_async" | "tma"
    fast_math: bool = False     # compile with TileLang's fast-math pass config (approximate exp2)
    overlap: bool = False       # (sm90, k_load="tma") issue chunk kc+1's gemm as an async WGMMA and
                                # score chunk kc while it runs (two score accumulators)
    ring_halo: bool = False     # group-summed probabilities in a ring of 2 * block_N columns: the
                                # previous chunk's tail stays in place (no halo copy), 2 barriers a
                                # chunk instead of 4
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)


def _derived(cfg):
    G = cfg.heads_q // cfg.heads_kv
    m = cfg.cmp_block // cfg.stride      # stride units per compressed block
    r = cfg.sel_block // cfg.stride      # stride units per selection block
    BT = cfg.block_M // G
    BS = cfg.block_N // r
    TPR = cfg.threads // BT
    return G, m, r, BT, BS, TPR


def _overlap_weights(m: int, r: int):
    """w[u] for compressed block i = j*r - (m-1) + u and selection block j."""
    return [min(u, r - 1) - max(u - m + 1, 0) + 1 for u in range(r + m - 1)]


def _smem_bytes(cfg) -> int:
    G, m, r, BT, BS, TPR = _derived(cfg)
    q = cfg.block_M * cfg.dim_k * 2
    k = cfg.block_N * cfg.dim_k * 2 * max(cfg.num_stages, 1)
    pg = BT * (2 * cfg.block_N if cfg.ring_halo else cfg.block_N + m - 1 + cfg.first_block + TPR) * 4
    p = cfg.block_M * (cfg.block_N + 4) * 4 + pg
    merge = cfg.threads * (cfg.top_n + 1) * 8
    # the merge buffers are live only after the loop: they share the K/P space
    return q + max(k + p, merge + pg) + 1024


def pass_configs(cfg) -> dict:
    """TileLang pass configs this kernel is compiled with."""
    return {"tl.enable_fast_math": bool(cfg.fast_math)}


def _resolve(cfg):
    """cfg with block_N = 0 (auto) replaced by the largest chunk width it accepts."""
    if cfg.block_N:
        return cfg
    for bn in (128, 64, 32):
        c = dataclasses.replace(cfg, block_N=bn)
        try:
            check_config(c)
            return c
        except ValueError:
            pass
    return dataclasses.replace(cfg, block_N=16)


def check_config(cfg) -> None:
    """Raise ValueError (naming the field) for configs this template cannot build."""
    if cfg.block_N == 0:
        cfg = _resolve(cfg)
    check_problem(cfg, dk="dim_k", dv=None)
    G = cfg.heads_q // cfg.heads_kv
    if cfg.stride <= 0 or cfg.cmp_block % cfg.stride != 0:
        raise ValueError("stride must divide cmp_block")
    if cfg.sel_block % cfg.stride != 0:
        raise ValueError("stride must divide sel_block")
    if cfg.first_block < 0:
        raise ValueError("first_block must be >= 0")
    if not (1 <= cfg.top_n <= 32):
        raise ValueError("top_n must be in [1, 32]")
    if cfg.initial < 0 or cfg.local < 0 or cfg.initial + cfg.local > cfg.top_n:
        raise ValueError("initial/local must be >= 0 with initial + local <= top_n")
    if cfg.threads not in (128, 256, 512):
        raise ValueError("threads must be 128, 256 or 512")
    if cfg.block_M % 64 != 0 or cfg.block_M < 64 * (cfg.threads // 128) or cfg.block_M > 256:
        raise ValueError("block_M must be a multiple of 64, >= 64*threads/128 and <= 256")
    if cfg.block_M % G != 0:
        raise ValueError("block_M must be a multiple of G = heads_q // heads_kv")
    G, m, r, BT, BS, TPR = _derived(cfg)
    if cfg.threads % BT != 0:
        raise ValueError("threads must be a multiple of block_M // G (one thread per token row at least)")
    if cfg.block_N % 16 != 0 or not (16 <= cfg.block_N <= 128):
        raise ValueError("block_N must be a multiple of 16 in [16, 128]")
    if cfg.block_N % r != 0:
        raise ValueError("block_N must be a multiple of sel_block // stride")
    if cfg.k_load not in ("sync", "cp_async", "tma"):
        raise ValueError("k_load must be 'sync', 'cp_async' or 'tma'")
    if cfg.cmp_block // cfg.stride - 1 + cfg.first_block > cfg.block_N:
        raise ValueError("block_N: must be >= cmp_block // stride - 1 + first_block (the carried halo)")
    if cfg.num_stages < 1 or cfg.num_stages > 3:
        raise ValueError("num_stages must be in [1, 3]")
    if cfg.k_load == "cp_async" and cfg.num_stages != 1:
        raise ValueError("num_stages must be 1 with k_load='cp_async' (tilelang 0.1.15 codegen fails for more)")
    if cfg.block_M * cfg.block_N / cfg.threads > 64:
        raise ValueError("block_N: score accumulator needs > 64 registers per thread")
    if cfg.ring_halo and (2 * cfg.block_N) % TPR:
        raise ValueError("ring_halo: 2 * block_N must be a multiple of threads // (block_M // G)")
    if cfg.overlap and cfg.k_load != "tma":
        raise ValueError("overlap needs k_load='tma' (a producer warpgroup brings K while the consumers score)")
    if _smem_bytes(cfg) > cfg.smem_block:
        raise ValueError(f"block_M: shared memory (Q + K stages + P + merge) exceeds the arch's {cfg.smem_block // 1024} KiB")


def build(cfg: SelectionTopNConfig):
    """Return the (uncompiled) prim_func main(Q, K_cmp, LSE, SeqStart, CmpStart, TileStart, BlockIndices, Counts)."""
    check_config(cfg)
    cfg = _resolve(cfg)
    HQ, H, Dk = cfg.heads_q, cfg.heads_kv, cfg.dim_k
    l, d, f, lp = cfg.cmp_block, cfg.stride, cfg.first_block, cfg.sel_block
    n, n_init, n_local = cfg.top_n, cfg.initial, cfg.local
    BM, BN, NT = cfg.block_M, cfg.block_N, cfg.threads
    G, m, r, BT, BS, TPR = _derived(cfg)
    OV = cfg.overlap
    HALO = m - 1 + f                   # carried blocks: Pg_s column u <-> block kc*BN - (m-1) + u
    # width of the group-summed prob buffer, padded so BT*PW is a multiple of
    # the thread count (tile-op layouts must cover the iteration space evenly)
    RING = cfg.ring_halo
    PW = 2 * BN if RING else (BN + HALO + TPR - 1) // TPR * TPR
    CPT = (BS + TPR - 1) // TPR        # candidates per thread per chunk
    w = _overlap_weights(m, r)
    merge_steps = [1 << s for s in range(int(math.log2(TPR)))]   # TPR is a power of 2
    dtype, acc = cfg.dtype, "float32"
    scale2 = float(cfg.scale) * _LOG2E
    NEG_INF = -T.infinity(acc)
    POS_INF = T.infinity(acc)

    B, Tn, N, P = T.dynamic("B, T, N, P")

    def block_score(Pg_s, row, jj, kc):
        # sum_u w[u] * Pg[row, jj*r + u]; weights are compile-time constants. Ring: chunk kc's
        # column c sits at (kc * BN + c) % PW (PW = 2 * BN, a power of two).
        base = kc * BN + jj * r if RING else jj * r
        e = Pg_s[row, base % PW if RING else base] * float(w[0])
        for u in range(1, r + m - 1):
            e = e + Pg_s[row, (base + u) % PW if RING else base + u] * float(w[u])
        return e

    def group_sum(P_s, b, x):
        e = P_s[b, x]
        for g in range(1, G):
            e = e + P_s[g * BT + b, x]
        return e

    def token_of_tile(TileStart, SeqStart, bx, bz, t_row, s0):
        # Whether a thread's row is a token of the tile's sequence. Written out where it is tested,
        # never bound to a name in the kernel: TileLang hoists such a binding (it reads memory) above
        # the warp-specialized split, where the consumer threads' index is not yet remapped
        # (threadIdx.x - 128), and the rows came out shifted by 8 (H100, 2026-12-07);
        # codegen.thread_values_across_warp_split rejects such code.
        return (TileStart[bx] >= 0) & (t_row < Tn) & (SeqStart[bz, T.min(t_row, Tn - 1)] == s0)

    def better(sa, ia, sb, ib):
        # strict total order: higher score first, lower block index on ties
        return (sa > sb) | ((sa == sb) & (ia < ib))

    @T.macro
    def score_chunk(Sx, kc, t0, s0, c0, jt, row, lane, tx, rok, lse2, P_s, Pg_s, top_s, top_i):
        """Chunk kc's gemm result Sx [BM, BN] -> this thread's top-n list (top_s / top_i)."""
        cs = T.alloc_var(acc)
        ci = T.alloc_var("int32")
        ts = T.alloc_var(acc)
        ti = T.alloc_var("int32")
        # compression-branch probabilities (base-2 exp with log2e folded in). Interior chunks (every
        # block visible to the tile's first token, so to all its tokens) skip the mask: rows of
        # tokens outside the sequence get values there, but only their own rows of Pg_s, which are
        # never written out. (Overlap schedule only, for now: the default's code stays the one
        # verified on the GPU until this path has been.)
        if (((kc + 1) * BN - 1 + f) * d + l - 1 <= t0 - s0) if OV else False:
            for i, x in T.Parallel(BM, BN):
                P_s[i, x] = T.exp2(Sx[i, x] * scale2 - lse2[i])
        else:
            for i, x in T.Parallel(BM, BN):
                P_s[i, x] = T.if_then_else(
                    (c0 + kc * BN + x < N) & ((kc * BN + x + f) * d + l - 1 <= t0 - s0 + i % BT)
                    & (rok[i] == 1), T.exp2(Sx[i, x] * scale2 - lse2[i]), 0)
        if RING:
            # The ring keeps the previous chunk's tail in place. Columns this writes were last read
            # by chunk kc-1's scoring, which every thread finished before the barrier above.
            for b, x in T.Parallel(BT, BN):
                Pg_s[b, (kc * BN + HALO + x) % PW] = group_sum(P_s, b, x)
        else:
            if HALO > 0:
                # carry the previous chunk's last HALO blocks to the front
                for q in T.unroll((BT * HALO + NT - 1) // NT):
                    if tx + q * NT < BT * HALO:
                        Pg_s[(tx + q * NT) // HALO, (tx + q * NT) % HALO] = \
                            Pg_s[(tx + q * NT) // HALO, BN + (tx + q * NT) % HALO]
                T.sync_threads()
            for b, x in T.Parallel(BT, BN):
                Pg_s[b, HALO + x] = group_sum(P_s, b, x)
        T.sync_threads()
        # score this thread's blocks and insert into its private top-n.
        # Candidates arrive in increasing index, so "strictly greater"
        # keeps the lower index first on ties.
        for q in T.unroll(CPT):
            if (lane + q * TPR < BS) & (kc * BS + lane + q * TPR <= jt):
                cs = block_score(Pg_s, row, lane + q * TPR, kc)
                ci = kc * BS + lane + q * TPR
                if (ci < n_init) | (ci > jt - n_local):
                    cs = POS_INF
                if cs > top_s[n - 1]:
                    for k in T.unroll(n):
                        if cs > top_s[k]:
                            ts = top_s[k]
                            ti = top_i[k]
                            top_s[k] = cs
                            top_i[k] = ci
                            cs = ts
                            ci = ti
        if not RING:
            T.sync_threads()

    @T.prim_func
    def main(
        Q: T.Tensor([B, Tn, HQ, Dk], dtype),
        K_cmp: T.Tensor([B, N, H, Dk], dtype),
        LSE: T.Tensor([B, Tn, HQ], acc),
        SeqStart: T.Tensor([B, Tn], "int32"),
        CmpStart: T.Tensor([B, Tn], "int32"),
        TileStart: T.Tensor([P], "int32"),
        BlockIndices: T.Tensor([B, Tn, H, n], "int32"),
        Counts: T.Tensor([B, Tn, H], "int32"),
    ):
        with T.Kernel(P, H, B, threads=NT) as (bx, by, bz):
            Q_s = T.alloc_shared([BM, Dk], dtype)
            K_s = T.alloc_shared([BN, Dk], dtype)
            S = T.alloc_fragment([BM, BN], acc)
            if OV:   # the previous chunk's scores, read while the next chunk's gemm runs
                S_prev = T.alloc_fragment([BM, BN], acc)
                k_hold = T.alloc_local([1], dtype)
            lse2 = T.alloc_fragment([BM], acc)
            rok = T.alloc_fragment([BM], "int32")
            # +4 floats of row padding: the wgmma accumulator stores 8 rows x 4
            # column pairs per warp instruction; a row stride that is a multiple
            # of 32 floats would put all 8 rows in the same banks (8-way conflict;
            # fixing this took the FLA-shape top-n from 5.5 to 4.1 ms)
            P_s = T.alloc_shared([BM, BN + 4], acc)
            Pg_s = T.alloc_shared([BT, PW], acc)
            # odd row stride (n+1): per-thread lists in distinct banks
            M_s = T.alloc_shared([NT, n + 1], acc)
            M_i = T.alloc_shared([NT, n + 1], "int32")
            top_s = T.alloc_local([n], acc)
            top_i = T.alloc_local([n], "int32")
            ci = T.alloc_var("int32")
            ti = T.alloc_var("int32")
            pa = T.alloc_var("int32")
            pb = T.alloc_var("int32")
            cnt = T.alloc_var("int32")

            tx = T.get_thread_binding()
            row = tx // TPR                  # token row owned by this thread
            lane = tx % TPR                  # which strided subset of a chunk's blocks
            # The tile: tokens t0 .. t0+BT-1 of the sequence starting at s0 (rows past its end, or
            # every row of an unused table slot, are off); its compressed rows start at c0.
            live = TileStart[bx] >= 0
            t0 = T.max(TileStart[bx], 0)
            s0 = SeqStart[bz, t0]
            c0 = CmpStart[bz, t0]
            t_row = t0 + row
            jt = (t_row - s0) // lp          # newest selection block visible to t_row


            # Q tile, head-major rows: row g*BT + b <-> (token t0+b, head by*G+g)
            for g in T.unroll(G):
                T.copy(Q[bz, t0:t0 + BT, by * G + g, :], Q_s[g * BT:(g + 1) * BT, :], disable_tma=True,
                       coalesced_width=8)
            for i in T.Parallel(BM):
                rok[i] = T.if_then_else(
                    live & (t0 + i % BT < Tn) & (SeqStart[bz, T.min(t0 + i % BT, Tn - 1)] == s0), 1, 0)
                lse2[i] = T.if_then_else(rok[i] == 1, LSE[bz, T.min(t0 + i % BT, Tn - 1), by * G + i // BT] * _LOG2E, 0)
            # zero halo for the first chunk (T.Parallel: with a TMA producer warpgroup the prologue
            # runs on NT + 128 threads, and a tx-strided loop's guard, provable from tx < NT, is
            # dropped: the extra threads wrote past Pg_s)
            for b_, x in T.Parallel(BT, PW):
                Pg_s[b_, x] = 0
            for k in T.unroll(n):
                top_s[k] = NEG_INF           # empty slot: never beats a visible block
                top_i[k] = -1

            t_last = T.min(t0 + BT, Tn) - 1 - s0     # (local; rows past the sequence are off)
            n_chunks = (t_last // lp) // BS + 1
            if OV:
                T.clear(S_prev)   # (read only from the second step on)
                # One extra step: step kc issues chunk kc's gemm (none in the last) and scores
                # chunk kc-1 meanwhile. Its K rows (past the last chunk: TMA zero-fills) are unused.
                for kc in T.Pipelined(n_chunks + 1, num_stages=cfg.num_stages):
                    T.copy(K_cmp[bz, c0 + kc * BN:c0 + (kc + 1) * BN, by, :], K_s)
                    if kc < n_chunks:
                        T.wgmma_gemm(Q_s, K_s, S, transpose_B=True, clear_accum=True,
                                     policy=T.GemmWarpPolicy.FullRow)
                    if kc > 0:
                        score_chunk(S_prev, kc - 1, t0, s0, c0, jt, row, lane, tx, rok, lse2, P_s, Pg_s,
                                    top_s, top_i)
                    T.wait_wgmma(0)
                    # K_s is read here, after the wait, so its stage is freed only once the gemm
                    # reading it is done (TileLang frees a stage after its last reader statement)
                    k_hold[0] = K_s[0, 0]
                    T.copy(S, S_prev)
            else:
                for kc in T.Pipelined(n_chunks, num_stages=cfg.num_stages):
                    # compressed rows c = kc*BN + x  ->  blocks i = c + f (zero outside [0, N))
                    if cfg.k_load == "tma":
                        # bulk tensor copy; rows >= N are zero-filled by the TMA unit.
                        # The pipeline pass warp-specializes (one producer warpgroup).
                        T.copy(K_cmp[bz, c0 + kc * BN:c0 + (kc + 1) * BN, by, :], K_s)
                    elif cfg.k_load == "cp_async":
                        # predicated cp.async, prefetched one chunk ahead
                        T.copy(K_cmp[bz, c0 + kc * BN:c0 + (kc + 1) * BN, by, :], K_s, disable_tma=True)
                    else:
                        # plain predicated loads
                        for x, k in T.Parallel(BN, Dk):
                            K_s[x, k] = T.if_then_else(
                                c0 + kc * BN + x < N, K_cmp[bz, c0 + kc * BN + x, by, k], T.cast(0, dtype))
                    T.gemm(Q_s, K_s, S, transpose_B=True, clear_accum=True,
                           policy=T.GemmWarpPolicy.FullRow)
                    score_chunk(S, kc, t0, s0, c0, jt, row, lane, tx, rok, lse2, P_s, Pg_s, top_s, top_i)

            if RING:
                # the chunks end without a barrier: the merge buffers may share the scores' space
                T.sync_threads()
            # tree-merge the TPR private lists of each row (sorted, keep n)
            for k in T.unroll(n):
                M_s[tx, k] = top_s[k]
                M_i[tx, k] = top_i[k]
            T.sync_threads()
            for step in merge_steps:
                if lane % (2 * step) == 0:
                    pa = 0
                    pb = 0
                    for k in T.unroll(n):
                        if better(M_s[tx, pa], M_i[tx, pa], M_s[tx + step, pb], M_i[tx + step, pb]):
                            top_s[k] = M_s[tx, pa]
                            top_i[k] = M_i[tx, pa]
                            pa = pa + 1
                        else:
                            top_s[k] = M_s[tx + step, pb]
                            top_i[k] = M_i[tx + step, pb]
                            pb = pb + 1
                T.sync_threads()
                if lane % (2 * step) == 0:
                    for k in T.unroll(n):
                        M_s[tx, k] = top_s[k]
                        M_i[tx, k] = top_i[k]
                T.sync_threads()

            # emit ascending indices: entry e goes to position rank(e) among
            # keys (index, or BIG+e for empty slots, which sort last as -1)
            if token_of_tile(TileStart, SeqStart, bx, bz, t_row, s0):
                for q in T.unroll((n + TPR - 1) // TPR):
                    if lane + q * TPR < n:
                        ci = M_i[row * TPR, lane + q * TPR]
                        if ci < 0:
                            ci = _BIG + lane + q * TPR
                        cnt = 0
                        for e in T.unroll(n):
                            ti = M_i[row * TPR, e]
                            if ti < 0:
                                ti = _BIG + e
                            if ti < ci:
                                cnt = cnt + 1
                        BlockIndices[bz, t_row, by, cnt] = T.if_then_else(ci < _BIG, ci, -1)
                if lane == 0:
                    cnt = 0
                    for e in T.unroll(n):
                        if M_i[row * TPR, e] >= 0:
                            cnt = cnt + 1
                    Counts[bz, t_row, by] = cnt

    return main
