"""NSA decode against a KV cache (q_len = 1..8 new queries per sequence), TileLang.

One template family; `cfg.part` picks the kernel build() returns.  Layouts (contiguous,
row-major); B, the cache capacities CAP / CAPC and every split / chunk count are dynamic
(`T.dynamic`), everything else is fixed by the config:

    Q          [B, ql, HQ, Dk]       dtype    new queries; query i sits at t_i = L_b - ql + i
    SeqLens    [B]                   int32    L_b = cache length after the append
    K_cmp      [B, CAPC, H, Dk]      dtype    compressed rows (row c = block first_block + c)
    V_cmp      [B, CAPC, H, Dv]      dtype
    KV_K       [B, CAP, NB, H, Dk]   dtype    raw keys; NB = 2 when the window branch has its
    KV_V       [B, CAP, NB, H, Dv]   dtype    own K/V (slot 0 = selection, 1 = window), else 1
    Scores     [B, ql, CG, NBG, HQ]  float16  per group g of SG compressed rows (score_groups) and
                                              block k < NBG it overlaps: sum over its rows c of
                                              w(c) * exp2(s - m), s = log2(e) * scale * q.k_cmp,
                                              w the stride-unit overlap weight, m the cmp
                                              program's running max at g's tile; groups at or
                                              past N(t_last) are not written; a KV group's G
                                              heads are contiguous (one vector load)
    ScoreMax   [B, ql, CG, HQ]       float32  that m per group, CG = ceil(CAPC / SG)
    O_cmp      [B, H, SC, MR, Dv]    float32  per-split normalised partial outputs
    L_cmp      [B, H, SC, MR]        float32  per-split base-2 lse (-inf: split saw nothing)
    CandS/CandI[B, ql, H, NC, n]     f32/i32  per-chunk top-n candidates (key, block)
    BlockIdx   [B, ql, H, n]         int32    selected blocks ascending, -1 padded (output)
    O_slc/L_slc[B, H, SS, MR(, Dv)]  float32  selection partials, SS = ql * S_sel
    O_win/L_win[B, H, SW, MR(, Dv)]  float32  window partials
    G_cmp/G_slc/G_win [B, ql, HQ]    dtype    gates
    O          [B, ql, HQ, Dv]       dtype    output
Row r = i * G + g of a tile (MR = G * ql real rows, padded to MP, see _rows) is query i,
query head h * G + g of KV head h.  Rows of the caches at or beyond L_b are never used but
must be finite (the cache zero-fills them): masked probabilities are 0 and 0 * NaN is NaN.

Paged caches (page_size P > 0; PagedNSAKVCache's pools), cmp and sparse parts only:
    K_cmp / V_cmp   [NPC, P, H, Dk / Dv]       compressed-row pool (cmp)
    KV_K / KV_V     [NP, P, NB, H, Dk / Dv]    token pool (sparse)
    SeqLens         [B, 1 + MPT]  int32        column 0: L_b; columns 1..: the entry's block table
                                               (the cmp part: its compressed rows', the sparse part:
                                               its tokens'); row j lives at page table[j // P],
                                               offset j % P
The table rides in SeqLens so the contiguous kernels keep their exact signature and code (and their
tuning records).  A table entry < 0 (no page) reads the pool's last page, which the cache keeps zero
and never hands out.  Every tile is aligned to its size (window tiles start at ws rounded down to
sel_block; the extra keys are masked), so a tile lies in one page where its size divides P, else
spans size / P whole pages.

Parts (all deterministic, no atomics):
  cmp     grid (SC, H, B): split-KV over the compressed rows visible to the last query,
          N(L) = max(L - l - f*d + d, 0) // d rows, in SC contiguous chunks of block_N-row tiles;
          the G*ql query rows are packed in M.  Writes the block sums for top-n (Scores: one
          more gemm a tile, P [MP, block_N] x a block-diagonal weight matrix; with ScoreMax 0.875
          bytes a row and query head in the paper config, where per-row fp16 scores took 2.25)
          and a partial (o, lse) per split.  mma / wgmma.  K/V tiles (cmp_load): "cp_async" =
          cp.async, one tile of lookahead (cmp_stages 1); "tma" (sm90) = TMA bulk tensor copies
          from a producer warpgroup the pipeline pass adds (NT + 128 threads), cmp_stages (1..3)
          K and V buffers, mbarrier-synchronised.  Tail rows past the split are loaded (finite
          cache rows; TMA zero-fills rows >= CAPC) and masked.
  topn    grid (NC, ql*H, B): lse per head from the SC partials; program c scores the
          `topn_threads` selection blocks [c*CB, (c+1)*CB) (one per thread): a block's key is
          the sum over the groups it overlaps (1-2) and the KV group's heads of Scores *
          exp2(ScoreMax - lse); forced initial/local blocks +inf, invisible -inf; an exact rank
          count in shared memory gives the chunk's top-n
          under (score desc, index asc), written as candidates.
  sparse  grid (ql*S_sel + SW, H, B): programs < SS merge the NC*n candidates of their query
          (each one's rank by binary search in every chunk's sorted list, then sort ascending;
          split 0 writes BlockIdx) and attend over
          their share of the selected blocks (keys <= t); the others attend over their share of
          the window span (L - ql - w, L) (keys in (t_i - w, t_i] per row).  One cp.async
          pipeline, tiles of sel_block keys, one (o, lse) partial per program.
  combine grid (MR, H, B): merges the three partial sets in base 2 (online, rounds of 4 splits of
          every branch: each split's lse and partial load together), applies the gates, writes O.
The exact top-n of a query is the top-n of the union of its chunks' top-n lists, so the
two-level selection equals reference.select_top_n (ties to the lower block index) on the keys it
ranks; those carry the fp16 rounding of p and of the block sums (relative 2^-11 each), so blocks
whose keys tie to about that precision may swap (reference.compare_block_indices accepts such near
ties; the output then differs from the reference's by that block's share).
With pdl (sm90) each kernel lets its successor launch (griddepcontrol.launch_dependents) once
its main loop is done (top-n: at its start), and the successor waits (griddepcontrol.wait: the
predecessor complete, its writes visible) right before it reads the predecessor's outputs.
"""

from dataclasses import dataclass

import tilelang.language as T

from ._problem import check_problem, warps_cover

_LOG2E = 1.4426950408889634
_BIG = 1 << 30
PARTS = ("cmp", "topn", "sparse", "combine")
CMP_LOADS = ("cp_async", "tma")
MAX_CMP_SPLITS = 64         # upper bound on SC (the top-n kernel stages the lse partials in smem)


@dataclass(frozen=True)
class DecodeAttentionConfig:
    heads_q: int = 64           # HQ
    heads_kv: int = 4           # H
    head_dim_qk: int = 128      # Dk
    head_dim_v: int = 128       # Dv
    cmp_block: int = 32         # l
    stride: int = 16            # d
    first_block: int = 0        # f
    sel_block: int = 64         # l'
    top_n: int = 16             # n
    initial: int = 1
    local: int = 2
    window: int = 512           # w
    scale: float = 128 ** -0.5
    dtype: str = "bfloat16"
    q_len: int = 1              # new queries per sequence (1..8)
    separate_window: bool = False  # NB = 2: the window branch has its own K/V (cache slot 1)
    max_seqlen: int = 131072    # bound on the cache length; sizes the candidate merge (NC <= this / (l'*CB))
    page_size: int = 0          # 0: contiguous caches; P > 0: the cmp / sparse parts read paged pools
                                # through block tables ("Paged caches" above)
    part: str = "cmp"           # "cmp" | "topn" | "sparse" | "combine"
    # schedule
    cmp_block_N: int = 64       # compressed rows per tile
    cmp_threads: int = 0        # 0 = auto (128 for MP <= 64, else 256)
    cmp_load: str = "cp_async"  # K/V tile loads: "cp_async" | "tma" (sm90 only: TMA bulk tensor
                                # copies from a producer warpgroup; sm80 schedules must not use it)
    cmp_stages: int = 1         # T.Pipelined stages: K/V tiles in flight per operand.  cp_async: 1
                                # (one tile of lookahead; TileLang 0.1.15 fails to generate code for
                                # more with a dynamic trip count); tma: 1..3
    topn_threads: int = 128     # = selection blocks per top-n chunk (CB)
    sparse_threads: int = 128
    sparse_stages: int = 1      # must be 1, as cmp_stages with cp_async
    combine_threads: int = 128
    fast_math: bool = False
    # the arch's shared memory (codegen sets them from the key's arch; kernel_key.SHARED_MEMORY)
    smem_block: int = 227 * 1024   # bytes one program may use (sm90; sm80: 163 KiB)
    smem_sm: int = 228 * 1024      # bytes per SM (occupancy)
    pdl: bool = False           # programmatic dependent launch (sm90): topn / sparse / combine launch
                                # while their predecessor drains and wait (griddepcontrol.wait) only
                                # before reading its outputs; the window programs of sparse never wait


def _rows(cfg):
    G = cfg.heads_q // cfg.heads_kv
    MR = G * cfg.q_len
    # Padded to 16-row MMA slabs, and to a power of two of them up to 8 (then whole 128-row
    # groups): the warps split the rows evenly only then (48 rows over 4 warps has no layout).
    slabs = -(-MR // 16)
    MP = 16 * (1 << (slabs - 1).bit_length() if slabs <= 8 else -(-slabs // 8) * 8)
    return G, MR, MP


def score_groups(cmp_block, stride, first_block, sel_block):
    """(SG, NBG, JMIN): the cmp kernel sums its top-n scores per group of SG compressed rows into
    the NBG selection blocks those rows overlap, blocks GB*g + JMIN + k (k < NBG) of group g, GB =
    SG / (sel_block / stride), each with the overlap weights of its rows.  SG = max(16,
    sel_block / stride), so every group starts at the same phase of the block grid and one weight
    matrix serves all groups.  The weight of unit u (0 <= u <= r_u + m_u - 2, m_u = cmp_block /
    stride) is min(u + 1, r_u) - max(u - m_u + 1, 0): the stride units compressed block
    j*r_u - (m_u - 1) - first_block + u shares with selection block j."""
    m_u, r_u = cmp_block // stride, sel_block // stride
    SG = max(16, r_u)
    o = m_u - 1 + first_block                   # row c is unit u = c + o - j*r_u of block j
    jmin = -((r_u + m_u - 2 - o) // r_u)        # ceil((o - (r_u + m_u - 2)) / r_u)
    jmax = (SG - 1 + o) // r_u
    return SG, jmax - jmin + 1, jmin


def _cmp_threads(cfg):
    if cfg.cmp_threads:
        return cfg.cmp_threads
    return 128 if _rows(cfg)[2] <= 64 else 256


def _p_in_regs(mp, threads):
    # FullRow: warps split the rows first (16 each), then the key columns.  A warp that owns only
    # some key columns of its rows can't feed P @ V from registers: P goes through shared memory.
    return threads // 32 <= mp // 16


def _n_cand_max(cfg):
    nsb = (cfg.max_seqlen + cfg.sel_block - 1) // cfg.sel_block
    return (nsb + cfg.topn_threads - 1) // cfg.topn_threads * cfg.top_n


def _regs(mp, bn, dv, threads):
    return mp * (dv + 1.5 * bn) / threads


def _smem_attn(mp, bn, dk, dv, stages, threads):
    p = 0 if _p_in_regs(mp, threads) else mp * bn * 2
    return mp * dk * 2 + stages * bn * (dk + dv) * 2 + p + 1024


def pass_configs(cfg) -> dict:
    return {"tl.enable_fast_math": bool(cfg.fast_math)}


def check_config(cfg) -> None:
    """Raise ValueError whose message starts with the offending field."""
    if cfg.part not in PARTS:
        raise ValueError(f"part: must be one of {PARTS}, got {cfg.part!r}")
    check_problem(cfg)
    G = cfg.heads_q // cfg.heads_kv
    if cfg.stride < 1 or cfg.cmp_block % cfg.stride:
        raise ValueError("stride: must divide cmp_block")
    if cfg.cmp_block not in (16, 32, 64, 128, 256):
        raise ValueError("cmp_block: must be 16, 32, 64, 128 or 256")
    if cfg.first_block < 0:
        raise ValueError("first_block: must be >= 0")
    if cfg.sel_block not in (32, 64, 128) or cfg.sel_block % cfg.stride:
        raise ValueError("sel_block: must be 32, 64 or 128 and a multiple of stride")
    if not 1 <= cfg.top_n <= 32:
        raise ValueError("top_n: must be in 1..32")
    if cfg.initial < 0 or cfg.local < 0 or cfg.initial + cfg.local > cfg.top_n:
        raise ValueError("initial: initial, local >= 0 and initial + local <= top_n required")
    if cfg.local < 0:
        raise ValueError("local: must be >= 0")
    if not 1 <= cfg.window <= 4096:
        raise ValueError("window: must be in 1..4096 (the decode kernels need all three branches)")
    if not 1 <= cfg.q_len <= 8:
        raise ValueError("q_len: must be in 1..8")
    if cfg.max_seqlen < 1:
        raise ValueError("max_seqlen: must be >= 1")
    P = cfg.page_size
    if P and (P not in (16, 32, 64, 128, 256) or (cfg.sel_block % P and P % cfg.sel_block)):
        raise ValueError("page_size: must be 0 (contiguous) or 16..256 (a power of 2) dividing or divided by sel_block")
    if P and cfg.part == "cmp" and cfg.cmp_block_N % P and P % cfg.cmp_block_N:
        raise ValueError(f"cmp_block_N: must divide or be a multiple of page_size {P}")
    _, MR, MP = _rows(cfg)
    if MP > 256:
        raise ValueError("q_len: (heads_q / heads_kv) * q_len must be <= 256")
    Dk, Dv = cfg.head_dim_qk, cfg.head_dim_v
    if cfg.part == "cmp":
        bn, nt = cfg.cmp_block_N, _cmp_threads(cfg)
        if bn not in (16, 32, 64, 128):
            raise ValueError("cmp_block_N: must be 16, 32, 64 or 128")
        SG = score_groups(cfg.cmp_block, cfg.stride, cfg.first_block, cfg.sel_block)[0]
        if bn % SG:
            raise ValueError(f"cmp_block_N: must be a multiple of {SG} (the top-n score group: "
                             "max(16, sel_block / stride) compressed rows)")
        if nt not in (64, 128, 256):
            raise ValueError("cmp_threads: must be 0 (auto), 64, 128 or 256")
        n_split = max(1, (nt // 32) // max(1, MP // 16))
        if not (warps_cover(bn, n_split) and warps_cover(Dv, n_split)):
            raise ValueError("cmp_threads: too many warps for cmp_block_N / head_dim_v (each needs whole 8-column tiles)")
        if cfg.cmp_load not in CMP_LOADS:
            raise ValueError(f"cmp_load: must be one of {CMP_LOADS}, got {cfg.cmp_load!r}")
        if cfg.cmp_load == "cp_async" and cfg.cmp_stages != 1:
            raise ValueError("cmp_stages: must be 1 with cmp_load='cp_async' (multi-stage cp.async with a "
                             "dynamic trip count fails in TileLang 0.1.15 codegen)")
        if not 1 <= cfg.cmp_stages <= 3:
            raise ValueError("cmp_stages: must be 1, 2 or 3")
        if _regs(MP, bn, Dv, nt) > 192:
            raise ValueError("cmp_block_N: accumulators need too many registers; lower it or raise cmp_threads")
        NBG = score_groups(cfg.cmp_block, cfg.stride, cfg.first_block, cfg.sel_block)[1]
        NE = (bn // SG) * (1 << (NBG - 1).bit_length())
        if _smem_attn(MP, bn, Dk, Dv, cfg.cmp_stages, nt) + (NE + 32) * bn * 2 + MP * bn * 2 > cfg.smem_block:
            raise ValueError(f"cmp_stages: shared memory exceeds the arch's {cfg.smem_block // 1024} KiB")
    elif cfg.part == "topn":
        if cfg.topn_threads not in (64, 128, 256):
            raise ValueError("topn_threads: must be 64, 128 or 256")
        if cfg.topn_threads < G:
            raise ValueError("topn_threads: must be >= heads_q / heads_kv")
    elif cfg.part == "sparse":
        nt = cfg.sparse_threads
        if nt not in (64, 128, 256):
            raise ValueError("sparse_threads: must be 64, 128 or 256")
        if nt < cfg.top_n:
            raise ValueError("sparse_threads: must be >= top_n")
        n_split = max(1, (nt // 32) // max(1, MP // 16))
        if not (warps_cover(cfg.sel_block, n_split) and warps_cover(Dv, n_split)):
            raise ValueError("sparse_threads: too many warps for sel_block / head_dim_v (each needs whole 8-column tiles)")
        if cfg.sparse_stages != 1:
            raise ValueError("sparse_stages: must be 1 (multi-stage cp.async with a dynamic trip count fails "
                             "in TileLang 0.1.15 codegen)")
        if _regs(MP, cfg.sel_block, Dv, nt) > 192:
            raise ValueError("sparse_threads: accumulators need too many registers")
        if _n_cand_max(cfg) > 8192:
            raise ValueError("max_seqlen: too many top-n candidates to merge; raise topn_threads")
        if _smem_attn(MP, cfg.sel_block, Dk, Dv, cfg.sparse_stages, nt) + _n_cand_max(cfg) * 8 > cfg.smem_block:
            raise ValueError(f"sparse_stages: shared memory exceeds the arch's {cfg.smem_block // 1024} KiB")
    else:
        nt = cfg.combine_threads
        if nt not in (64, 128, 256):
            raise ValueError("combine_threads: must be 64, 128 or 256")
        if nt < Dv // 4 or nt < Dv:
            raise ValueError("combine_threads: must be >= head_dim_v")


def build(cfg: DecodeAttentionConfig):
    """Return the (uncompiled) prim_func of cfg.part (signatures in the module docstring)."""
    check_config(cfg)
    return {"cmp": _build_cmp, "topn": _build_topn, "sparse": _build_sparse,
            "combine": _build_combine}[cfg.part](cfg)


def _seqlens_shape(cfg, B, MPT):
    """SeqLens' shape: [B], or [B, 1 + MPT] with the block table (paged)."""
    return [B, 1 + MPT] if cfg.page_size else [B]


def _seqlen(cfg, SeqLens, b):
    return SeqLens[b, 0] if cfg.page_size else SeqLens[b]


def _page(SeqLens, b, j, NP):
    """The pool page of entry b's page slot j (from its table in SeqLens[b, 1:], j clamped to it);
    the pool's last page (zero, never handed out) where the entry is < 0."""
    jj = T.min(j, SeqLens.shape[1] - 2) + 1
    return T.if_then_else(SeqLens[b, jj] >= 0, SeqLens[b, jj], NP - 1)


def _nvis(t, l, d, f, cap):
    """Compressed rows visible to query t: c with (f+c)*d + l - 1 <= t, clamped to cap."""
    return T.min(T.max(t + (d - l - f * d + 1), 0) // d, cap)


# ------------------------------------------------------------------------------------------------
# cmp: split-KV compression attention + the scores for top-n
# ------------------------------------------------------------------------------------------------
def _build_cmp(cfg):
    HQ, H, Dk, Dv, ql = cfg.heads_q, cfg.heads_kv, cfg.head_dim_qk, cfg.head_dim_v, cfg.q_len
    G, MR, MP = _rows(cfg)
    l, d, f = cfg.cmp_block, cfg.stride, cfg.first_block
    BN, NT = cfg.cmp_block_N, _cmp_threads(cfg)
    dtype, acc = cfg.dtype, "float32"
    sc = float(cfg.scale)
    sc2 = sc * _LOG2E
    ninf = -T.infinity(acc)
    p_regs = _p_in_regs(MP, NT)
    # cp_async: predicated cp.async into one K and one V buffer, software-pipelined (the next
    # tile's K / V load is issued after this tile's QK / PV gemm).  tma: TileLang warp-specializes
    # the loop: a producer warpgroup (NT + 128 threads in all) issues bulk tensor copies into
    # cmp_stages buffers with full / empty mbarrier pairs; rows >= CAPC are zero-filled.
    load = {"disable_tma": True} if cfg.cmp_load == "cp_async" else {}
    # top-n scores summed per group of SG rows into the NBG blocks the group overlaps (a [BN, NBP]
    # block-diagonal weight matrix, one gemm a tile): 5 values a group of 16 rows and query head
    # instead of 16 (paper config), written and read once each
    m_u, r_u = l // d, cfg.sel_block // d
    SG, NBG, JMIN = score_groups(l, d, f, cfg.sel_block)
    o_u = m_u - 1 + f
    NGT = BN // SG                              # groups a tile
    NBGP = 1 << (NBG - 1).bit_length()          # a group's entries in W_s / acc_b (power of 2: shifts)
    NE = NGT * NBGP
    warps_n = (NT // 32) // max(1, min(NT // 32, MP // 16))
    NBP = -(-NE // (8 * warps_n)) * 8 * warps_n
    own_p16 = dtype != "float16" or p_regs      # else acc_p is already an fp16 shared tile

    P = cfg.page_size
    if P:   # pools of P-row pages; the table in SeqLens[:, 1:], MPC pages, MPC * P rows at most
        B, NPC, MPC, CG, SC = T.dynamic("B, NPC, MPC, CG, SC")
        CAPC = MPC * P
        k_shape, v_shape = [NPC, P, H, Dk], [NPC, P, H, Dv]
    else:
        B, CAPC, CG, SC = T.dynamic("B, CAPC, CG, SC")
        k_shape, v_shape, MPC = [B, CAPC, H, Dk], [B, CAPC, H, Dv], None

    @T.prim_func
    def nsa_decode_cmp(
        Q: T.Tensor([B, ql, HQ, Dk], dtype),
        K_cmp: T.Tensor(k_shape, dtype),
        V_cmp: T.Tensor(v_shape, dtype),
        SeqLens: T.Tensor(_seqlens_shape(cfg, B, MPC), "int32"),
        Scores: T.Tensor([B, ql, CG, NBG, HQ], "float16"),
        ScoreMax: T.Tensor([B, ql, CG, HQ], acc),
        O_part: T.Tensor([B, H, SC, MR, Dv], acc),
        L_part: T.Tensor([B, H, SC, MR], acc),
    ):
        with T.Kernel(SC, H, B, threads=NT) as (sid, h, b):
            W_s = T.alloc_shared([NBP, BN], "float16")   # K-major, as K_s (wgmma takes it at any N)
            acc_b = T.alloc_fragment([MP, NBP], acc)
            if own_p16:
                P16_s = T.alloc_shared([MP, BN], "float16")
            Q_s = T.alloc_shared([MP, Dk], dtype)
            K_s = T.alloc_shared([BN, Dk], dtype)
            V_s = T.alloc_shared([BN, Dv], dtype)
            acc_s = T.alloc_fragment([MP, BN], acc)
            if p_regs:
                acc_p = T.alloc_fragment([MP, BN], dtype)
            else:
                acc_p = T.alloc_shared([MP, BN], dtype)
            acc_o = T.alloc_fragment([MP, Dv], acc)
            m = T.alloc_fragment([MP], acc)
            m_prev = T.alloc_fragment([MP], acc)
            m_use = T.alloc_fragment([MP], acc)
            alpha = T.alloc_fragment([MP], acc)
            rsum = T.alloc_fragment([MP], acc)
            lsum = T.alloc_fragment([MP], acc)
            nv = T.alloc_fragment([MP], "int32")
            seq = T.alloc_var("int32")
            c_beg = T.alloc_var("int32")
            c_end = T.alloc_var("int32")
            chunk = T.alloc_var("int32")

            seq = _seqlen(cfg, SeqLens, b)
            # rows visible to the last query; SC contiguous tile-aligned chunks
            chunk = T.ceildiv(T.ceildiv(_nvis(seq - 1, l, d, f, CAPC), SC), BN) * BN
            c_beg = sid * chunk
            c_end = T.min(c_beg + chunk, _nvis(seq - 1, l, d, f, CAPC))

            for r, k in T.Parallel(MP, Dk):
                Q_s[r, k] = T.if_then_else(r < MR, Q[b, r // G, h * G + r % G, k], T.cast(0, dtype))
            # W_s[gl*NBGP + k, c]: weight of the tile's row c in block k < NBG of its group gl = c // SG
            # (unit u = c % SG + o - (JMIN + k) * r of that block; min(u+1, r) - max(u-m+1, 0))
            for e, c in T.Parallel(NBP, BN):
                W_s[e, c] = T.cast(T.if_then_else(
                    (e < NE) & (e % NBGP < NBG) & (c // SG == e // NBGP)
                    & (c % SG + o_u - (JMIN + e % NBGP) * r_u >= 0)
                    & (c % SG + o_u - (JMIN + e % NBGP) * r_u <= r_u + m_u - 2),
                    T.min(c % SG + o_u - (JMIN + e % NBGP) * r_u + 1, r_u)
                    - T.max(c % SG + o_u - (JMIN + e % NBGP) * r_u - m_u + 1, 0), 0), "float16")
            T.fill(acc_o, 0)
            T.fill(lsum, 0)
            T.fill(m, ninf)
            for r in T.Parallel(MP):
                nv[r] = T.if_then_else(r < MR, T.min(_nvis(seq - ql + r // G, l, d, f, CAPC), c_end), 0)

            for kt in T.Pipelined(T.ceildiv(T.max(c_end - c_beg, 0), BN), num_stages=cfg.cmp_stages):
                if not P:
                    T.copy(K_cmp[b, c_beg + kt * BN:c_beg + (kt + 1) * BN, h, :], K_s, **load)
                elif BN <= P:
                    T.copy(K_cmp[_page(SeqLens, b, (c_beg + kt * BN) // P, NPC),
                                 (c_beg + kt * BN) % P:(c_beg + kt * BN) % P + BN, h, :], K_s, **load)
                else:
                    for j in T.unroll(BN // P):
                        T.copy(K_cmp[_page(SeqLens, b, (c_beg + kt * BN) // P + j, NPC), 0:P, h, :],
                               K_s[j * P:(j + 1) * P, :], **load)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                # select (not add): rows past the length may hold anything finite or not
                for r, j in T.Parallel(MP, BN):
                    acc_s[r, j] = T.if_then_else(c_beg + kt * BN + j < nv[r], acc_s[r, j], ninf)
                T.copy(m, m_prev)
                T.reduce_max(acc_s, m, dim=1, clear=False)
                for r in T.Parallel(MP):
                    m_use[r] = T.if_then_else(m[r] == ninf, 0, m[r])
                    alpha[r] = T.exp2((m_prev[r] - m_use[r]) * sc2)
                for r, j in T.Parallel(MP, BN):
                    acc_s[r, j] = T.exp2(acc_s[r, j] * sc2 - m_use[r] * sc2)
                T.reduce_sum(acc_s, rsum, dim=1)
                for r in T.Parallel(MP):
                    lsum[r] = lsum[r] * alpha[r] + rsum[r]
                T.copy(acc_s, acc_p)
                # scores for the top-n stage: p relative to the running max (in [0, 1]; rows past a
                # query's visible range are 0), summed with the overlap weights into the blocks of
                # each group of SG rows (fp32 accumulation of fp16 p), written in fp16 with that
                # max once a group.  Groups at or past c_end are not written; top-n never reads them.
                if own_p16:
                    T.copy(acc_s, P16_s)
                    T.gemm(P16_s, W_s, acc_b, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                else:
                    T.gemm(acc_p, W_s, acc_b, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                for r, e in T.Parallel(MP, NBP):
                    if (r < MR) & (e < NE) & (e % NBGP < NBG) & (((c_beg + kt * BN) // SG + e // NBGP) * SG < c_end):
                        Scores[b, r // G, (c_beg + kt * BN) // SG + e // NBGP, e % NBGP, h * G + r % G] = T.cast(
                            acc_b[r, e], "float16")
                for r, gl in T.Parallel(MP, NGT):
                    if (r < MR) & (((c_beg + kt * BN) // SG + gl) * SG < c_end):
                        ScoreMax[b, r // G, (c_beg + kt * BN) // SG + gl, h * G + r % G] = m_use[r] * sc2
                for r, k in T.Parallel(MP, Dv):
                    acc_o[r, k] *= alpha[r]
                if not P:
                    T.copy(V_cmp[b, c_beg + kt * BN:c_beg + (kt + 1) * BN, h, :], V_s, **load)
                elif BN <= P:
                    T.copy(V_cmp[_page(SeqLens, b, (c_beg + kt * BN) // P, NPC),
                                 (c_beg + kt * BN) % P:(c_beg + kt * BN) % P + BN, h, :], V_s, **load)
                else:
                    for j in T.unroll(BN // P):
                        T.copy(V_cmp[_page(SeqLens, b, (c_beg + kt * BN) // P + j, NPC), 0:P, h, :],
                               V_s[j * P:(j + 1) * P, :], **load)
                T.gemm(acc_p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            if cfg.pdl:
                # let top-n launch; it waits for this grid's completion before reading its outputs
                # (triggering at the start instead, so that top-n and sparse wait in free slots
                # the whole time, measured slower: B = 1 23 -> 30 us, B = 16 94 -> 98 us)
                T.pdl_trigger()
            for r, k in T.Parallel(MP, Dv):
                if r < MR:
                    O_part[b, h, sid, r, k] = T.if_then_else(lsum[r] == 0, 0, acc_o[r, k] / lsum[r])
            for r in T.Parallel(MP):
                if r < MR:
                    L_part[b, h, sid, r] = T.if_then_else(lsum[r] == 0, ninf, T.log2(lsum[r]) + m[r] * sc2)

    return nsa_decode_cmp


# ------------------------------------------------------------------------------------------------
# topn: per-chunk block scores and exact chunk top-n (candidates)
# ------------------------------------------------------------------------------------------------
def _build_topn(cfg):
    HQ, H, ql = cfg.heads_q, cfg.heads_kv, cfg.q_len
    G, MR, MP = _rows(cfg)
    l, d, f, lp = cfg.cmp_block, cfg.stride, cfg.first_block, cfg.sel_block
    n, n_init, n_local = cfg.top_n, cfg.initial, cfg.local
    NT = CB = cfg.topn_threads
    SG, NBG, JMIN = score_groups(l, d, f, lp)
    GB = SG // (lp // d)                    # blocks a group (CB is a multiple: j0 starts a group)
    GLO = -((JMIN + NBG - 1) // GB)         # first group touching block j0, relative to j0 / GB
    NGC = (CB - 1 - JMIN) // GB - GLO + 1   # groups touching the chunk's blocks
    NGB = -(-NBG // GB) + 1                 # bound on the groups touching one block
    EQ = (NGC * NBG + NT - 1) // NT
    FQ = (NGC * G + NT - 1) // NT
    LQ = (G * MAX_CMP_SPLITS + NT - 1) // NT
    acc = "float32"
    ninf, pinf = -T.infinity(acc), T.infinity(acc)

    B, CG, SC, NC = T.dynamic("B, CG, SC, NC")

    @T.prim_func
    def nsa_decode_topn(
        Scores: T.Tensor([B, ql, CG, NBG, HQ], "float16"),
        ScoreMax: T.Tensor([B, ql, CG, HQ], acc),
        L_part: T.Tensor([B, H, SC, MR], acc),
        SeqLens: T.Tensor([B], "int32"),
        CandS: T.Tensor([B, ql, H, NC, n], acc),
        CandI: T.Tensor([B, ql, H, NC, n], "int32"),
    ):
        with T.Kernel(NC, ql * H, B, threads=NT) as (cid, qh, b):
            Lp_s = T.alloc_shared([G, MAX_CMP_SPLITS], acc)
            lse_s = T.alloc_shared([G], acc)
            P_s = T.alloc_shared([NGC * NBG], acc)
            F_s = T.alloc_shared([NGC, G], acc)     # exp2(ScoreMax - lse): p_cmp = Scores * F_s
            s_loc = T.alloc_local([EQ, G], "float16")
            m_loc = T.alloc_local([FQ], acc)
            Key_s = T.alloc_shared([CB], acc)
            seq = T.alloc_var("int32")
            t = T.alloc_var("int32")
            jt = T.alloc_var("int32")
            nv = T.alloc_var("int32")
            mx = T.alloc_var(acc)
            sm = T.alloc_var(acc)
            pv = T.alloc_var(acc)
            key = T.alloc_var(acc)
            ke = T.alloc_var(acc)
            rank = T.alloc_var("int32")
            gg = T.alloc_var("int32")
            j = T.alloc_var("int32")
            nvalid = T.alloc_var("int32")

            tx = T.get_thread_binding()
            qi = qh // H
            h = qh % H
            seq = SeqLens[b]
            t = seq - ql + qi
            jt = t // lp
            nv = _nvis(t, l, d, f, CG * SG)
            j0 = cid * CB
            g0 = cid * (CB // GB) + GLO             # group of entry row 0 (may be < 0)
            if cfg.pdl:
                T.pdl_trigger()   # sparse's window programs need nothing of ours: let them start
                T.pdl_sync()      # cmp's Scores / ScoreMax / L_part

            # 0. issue every global load first (one memory round trip, not three): the block sums
            #    of the groups this chunk's blocks overlap (groups clamped into the buffer: groups
            #    no query sees are loaded, never used) and their maxima, then the lse partials
            for q in T.unroll(EQ):
                for g in T.vectorized(G):       # the group's G heads are contiguous
                    s_loc[q, g] = Scores[b, qi, T.min(T.max(g0 + (q * NT + tx) // NBG, 0), CG - 1),
                                         (q * NT + tx) % NBG, h * G + g]
            for q in T.unroll(FQ):
                m_loc[q] = ScoreMax[b, qi, T.min(T.max(g0 + (q * NT + tx) // G, 0), CG - 1),
                                    h * G + (q * NT + tx) % G]

            # 1. base-2 lse of each head of the group from the SC split partials
            for q in T.unroll(LQ):
                if q * NT + tx < G * MAX_CMP_SPLITS:
                    Lp_s[(q * NT + tx) // MAX_CMP_SPLITS, (q * NT + tx) % MAX_CMP_SPLITS] = T.if_then_else(
                        (q * NT + tx) % MAX_CMP_SPLITS < SC,
                        L_part[b, h, T.min((q * NT + tx) % MAX_CMP_SPLITS, SC - 1), qi * G + (q * NT + tx) // MAX_CMP_SPLITS],
                        ninf)
            T.sync_threads()
            if tx < G:
                # over the SC real splits (entries up to MAX_CMP_SPLITS are -inf), 4 independent
                # loads per step: neither the full static bound nor a 1-deep dependent chain
                mx = ninf
                for s4 in T.serial(T.ceildiv(SC, 4)):
                    for u in T.unroll(4):
                        mx = T.max(mx, Lp_s[tx, s4 * 4 + u])
                sm = 0
                for s4 in T.serial(T.ceildiv(SC, 4)):
                    for u in T.unroll(4):
                        sm = sm + T.if_then_else(Lp_s[tx, s4 * 4 + u] == ninf, 0,
                                                 T.exp2(Lp_s[tx, s4 * 4 + u] - mx))
                lse_s[tx] = T.if_then_else(sm == 0, ninf, mx + T.log2(sm))
            T.sync_threads()

            # 2. per-group factors (one exp2 per group and head, not per score), then the group-
            #    summed compression probabilities of each (group, block) entry: P_s[gl*NBG + k] <->
            #    block GB*(g0 + gl) + JMIN + k.  Groups before row 0 or at / past the query's
            #    visible rows give 0 (their factors, from groups the cmp kernel did not write, are
            #    garbage, never used).
            for q in T.unroll(FQ):
                if q * NT + tx < NGC * G:
                    F_s[(q * NT + tx) // G, (q * NT + tx) % G] = T.exp2(m_loc[q] - lse_s[(q * NT + tx) % G])
            T.sync_threads()
            for q in T.unroll(EQ):
                if q * NT + tx < NGC * NBG:
                    gg = g0 + (q * NT + tx) // NBG
                    pv = 0
                    if (gg >= 0) & (gg * SG < nv):
                        for g in T.unroll(G):
                            pv = pv + T.cast(s_loc[q, g], acc) * F_s[(q * NT + tx) // NBG, g]
                    P_s[q * NT + tx] = pv
            T.sync_threads()

            # 3. block key: the sum of the block's entries over the groups it overlaps (the last
            #    such group is (tx - JMIN) // GB - GLO locally); forced +inf, invisible -inf
            j = j0 + tx
            key = 0
            for k in T.unroll(NGB):
                if ((tx - JMIN) // GB - GLO - k >= 0) & ((tx - JMIN) // GB - GLO - k < NGC) & (
                        tx - JMIN - GB * ((tx - JMIN) // GB - k) < NBG):
                    key = key + P_s[((tx - JMIN) // GB - GLO - k) * NBG + tx - JMIN - GB * ((tx - JMIN) // GB - k)]
            if j > jt:
                key = ninf
            elif (j < n_init) | (j > jt - n_local):
                key = pinf
            Key_s[tx] = key
            T.sync_threads()

            # 4. exact rank under (key desc, index asc); the chunk's top-n are its candidates
            rank = 0
            for e in T.unroll(CB):
                ke = Key_s[e]
                rank = rank + T.if_then_else((ke > key) | ((ke == key) & (e < tx)), 1, 0)
            nvalid = T.min(T.max(jt - j0 + 1, 0), CB)
            if (rank < n) & (j <= jt):
                CandS[b, qi, h, cid, rank] = key
                CandI[b, qi, h, cid, rank] = j
            if (tx < n) & (tx >= T.min(nvalid, n)):
                CandS[b, qi, h, cid, tx] = ninf
                CandI[b, qi, h, cid, tx] = -1

    return nsa_decode_topn


# ------------------------------------------------------------------------------------------------
# sparse: candidate merge + selection / window attention, split-KV
# ------------------------------------------------------------------------------------------------
def _build_sparse(cfg):
    HQ, H, Dk, Dv, ql = cfg.heads_q, cfg.heads_kv, cfg.head_dim_qk, cfg.head_dim_v, cfg.q_len
    G, MR, MP = _rows(cfg)
    lp, n, win = cfg.sel_block, cfg.top_n, cfg.window
    NB = 2 if cfg.separate_window else 1
    NT = cfg.sparse_threads
    NCAND = _n_cand_max(cfg)
    NCMAX = NCAND // n                          # static bound on the chunk count NC
    bits = [1 << k for k in reversed(range(n.bit_length()))]   # binary-search steps over n entries
    CQ = (NCAND + NT - 1) // NT
    dtype, acc = cfg.dtype, "float32"
    sc2 = float(cfg.scale) * _LOG2E
    ninf = -T.infinity(acc)
    p_regs = _p_in_regs(MP, NT)

    P = cfg.page_size
    if P:   # the token pool of P-row pages; the table in SeqLens[:, 1:] (MPG pages)
        B, NPG, MPG, NC, SS, SW = T.dynamic("B, NPG, MPG, NC, SS, SW")
        k_shape, v_shape = [NPG, P, NB, H, Dk], [NPG, P, NB, H, Dv]
    else:
        B, CAP, NC, SS, SW = T.dynamic("B, CAP, NC, SS, SW")
        k_shape, v_shape, MPG = [B, CAP, NB, H, Dk], [B, CAP, NB, H, Dv], None

    def tile_start(qsel, Sel_l, ws, ta, kt):
        # first key of tile kt: a selected block (selection program) or a window tile.  The
        # block list is read from a per-thread copy: a shared-memory read in the copy address
        # makes the sync pass put a barrier in every cp.async iteration.
        return T.if_then_else(qsel >= 0, Sel_l[T.min(ta + kt, n - 1)] * lp, ws + (ta + kt) * lp)

    def slot(qsel):
        return 0 if NB == 1 else T.if_then_else(qsel >= 0, 0, 1)

    @T.prim_func
    def nsa_decode_sparse(
        Q: T.Tensor([B, ql, HQ, Dk], dtype),
        KV_K: T.Tensor(k_shape, dtype),
        KV_V: T.Tensor(v_shape, dtype),
        SeqLens: T.Tensor(_seqlens_shape(cfg, B, MPG), "int32"),
        CandS: T.Tensor([B, ql, H, NC, n], acc),
        CandI: T.Tensor([B, ql, H, NC, n], "int32"),
        BlockIdx: T.Tensor([B, ql, H, n], "int32"),
        O_slc: T.Tensor([B, H, SS, MR, Dv], acc),
        L_slc: T.Tensor([B, H, SS, MR], acc),
        O_win: T.Tensor([B, H, SW, MR, Dv], acc),
        L_win: T.Tensor([B, H, SW, MR], acc),
    ):
        with T.Kernel(SS + SW, H, B, threads=NT) as (sid, h, b):
            Q_s = T.alloc_shared([MP, Dk], dtype)
            K_s = T.alloc_shared([lp, Dk], dtype)
            V_s = T.alloc_shared([lp, Dv], dtype)
            acc_s = T.alloc_fragment([MP, lp], acc)
            if p_regs:
                acc_p = T.alloc_fragment([MP, lp], dtype)
            else:
                acc_p = T.alloc_shared([MP, lp], dtype)
            acc_o = T.alloc_fragment([MP, Dv], acc)
            m = T.alloc_fragment([MP], acc)
            m_prev = T.alloc_fragment([MP], acc)
            m_use = T.alloc_fragment([MP], acc)
            alpha = T.alloc_fragment([MP], acc)
            rsum = T.alloc_fragment([MP], acc)
            lsum = T.alloc_fragment([MP], acc)
            CS_s = T.alloc_shared([NCAND], acc)
            CI_s = T.alloc_shared([NCAND], "int32")
            Rk_s = T.alloc_shared([n], "int32")      # selected block of rank k
            Sel_s = T.alloc_shared([n], "int32")     # selected blocks ascending, -1 padded
            Sel_l = T.alloc_local([n], "int32")
            pos_l = T.alloc_local([NCMAX], "int32")
            seq = T.alloc_var("int32")
            qsel = T.alloc_var("int32")              # query of a selection program, else -1
            t_sel = T.alloc_var("int32")
            n_sel = T.alloc_var("int32")
            ta = T.alloc_var("int32")                # first tile (selection slot / window tile)
            ntiles = T.alloc_var("int32")
            ws = T.alloc_var("int32")
            key = T.alloc_var(acc)
            idx = T.alloc_var("int32")
            ke = T.alloc_var(acc)
            ie = T.alloc_var("int32")
            rank = T.alloc_var("int32")
            pos = T.alloc_var("int32")
            per = T.alloc_var("int32")

            tx = T.get_thread_binding()
            seq = _seqlen(cfg, SeqLens, b)
            ws = T.max(seq - ql - win + 1, 0)
            if P:   # window tiles aligned to sel_block (so to pages); the keys before ws are masked
                ws = ws // lp * lp
            qsel = -1
            t_sel = 0
            ta = 0
            ntiles = 0
            for r, k in T.Parallel(MP, Dk):
                Q_s[r, k] = T.if_then_else(r < MR, Q[b, r // G, h * G + r % G, k], T.cast(0, dtype))
            T.fill(acc_o, 0)
            T.fill(lsum, 0)
            T.fill(m, ninf)

            if sid < SS:
                # ---- selection program: merge the chunk candidates of query qsel
                if cfg.pdl:
                    T.pdl_sync()  # top-n's candidates (window programs read only the cache)
                qsel = sid // (SS // ql)
                t_sel = seq - ql + qsel
                n_sel = T.min(t_sel // lp + 1, n)
                for q in T.unroll(CQ):
                    if q * NT + tx < NCAND:
                        if q * NT + tx < NC * n:
                            CS_s[q * NT + tx] = CandS[b, qsel, h, (q * NT + tx) // n, (q * NT + tx) % n]
                            CI_s[q * NT + tx] = CandI[b, qsel, h, (q * NT + tx) // n, (q * NT + tx) % n]
                        else:
                            CS_s[q * NT + tx] = ninf
                            CI_s[q * NT + tx] = -1
                T.sync_threads()
                for q in T.unroll(CQ):
                    if q * NT + tx < NC * n:
                        key = CS_s[q * NT + tx]
                        idx = CI_s[q * NT + tx]
                        if idx >= 0:
                            # rank = sum over the chunk lists of how many entries beat this one:
                            # each list is sorted (key desc, index asc; padding (-inf, -1) last
                            # and beats no real candidate), so a binary search per list.  The
                            # lists are independent searches (ILP), each log2(n) steps deep.
                            for c2 in T.unroll(NCMAX):
                                pos_l[c2] = 0
                                if c2 < NC:
                                    for bit in bits:
                                        ke = CS_s[T.min(c2 * n + pos_l[c2] + bit - 1, NCAND - 1)]
                                        ie = CI_s[T.min(c2 * n + pos_l[c2] + bit - 1, NCAND - 1)]
                                        pos_l[c2] = pos_l[c2] + T.if_then_else(
                                            (pos_l[c2] + bit <= n) & ((ke > key) | ((ke == key) & (ie < idx))), bit, 0)
                            rank = 0
                            for c2 in T.unroll(NCMAX):
                                rank = rank + pos_l[c2]
                            if rank < n_sel:
                                Rk_s[rank] = idx
                T.sync_threads()
                if tx < n:
                    if tx < n_sel:
                        idx = Rk_s[tx]
                        pos = 0
                        for e in T.unroll(n):
                            pos = pos + T.if_then_else((e < n_sel) & (Rk_s[e] < idx), 1, 0)
                        Sel_s[pos] = idx
                    else:
                        Sel_s[tx] = -1
                T.sync_threads()
                if (sid % (SS // ql) == 0) & (tx < n):
                    BlockIdx[b, qsel, h, tx] = Sel_s[tx]
                for k in T.unroll(n):
                    Sel_l[k] = Sel_s[k]
                per = T.ceildiv(n, SS // ql)
                ta = (sid % (SS // ql)) * per
                ntiles = T.max(T.min(ta + per, n_sel) - ta, 0)
            else:
                # ---- window program: its share of the key span [ws, seq)
                per = T.ceildiv(T.ceildiv(seq - ws, lp), SW)
                ta = (sid - SS) * per
                ntiles = T.max(T.min(ta + per, T.ceildiv(seq - ws, lp)) - ta, 0)

            for kt in T.Pipelined(ntiles, num_stages=cfg.sparse_stages):
                # first key of the tile: a selected block, or a window tile
                if not P:
                    T.copy(KV_K[b, tile_start(qsel, Sel_l, ws, ta, kt):tile_start(qsel, Sel_l, ws, ta, kt) + lp,
                                slot(qsel), h, :], K_s, disable_tma=True)
                elif lp <= P:
                    T.copy(KV_K[_page(SeqLens, b, tile_start(qsel, Sel_l, ws, ta, kt) // P, NPG),
                                tile_start(qsel, Sel_l, ws, ta, kt) % P:tile_start(qsel, Sel_l, ws, ta, kt) % P + lp,
                                slot(qsel), h, :], K_s, disable_tma=True)
                else:
                    for j in T.unroll(lp // P):
                        T.copy(KV_K[_page(SeqLens, b, tile_start(qsel, Sel_l, ws, ta, kt) // P + j, NPG), 0:P,
                                    slot(qsel), h, :], K_s[j * P:(j + 1) * P, :], disable_tma=True)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                for r, c in T.Parallel(MP, lp):
                    acc_s[r, c] = T.if_then_else(
                        T.if_then_else(
                            qsel >= 0,
                            (r // G == qsel) & (Sel_l[T.min(ta + kt, n - 1)] * lp + c <= t_sel),
                            (r < MR) & (ws + (ta + kt) * lp + c <= seq - ql + r // G)
                            & (ws + (ta + kt) * lp + c > seq - ql + r // G - win)),
                        acc_s[r, c], ninf)
                T.copy(m, m_prev)
                T.reduce_max(acc_s, m, dim=1, clear=False)
                for r in T.Parallel(MP):
                    m_use[r] = T.if_then_else(m[r] == ninf, 0, m[r])
                    alpha[r] = T.exp2((m_prev[r] - m_use[r]) * sc2)
                for r, c in T.Parallel(MP, lp):
                    acc_s[r, c] = T.exp2(acc_s[r, c] * sc2 - m_use[r] * sc2)
                T.reduce_sum(acc_s, rsum, dim=1)
                for r in T.Parallel(MP):
                    lsum[r] = lsum[r] * alpha[r] + rsum[r]
                T.copy(acc_s, acc_p)
                for r, k in T.Parallel(MP, Dv):
                    acc_o[r, k] *= alpha[r]
                if not P:
                    T.copy(KV_V[b, tile_start(qsel, Sel_l, ws, ta, kt):tile_start(qsel, Sel_l, ws, ta, kt) + lp,
                                slot(qsel), h, :], V_s, disable_tma=True)
                elif lp <= P:
                    T.copy(KV_V[_page(SeqLens, b, tile_start(qsel, Sel_l, ws, ta, kt) // P, NPG),
                                tile_start(qsel, Sel_l, ws, ta, kt) % P:tile_start(qsel, Sel_l, ws, ta, kt) % P + lp,
                                slot(qsel), h, :], V_s, disable_tma=True)
                else:
                    for j in T.unroll(lp // P):
                        T.copy(KV_V[_page(SeqLens, b, tile_start(qsel, Sel_l, ws, ta, kt) // P + j, NPG), 0:P,
                                    slot(qsel), h, :], V_s[j * P:(j + 1) * P, :], disable_tma=True)
                T.gemm(acc_p, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            if cfg.pdl:
                T.pdl_trigger()
            if sid < SS:
                for r, k in T.Parallel(MP, Dv):
                    if r < MR:
                        O_slc[b, h, sid, r, k] = T.if_then_else(lsum[r] == 0, 0, acc_o[r, k] / lsum[r])
                for r in T.Parallel(MP):
                    if r < MR:
                        L_slc[b, h, sid, r] = T.if_then_else(lsum[r] == 0, ninf, T.log2(lsum[r]) + m[r] * sc2)
            else:
                for r, k in T.Parallel(MP, Dv):
                    if r < MR:
                        O_win[b, h, sid - SS, r, k] = T.if_then_else(lsum[r] == 0, 0, acc_o[r, k] / lsum[r])
                for r in T.Parallel(MP):
                    if r < MR:
                        L_win[b, h, sid - SS, r] = T.if_then_else(lsum[r] == 0, ninf, T.log2(lsum[r]) + m[r] * sc2)

    return nsa_decode_sparse


# ------------------------------------------------------------------------------------------------
# combine: merge split partials (base 2), gate, write O
# ------------------------------------------------------------------------------------------------
def _build_combine(cfg):
    HQ, H, Dv, ql = cfg.heads_q, cfg.heads_kv, cfg.head_dim_v, cfg.q_len
    G, MR, MP = _rows(cfg)
    NT = cfg.combine_threads
    VEC = 4
    DG = Dv // VEC                 # thread groups along Dv
    LN = NT // DG                  # split lanes
    dtype, acc = cfg.dtype, "float32"
    ninf = -T.infinity(acc)

    B, SC, SS, SW = T.dynamic("B, SC, SS, SW")

    def n_lane(S, lane):
        return T.ceildiv(T.max(S - lane, 0), LN)   # splits of this lane

    @T.macro
    def load_splits(O_br, L_br, S, br, first, U, lw, ov, lane, b, h, r, dg):
        # this lane's splits lane + (first + u)*LN, u < U, of one branch: lse and a VEC-wide slice
        # of the partial (one vector load); splits past S load nothing and weigh 0
        for u in T.unroll(U):
            lw[br, u] = ninf
            for v in T.unroll(VEC):
                ov[br, u, v] = 0
            if lane + (first + u) * LN < S:
                lw[br, u] = L_br[b, h, lane + (first + u) * LN, r]
                for v in T.vectorized(VEC):
                    ov[br, u, v] = O_br[b, h, lane + (first + u) * LN, r, dg * VEC + v]

    def max_of(m, lw, br, U):
        e = m[br]
        for u in range(U):
            e = T.max(e, lw[br, u])
        return e

    @T.macro
    def fold(br, U, m, l, o, lw, ov, st):
        # fold U loaded splits into the branch's running (max m, weight sum l, o at that max);
        # scratch in st (a macro's assignment to a scalar var would rebind the name)
        st[0] = max_of(m, lw, br, U)
        st[1] = T.if_then_else(st[0] == ninf, 0, st[0])         # all empty so far: weights 0
        st[2] = T.exp2(m[br] - st[1])
        for u in T.unroll(U):
            lw[br, u] = T.exp2(lw[br, u] - st[1])
        l[br] = l[br] * st[2]
        for v in T.unroll(VEC):
            o[br, v] = o[br, v] * st[2]
        for u in T.unroll(U):
            l[br] = l[br] + lw[br, u]
            for v in T.unroll(VEC):
                o[br, v] = o[br, v] + lw[br, u] * ov[br, u, v]
        m[br] = st[0]

    @T.prim_func
    def nsa_decode_combine(
        O_cmp: T.Tensor([B, H, SC, MR, Dv], acc),
        L_cmp: T.Tensor([B, H, SC, MR], acc),
        O_slc: T.Tensor([B, H, SS, MR, Dv], acc),
        L_slc: T.Tensor([B, H, SS, MR], acc),
        O_win: T.Tensor([B, H, SW, MR, Dv], acc),
        L_win: T.Tensor([B, H, SW, MR], acc),
        G_cmp: T.Tensor([B, ql, HQ], dtype),
        G_slc: T.Tensor([B, ql, HQ], dtype),
        G_win: T.Tensor([B, ql, HQ], dtype),
        O: T.Tensor([B, ql, HQ, Dv], dtype),
    ):
        with T.Kernel(MR, H, B, threads=NT) as (r, h, b):
            A_s = T.alloc_shared([3, LN, Dv], acc)  # per branch and lane: o at the lane's max
            ML_s = T.alloc_shared([3, LN, 2], acc)  # per branch and lane: (max, weight sum)
            o = T.alloc_local([3, VEC], acc)
            m = T.alloc_local([3], acc)             # running max (base 2) per branch
            l = T.alloc_local([3], acc)             # weight sum at that max
            lw = T.alloc_local([3, 4], acc)
            ov = T.alloc_local([3, 4, VEC], acc)
            gate = T.alloc_local([3], acc)
            st = T.alloc_local([3], acc)            # fold's scratch
            mn = T.alloc_var(acc)
            mu = T.alloc_var(acc)
            sc = T.alloc_var(acc)
            wt = T.alloc_var(acc)
            tot = T.alloc_var(acc)

            tx = T.get_thread_binding()
            qi = r // G
            hq = h * G + r % G
            lane = tx // DG
            dg = tx % DG
            # the gates were written before the decode step's first kernel: read them before waiting
            gate[0] = T.cast(G_cmp[b, qi, hq], acc)
            gate[1] = T.cast(G_slc[b, qi, hq], acc)
            gate[2] = T.cast(G_win[b, qi, hq], acc)
            for br in T.unroll(3):
                m[br] = ninf
                l[br] = 0
                for v in T.unroll(VEC):
                    o[br, v] = 0
            if cfg.pdl:
                T.pdl_sync()      # every partial (cmp's complete before top-n's, top-n's before sparse's)
            # Online merge, split lanes: lane takes splits lane, lane + LN, ... of every branch.  A
            # round loads 4 splits of all three branches at once (a split's lse with its partial:
            # one memory round trip a round, no lse pass first), then folds them into the running
            # (max, weight sum, o) of their branch; the last nr % 4 splits go one a round (B >= 16
            # has 1-4 splits a branch: 4-wide rounds would mostly fold empty splits).
            nr = T.max(T.max(n_lane(SC, lane), n_lane(SS, lane)), n_lane(SW, lane))
            for s4 in T.serial(nr // 4):
                load_splits(O_cmp, L_cmp, SC, 0, s4 * 4, 4, lw, ov, lane, b, h, r, dg)
                load_splits(O_slc, L_slc, SS, 1, s4 * 4, 4, lw, ov, lane, b, h, r, dg)
                load_splits(O_win, L_win, SW, 2, s4 * 4, 4, lw, ov, lane, b, h, r, dg)
                for br in T.unroll(3):
                    fold(br, 4, m, l, o, lw, ov, st)
            for s1 in T.serial(nr % 4):
                load_splits(O_cmp, L_cmp, SC, 0, nr // 4 * 4 + s1, 1, lw, ov, lane, b, h, r, dg)
                load_splits(O_slc, L_slc, SS, 1, nr // 4 * 4 + s1, 1, lw, ov, lane, b, h, r, dg)
                load_splits(O_win, L_win, SW, 2, nr // 4 * 4 + s1, 1, lw, ov, lane, b, h, r, dg)
                for br in T.unroll(3):
                    fold(br, 1, m, l, o, lw, ov, st)
            for br in T.unroll(3):
                for v in T.unroll(VEC):
                    A_s[br, lane, dg * VEC + v] = o[br, v]
                if dg == 0:
                    ML_s[br, lane, 0] = m[br]
                    ML_s[br, lane, 1] = l[br]
            T.sync_threads()
            # merge the lanes of each branch, normalise (an empty branch gives 0), gate, sum
            if tx < Dv:
                tot = 0
                for br in T.unroll(3):
                    mn = ninf
                    for e in T.unroll(LN):
                        mn = T.max(mn, ML_s[br, e, 0])
                    mu = T.if_then_else(mn == ninf, 0, mn)
                    sc = 0
                    wt = 0
                    for e in T.unroll(LN):
                        sc = sc + ML_s[br, e, 1] * T.exp2(ML_s[br, e, 0] - mu)
                        wt = wt + A_s[br, e, tx] * T.exp2(ML_s[br, e, 0] - mu)
                    tot = tot + T.if_then_else(sc == 0, 0, gate[br] * wt / sc)
                O[b, qi, hq, tx] = T.cast(tot, dtype)

    return nsa_decode_combine
