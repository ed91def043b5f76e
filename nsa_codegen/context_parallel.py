"""Context parallelism: one NSA layer over a sequence split across the ranks of a torch.distributed
group (gloo on the CPU, NCCL on GPUs).

Each rank holds one shard of the sequence's tokens: q [B, Tl, HQ, Dk], k / v [B, Tl, H, D] and gates
[B, Tl, HQ], where the layout maps the shard to global positions:

- "contiguous": rank r holds tokens [r * Tl, (r + 1) * Tl);
- "zigzag" (default): the sequence is cut into 2 * cp chunks of c = Tl / 2 tokens and rank r holds
  chunks r and 2 * cp - 1 - r, so every rank has as much causal work as any other (`work_per_rank`).

Every rank's shard has the same length Tl (T = cp * Tl; zigzag needs Tl even). Per branch:

- selection: the raw K/V are all-gathered (`gather_sequence`, the design Llama 3 trained with), so a
  query reads whichever blocks its top-n picks, on any rank;
- compression: each rank pools the rows whose block ends in its chunks (from the chunk and an
  l - 1 token halo, with phi: the mean, or the layer's MLP) and the rows are all-gathered, so every
  query sees its whole prefix and top-n scores come from them on each rank, as on one device;
  given k_cmp / v_cmp are all rows of the sequence (every rank the same);
- window: each chunk receives the w - 1 keys before it (a halo, from the chunks' tails);
- with selection on and no separate branch K/V (nsa_attention's default), compression and window
  read the gathered raw K/V and exchange nothing of their own;
- backward: the gradient of every gathered tensor is summed over the ranks back onto its owner
  (reduce-scatter on NCCL; all-reduce then slice on gloo, which has no reduce-scatter). Fixed
  reduction orders: bit-identical run to run.

The math is the reference's (`nsa_codegen.reference.nsa_reference_queries`, per chunk of queries with
its global offset), on any device: exact against one process in float64. The GPU kernels do not take
a query offset yet, so on CUDA this runs the PyTorch reference (slow; one warning).

Bytes per rank: `bytes_per_rank`. The raw K/V gather dominates: (cp - 1) / cp of T x H x (Dk + Dv)
x dtype bytes, 2.2 GiB at 1M tokens in the paper config (bf16, cp = 8); the compressed rows add
about 1 / stride of that and the halos (cp - 1) x 2 x (w - 1) tokens.
"""
from __future__ import annotations

import hashlib
import warnings

import torch
import torch.distributed as dist

from . import reference
from .kv_cache import mean_phi
from .spec import NSASpec

LAYOUTS = ("zigzag", "contiguous")


# ------------------------------------------------------------------------------------------------
# Which tokens a rank holds
# ------------------------------------------------------------------------------------------------
def shard_chunks(T: int, world: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The global token ranges [a, b) rank `rank` of `world` holds of a T-token sequence, in the order
    its shard stores them (ascending)."""
    _check_layout(layout)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    parts = world if layout == "contiguous" else 2 * world
    if T % parts:
        raise ValueError(f"a {layout} split over {world} ranks needs T divisible by {parts}, got T = {T}")
    c = T // parts
    if layout == "contiguous":
        return [(rank * c, (rank + 1) * c)]
    j = 2 * world - 1 - rank
    return [(rank * c, (rank + 1) * c), (j * c, (j + 1) * c)]


def shard_positions(T: int, world: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """[T / world] int64: the global position of each token of the rank's shard."""
    return torch.cat([torch.arange(a, b) for a, b in shard_chunks(T, world, rank, layout)])


def shard(x: torch.Tensor, world: int, rank: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The rank's shard of a whole-sequence tensor x (sequence along `dim`)."""
    return torch.cat([x.narrow(dim, a, b - a) for a, b in shard_chunks(x.shape[dim], world, rank, layout)], dim)


def unshard(shards: list[torch.Tensor], layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The whole-sequence tensor from every rank's shard (shards[r] = rank r's), sequence along `dim`."""
    world = len(shards)
    T = sum(s.shape[dim] for s in shards)
    parts = [None] * (world if layout == "contiguous" else 2 * world)
    for r, s in enumerate(shards):
        at = 0
        for a, b in shard_chunks(T, world, r, layout):
            parts[a // (b - a) if b > a else 0] = s.narrow(dim, at, b - a)
            at += b - a
    if any(p is None for p in parts):   # T = 0: every chunk is empty
        return torch.cat(list(shards), dim)
    return torch.cat(parts, dim)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# ------------------------------------------------------------------------------------------------
# Load balance
# ------------------------------------------------------------------------------------------------
def query_work(spec: NSASpec, t: torch.Tensor) -> torch.Tensor:
    """Multiply-adds of query positions t (int64) summed over heads: compression over its visible
    compressed keys (scores and values), selection over its top-n blocks, window over its keys."""
    HQ, Dk, Dv = spec.heads, spec.head_dim, spec.v_head_dim
    keys = torch.zeros_like(t, dtype=torch.float64)
    c, s, w = spec.compression, spec.selection, spec.window
    if c is not None:
        visible = torch.div(t - c.block + 1, c.stride, rounding_mode="floor") + 1 - c.first_block
        keys += visible.clamp_min(0)
    if s is not None:
        keys += torch.minimum((t // s.block + 1) * s.block, torch.full_like(t, s.top_n * s.block)).clamp_max(t + 1)
    if w is not None:
        keys += torch.clamp(t + 1, max=w.size)
    return keys * HQ * (Dk + Dv)


def work_per_rank(spec: NSASpec, T: int, world: int, layout: str = "zigzag") -> list[float]:
    """Forward multiply-adds of each rank's queries (`query_work`) for a T-token sequence. The backward
    scales the same per rank, so the max / min ratio is the split's load imbalance."""
    return [float(query_work(spec, shard_positions(T, world, r, layout)).sum()) for r in range(world)]


def bytes_per_rank(spec: NSASpec, T: int, world: int, layout: str = "zigzag", itemsize: int = 2,
                   separate_branch_kv: bool = True, batch: int = 1) -> dict[str, int]:
    """Bytes one rank receives in the forward of `batch` sequences of T tokens (the backward sends
    as many back), per exchange:
    `selection` the raw K/V all-gather; `compression` the compressed rows' gather plus their l - 1
    token halos; `window` the window's w - 1 token halos. separate_branch_kv: each branch has its own
    K/V (the layer); otherwise (nsa_attention's default) the window and compression read the gathered
    raw K/V when selection is on, and exchange nothing of their own."""
    H, Dkv = spec.kv_heads, spec.head_dim + spec.v_head_dim
    row = batch * H * Dkv * itemsize
    parts = world if layout == "contiguous" else 2 * world
    c, per = T // parts, parts // world
    out = {}
    s, cm, w = spec.selection, spec.compression, spec.window
    gathered = s is not None
    if gathered:
        out["selection"] = (world - 1) * (T // world) * row
    if cm is not None and (separate_branch_kv or not gathered):
        n = lambda p: reference.num_compressed_blocks(p, cm.block, cm.stride, cm.first_block)  # noqa: E731
        R = max(n((j + 1) * c) - n(j * c) for j in range(parts))
        out["compression"] = (world - 1) * per * (R + min(c, cm.block - 1)) * row
    if w is not None and (separate_branch_kv or not gathered):
        out["window"] = (world - 1) * per * min(c, w.size - 1) * row
    return out


# ------------------------------------------------------------------------------------------------
# Collectives with autograd
# ------------------------------------------------------------------------------------------------
class _AllGather(torch.autograd.Function):
    """x (the same shape on every rank) -> [world, *x.shape], slot r = rank r's x. The backward sums
    every rank's gradient and returns this rank's slot (reduce-scatter on NCCL; gloo has none, so an
    all-reduce, then the slot): a fixed order, bit-identical run to run."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(g[0])
            dist.reduce_scatter_tensor(out, g, group=ctx.group)
            return out, None
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank], None


def _all_gather(x, group):
    return _AllGather.apply(x, group)


def gather_sequence(x: torch.Tensor, group, layout: str = "zigzag") -> torch.Tensor:
    """All-gather a sequence-sharded tensor x [B, Tl, ...] into the whole sequence [B, cp * Tl, ...]
    (position order), differentiable: the gradient of the result returns, summed over the ranks, to
    each rank's shard."""
    _check_layout(layout)
    return unshard(list(_all_gather(x, group).unbind(0)), layout)


def _halos(x, group, layout, T, width):
    """For each of this rank's chunks [a, b) (shard_chunks order): x's tokens [max(0, a - width), a),
    which other chunks hold. x: this rank's shard [B, Tl, ...]. One all-gather of every chunk's last
    min(chunk, width) tokens (its tail), differentiable: a halo's gradient returns to its owner."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = shard_chunks(T, world, rank, layout)
    c = mine[0][1] - mine[0][0]
    we = min(c, width)
    if we <= 0:
        return [x[:, :0] for _ in mine]
    tails, at = [], 0
    for a, b in mine:
        at += b - a
        tails.append(x[:, at - we:at])
    gathered = _all_gather(torch.stack(tails), group)          # [world, chunks, B, we, ...]
    tail_ending_at = {b: gathered[r, i] for r in range(world)
                      for i, (_, b) in enumerate(shard_chunks(T, world, r, layout))}
    out = []
    for a, _ in mine:
        need, parts, end = min(a, width), [], a
        while sum(p.shape[1] for p in parts) < need:   # whole chunks when we == c, else one tail
            parts.insert(0, tail_ending_at[end])
            end -= c
        out.append(torch.cat(parts, 1)[:, parts and sum(p.shape[1] for p in parts) - need:] if parts else x[:, :0])
    return out


def _compressed_rows(src, phi, group, layout, T, branch):
    """All N(T) compressed rows of the sequence [B, N, H, D], each pooled by phi (blocks [..., l, H, D]
    -> [..., H, D]) on the rank holding its block's last token, from that chunk and an l - 1 token
    halo, then all-gathered (rows padded to the longest chunk's count for the collective)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    l, d, f = branch.block, branch.stride, branch.first_block

    def n_rows(p):
        return reference.num_compressed_blocks(p, l, d, f)
    every = [shard_chunks(T, world, r, layout) for r in range(world)]
    R = max(n_rows(b) - n_rows(a) for chunks in every for a, b in chunks)
    B, H, D = src.shape[0], src.shape[2], src.shape[3]
    mine, halos, at = every[rank], _halos(src, group, layout, T, l - 1), 0
    stacked = []
    for (a, b), halo in zip(mine, halos):
        ext = torch.cat([halo, src[:, at:at + b - a]], 1)        # tokens [a - len(halo), b)
        at += b - a
        r0, r1 = n_rows(a), n_rows(b)
        start = (torch.arange(r0, r1, device=src.device) + f) * d - (a - halo.shape[1])
        rows = phi(ext[:, start[:, None] + torch.arange(l, device=src.device)]) if r1 > r0 else \
            src.new_zeros(B, 0, H, D)
        stacked.append(torch.cat([rows, rows.new_zeros(B, R - (r1 - r0), H, D)], 1))
    if R == 0:
        return src.new_zeros(B, 0, H, D)
    gathered = _all_gather(torch.stack(stacked), group)          # [world, chunks, B, R, H, D]
    by_start = sorted((a, b, r, i) for r, chunks in enumerate(every) for i, (a, b) in enumerate(chunks))
    return torch.cat([gathered[r, i, :, :n_rows(b) - n_rows(a)] for a, b, r, i in by_start], 1)


# ------------------------------------------------------------------------------------------------
# Agreement: every rank checks the same facts and raises the same error (never one rank alone, which
# would leave the others waiting in a collective)
# ------------------------------------------------------------------------------------------------
_FIELDS = ("error", "group size", "B", "tokens per shard", "HQ", "Dk", "H", "Dv", "dtype", "layout", "spec",
           "k_cmp given", "k_win given", "block_indices given", "cmp_kv given", "group ranks")
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _member(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("cp_group given but torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"cp_group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return dist.get_world_size(group), rank


def _agree(group, world, rank, q, k, v, spec, layout, local_error, **given):
    """Exchange each rank's facts (one all_gather of a small int64 vector); raise on every rank unless
    all ranks agree and none failed its own checks."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    shape = [int(x) for x in (*q.shape[:4], *k.shape[2:], v.shape[-1])] if local_error is None else [-1] * 7
    mine = [int(local_error is not None), world, *shape[:2], shape[2], shape[3], shape[5], shape[6],
            _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1, LAYOUTS.index(layout) if layout in LAYOUTS else -1,
            _digest(spec.to_yaml() if isinstance(spec, NSASpec) else repr(spec)),
            *(int(given[n] is not None) for n in ("k_cmp", "k_win", "block_indices", "cmp_kv")),
            _digest(repr(dist.get_process_group_ranks(group)))]
    facts = [torch.empty(len(_FIELDS), dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(facts, torch.tensor(mine, dtype=torch.int64, device=dev), group=group)
    facts = torch.stack(facts).cpu()
    if local_error is not None:
        raise ValueError(f"context parallel, rank {rank}: {local_error}")
    failed = facts[:, 0].nonzero().flatten().tolist()
    if failed:
        raise ValueError(f"context parallel: rank(s) {failed} rejected their inputs (their error names why); "
                         f"every rank stops")
    for i, name in enumerate(_FIELDS):
        col = facts[:, i].tolist()
        if len(set(col)) > 1:
            shown = col if name not in ("spec", "group ranks", "dtype", "layout") else \
                [("same as rank 0" if x == col[0] else "different") for x in col]
            raise ValueError(f"context parallel: the ranks disagree on {name}: {shown} (rank 0 first); every "
                             f"rank must pass its shard of one sequence, with the same spec, dtype and layout")


_WARNED_CUDA = []


def nsa_context_parallel(q, k, v, g_cmp, g_slc, g_win, spec: NSASpec, *, group, layout: str = "zigzag",
                         k_cmp=None, v_cmp=None, k_win=None, v_win=None, cmp_kv=None, phi=None,
                         block_indices=None):
    """NSA forward of this rank's shard of one sequence split across `group` (see the module doc).

    q [B, Tl, HQ, Dk], k [B, Tl, H, Dk], v [B, Tl, H, Dv], gates [B, Tl, HQ], k_win / v_win and
    block_indices [B, Tl, H, n] (global block ids): this rank's shard, layout `layout`, Tl equal on every
    rank. k_cmp / v_cmp [B, N(T), H, D]: all compressed rows of the whole sequence (every rank the
    same), default the mean pool of the gathered k / v. Returns o [B, Tl, HQ, Dv], this rank's shard.
    Differentiable; the backward's collectives mirror the forward's.
    """
    world, rank = _member(group)
    local_error = None
    try:
        if not isinstance(spec, NSASpec):
            raise TypeError(f"spec must be an NSASpec, got {type(spec).__name__}")
        _check_layout(layout)
        reference.check_inputs(q, k, v, spec)
        reference.check_gates(q, spec, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win)
        T = world * q.shape[1]
        shard_chunks(T, world, rank, layout)   # the split exists
        _check_extras(q, spec, T, k_cmp, v_cmp, k_win, v_win, block_indices)
        if cmp_kv is not None:
            if spec.compression is None or not isinstance(cmp_kv, (tuple, list)) or len(cmp_kv) != 2:
                raise ValueError("cmp_kv must be a pair (k, v) of the compression branch's K/V shards, with "
                                 "the compression branch on")
            _check_extras(q, spec, T, None, None, *cmp_kv, None, names=("cmp_kv[0]", "cmp_kv[1]"))
        if phi is not None and (not isinstance(phi, (tuple, list)) or len(phi) != 2 or not all(map(callable, phi))):
            raise ValueError("phi must be a pair of callables (k pooler, v pooler): blocks [..., l, H, D] -> [..., H, D]")
    except (TypeError, ValueError) as e:
        local_error = str(e)
    _agree(group, world, rank, q, k, v, spec, layout, local_error, k_cmp=k_cmp, k_win=k_win,
           block_indices=block_indices, cmp_kv=cmp_kv)
    if q.is_cuda and not _WARNED_CUDA:
        _WARNED_CUDA.append(True)
        warnings.warn("context parallelism runs the PyTorch reference (the kernels take no query offset yet): "
                      "exact but slow on CUDA", stacklevel=2)
    c, sel, win = spec.compression, spec.selection, spec.window
    # Selection reads any block: the raw K/V are gathered whole. The window reads w - 1 keys before
    # each chunk (halos) and compression its rows (pooled where they end, then gathered), unless the
    # gathered K/V already hold them.
    K = V = None
    if sel is not None:
        K, V = gather_sequence(k, group, layout), gather_sequence(v, group, layout)
    if c is not None and k_cmp is None:
        src_k, src_v = (k, v) if cmp_kv is None else cmp_kv
        if K is not None and cmp_kv is None and phi is None:
            k_cmp, v_cmp = (reference.compress(x, c.block, c.stride, c.first_block) for x in (K, V))
        else:
            phi_k, phi_v = phi or (mean_phi, mean_phi)
            k_cmp = _compressed_rows(src_k, phi_k, group, layout, T, c)
            v_cmp = _compressed_rows(src_v, phi_v, group, layout, T, c)
    wins = None
    if win is not None and (K is None or k_win is not None):
        kw, vw = (k, v) if k_win is None else (k_win, v_win)
        wins = list(zip(_halos(kw, group, layout, T, win.size - 1), _halos(vw, group, layout, T, win.size - 1)))
    outs, at = [], 0
    for i, (a, b) in enumerate(shard_chunks(T, world, rank, layout)):
        rows = slice(at, at + b - a)
        at += b - a
        kwargs = dict(t_offset=a, block_indices=None if block_indices is None else block_indices[:, rows])
        if c is not None:
            n_cmp = reference.num_compressed_blocks(b, c.block, c.stride, c.first_block)
            kwargs.update(k_cmp=k_cmp[:, :n_cmp], v_cmp=v_cmp[:, :n_cmp])
        if wins is not None:
            (hk, hv), kw, vw = wins[i], *((k, v) if k_win is None else (k_win, v_win))
            kwargs.update(k_win=torch.cat([hk, kw[:, rows]], 1), v_win=torch.cat([hv, vw[:, rows]], 1),
                          win_start=a - hk.shape[1])
        outs.append(reference.nsa_reference_queries(
            q[:, rows], None if K is None else K[:, :b], None if V is None else V[:, :b],
            *(None if g is None else g[:, rows] for g in (g_cmp, g_slc, g_win)), spec, **kwargs))
    return torch.cat(outs, 1)


def _check_extras(q, spec, T, k_cmp, v_cmp, k_win, v_win, block_indices, names=("k_win", "v_win")):
    B, Tl = q.shape[:2]
    H, Dk, Dv = spec.kv_heads, spec.head_dim, spec.v_head_dim
    if (k_win is None) != (v_win is None):
        raise ValueError(f"give both {names[0]} and {names[1]}, or neither")
    for name, x, D in ((names[0], k_win, Dk), (names[1], v_win, Dv)):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, Tl, H, D)
                              or x.dtype != q.dtype or x.device != q.device):
            raise ValueError(f"{name} must be this rank's shard [{B}, {Tl}, {H}, {D}] ({q.dtype}, {q.device}), "
                             f"got {getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("give both k_cmp and v_cmp, or neither")
    c = spec.compression
    if c is not None and k_cmp is not None:
        N = reference.num_compressed_blocks(T, c.block, c.stride, c.first_block)
        for name, x, D in (("k_cmp", k_cmp, Dk), ("v_cmp", v_cmp, Dv)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, N, H, D):
                raise ValueError(f"{name} must hold all N = {N} compressed rows of the T = {T} sequence, "
                                 f"[{B}, {N}, {H}, {D}], got {list(getattr(x, 'shape', []))}")
    if spec.selection is not None and block_indices is not None:
        s = spec.selection
        want = (B, Tl, H, s.top_n)
        if not isinstance(block_indices, torch.Tensor) or block_indices.dtype not in (torch.int32, torch.int64) \
                or tuple(block_indices.shape) != want:
            raise ValueError(f"block_indices must be this rank's shard, an int32/int64 tensor {list(want)}, got "
                             f"{getattr(block_indices, 'dtype', None)} {list(getattr(block_indices, 'shape', []))}")
        NS = reference.num_selection_blocks(T, s.block)
        if block_indices.numel() and (int(block_indices.min()) < -1 or int(block_indices.max()) >= NS):
            raise ValueError(f"block_indices must hold global block ids in [-1, {NS}) (T = {T}), got values in "
                             f"[{int(block_indices.min())}, {int(block_indices.max())}]")
