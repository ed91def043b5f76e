"""Plain-PyTorch NSA: the oracle every kernel is tested against.

Semantics (tokens are 0-indexed, t = 0..T-1; l = compression block, d = stride, l' = selection
block, n = top_n, w = window, G = HQ / H query heads per KV head):

Compression. Compressed block i covers tokens [i*d, i*d + l). It exists once complete and is
visible to query t iff i*d + l - 1 <= t. `first_block` f is the first i produced (the paper's text
reads 1 <= i, i.e. f = 1), so row c of k_cmp / v_cmp is block i = f + c. phi pools the l keys of a
block (`compress` here is the mean; the MLP phi lives in `nsa_codegen.layer`). Compression
attention is a softmax over the visible compressed keys; a query with none gets o = 0, lse = -inf.

Selection scores. p_cmp = the compression branch's per-head softmax probabilities, summed over the
G query heads of a KV group (paper Eq. 10), then mapped onto selection blocks by overlap in stride
units: p_slc[j] = sum_i w_ij p_cmp[i], w_ij = number of length-d stride units shared by compressed
block i (units i .. i + l/d - 1) and selection block j (units j*l'/d .. (j+1)*l'/d - 1).

Top-n. Selection block j is visible to t iff j*l' <= t. Blocks 0..initial-1 and the `local` latest
visible blocks (t // l', t // l' - 1, ...) are always taken; the rest of the n slots go to the
highest scores, ties to the lower index. A token with fewer visible blocks takes them all. Indices
are returned sorted ascending, padded with -1. Within a block, keys after t are masked.

Window. Query t sees keys (t - w, t].

Output. o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win; gates are [B, T, HQ] in [0, 1].

Layouts: q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv]; lse is the natural-log logsumexp of
the scaled scores, [B, T, HQ]. Matmuls run in the inputs' dtype (so the same code gives the
low-precision baseline a kernel is held to), softmax statistics in float32 (float64 for float64
inputs). Every function
works on query chunks so memory stays O(T * blocks), never O(T^2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import packing
from .spec import NSASpec

# Elements of the largest intermediate a chunk may hold; bounds reference memory at long T.
_CHUNK_ELEMENTS = 1 << 25


def _chunk_len(T: int, per_token: int) -> int:
    return max(1, min(T, _CHUNK_ELEMENTS // max(1, per_token)))


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    HQ, H = q.shape[2], k.shape[2]
    if HQ % H:
        raise ValueError(f"q heads ({HQ}) must be a multiple of k heads ({H})")
    return HQ // H


# ------------------------------------------------------------------------------------------------
# Compression
# ------------------------------------------------------------------------------------------------
def num_compressed_blocks(T: int, block: int, stride: int, first_block: int = 0) -> int:
    """Number of complete compressed blocks i >= first_block in a sequence of T tokens."""
    if T < block:
        return 0
    return max(0, (T - block) // stride + 1 - first_block)


def compress(x: torch.Tensor, block: int, stride: int, first_block: int = 0) -> torch.Tensor:
    """Mean-pooling phi. x [B, T, H, D] -> [B, N, H, D]; row c pools tokens [(f+c)*d, (f+c)*d + l)."""
    B, T, H, D = x.shape
    N = num_compressed_blocks(T, block, stride, first_block)
    if N == 0:
        return x.new_zeros(B, 0, H, D)
    blocks = x.unfold(1, block, stride)  # [B, N_all, H, D, l]
    return blocks[:, first_block:first_block + N].mean(dim=-1)


def compressed_visible(t: torch.Tensor, N: int, block: int, stride: int, first_block: int) -> torch.Tensor:
    """[len(t), N] bool: compressed row c (block i = f + c) is complete at query t."""
    i = torch.arange(N, device=t.device) + first_block
    return (i * stride + block - 1)[None, :] <= t[:, None]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in float32, or float64 when the inputs are float64 (the oracle)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _weighted_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p @ v (matmul broadcasting) where a value no row weighs stays out of every row: 0 * Inf is NaN,
    so a non-finite value is zeroed first and only the rows that give it weight (p > 0) get NaN in
    its feature. The mask is what keeps a future or unselected token's NaN/Inf out of an output."""
    if bool(torch.isfinite(v).all()):
        return p @ v
    bad = ~torch.isfinite(v)
    o = p @ v.masked_fill(bad, 0)
    hit = ((p > 0).to(p.dtype) @ bad.to(p.dtype)) > 0
    return o.masked_fill(hit, float("nan"))


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor):
    """s [..., K] (float32/64), mask broadcastable -> (p, lse); rows with no key give p = 0, lse = -inf."""
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # exp(-inf - (-inf)) is NaN: clamp lse so an empty row gives exp(-inf) = 0.
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(s.dtype).min))
    return p, lse


def compression_attention(q, k_cmp, v_cmp, block: int, stride: int, first_block: int = 0,
                          scale: Optional[float] = None, t_offset: int = 0, return_probs: bool = False):
    """Attention over compressed keys.

    q [B, Tq, HQ, Dk] (query tokens t_offset .. t_offset+Tq-1), k_cmp [B, N, H, Dk], v_cmp [B, N, H, Dv].
    Returns o [B, Tq, HQ, Dv], lse [B, Tq, HQ] and, with return_probs, p [B, Tq, HQ, N] (float32/64).
    """
    B, Tq, HQ, _ = q.shape
    N, H, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    G = _group(q, k_cmp)
    sc = _scale(q, scale)
    t = torch.arange(Tq, device=q.device) + t_offset
    mask = compressed_visible(t, N, block, stride, first_block)  # [Tq, N]
    s = _acc(torch.einsum("bthgd,bchd->bthgc", q.view(B, Tq, H, G, -1), k_cmp)) * sc
    p, lse = _masked_softmax(s, mask[None, :, None, None, :])
    o = _weighted_values(p.to(v_cmp.dtype), v_cmp.permute(0, 2, 1, 3)[:, None]).reshape(B, Tq, HQ, Dv)
    lse = lse.reshape(B, Tq, HQ)
    if return_probs:
        return o, lse, p.reshape(B, Tq, HQ, N)
    return o, lse


# ------------------------------------------------------------------------------------------------
# Selection scores and top-n
# ------------------------------------------------------------------------------------------------
def num_selection_blocks(T: int, block: int) -> int:
    return (T + block - 1) // block


def score_mapping_weights(N: int, num_sel_blocks: int, block: int, stride: int, sel_block: int,
                          first_block: int = 0, device=None) -> torch.Tensor:
    """[N, NS] float32: w[c, j] = stride units shared by compressed block i = f + c and selection block j."""
    i = torch.arange(N, device=device) + first_block
    j = torch.arange(num_sel_blocks, device=device)
    units_per_cmp, units_per_sel = block // stride, sel_block // stride
    lo = torch.maximum(i[:, None], j[None, :] * units_per_sel)
    hi = torch.minimum(i[:, None] + units_per_cmp, (j[None, :] + 1) * units_per_sel)
    return (hi - lo).clamp_min(0).float()


def selection_scores(p_cmp: torch.Tensor, kv_heads: int, T: int, block: int, stride: int, sel_block: int,
                     first_block: int = 0) -> torch.Tensor:
    """p_cmp [B, Tq, HQ, N] -> p_slc [B, Tq, H, NS], NS = ceil(T / sel_block); group-summed (Eq. 10)."""
    B, Tq, HQ, N = p_cmp.shape
    p = _acc(p_cmp).view(B, Tq, kv_heads, HQ // kv_heads, N).sum(dim=3)
    W = score_mapping_weights(N, num_selection_blocks(T, sel_block), block, stride, sel_block,
                              first_block, device=p.device).to(p.dtype)
    return p @ W


def select_top_n(scores: torch.Tensor, sel_block: int, top_n: int, initial: int = 1, local: int = 2,
                 t_offset: int = 0) -> torch.Tensor:
    """scores [B, Tq, H, NS] -> block indices [B, Tq, H, top_n] int32, ascending, -1 padded.

    Forced blocks (initial, local) rank above every score; visible blocks with equal scores are
    taken lower index first (a stable descending sort keeps index order among ties).
    """
    B, Tq, H, NS = scores.shape
    key = selection_keys(scores, sel_block, initial, local, t_offset)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :top_n]
    taken = torch.gather(key, -1, order) > float("-inf")
    idx = torch.where(taken, order, torch.full_like(order, NS))
    idx = idx.sort(dim=-1).values
    idx = torch.where(idx == NS, torch.full_like(idx, -1), idx)
    if idx.shape[-1] < top_n:  # fewer blocks in the whole sequence than slots
        idx = torch.cat([idx, idx.new_full((B, Tq, H, top_n - idx.shape[-1]), -1)], dim=-1)
    return idx.to(torch.int32)


def selection_keys(scores: torch.Tensor, sel_block: int, initial: int = 1, local: int = 2,
                   t_offset: int = 0) -> torch.Tensor:
    """The ranking keys select_top_n sorts: scores [B, Tq, H, NS] with forced blocks +inf and blocks
    past the query's -inf (float64)."""
    Tq, NS = scores.shape[1], scores.shape[-1]
    t = torch.arange(Tq, device=scores.device) + t_offset
    j = torch.arange(NS, device=scores.device)
    jt = (t // sel_block)[:, None]
    visible = j[None, :] <= jt
    forced = visible & ((j[None, :] < initial) | (j[None, :] > jt - local))
    key = scores.double().masked_fill(~visible[None, :, None, :], float("-inf"))
    return key.masked_fill(forced[None, :, None, :], float("inf"))


def compare_block_indices(got: torch.Tensor, want: torch.Tensor, keys: torch.Tensor,
                          rtol: float = 1e-2) -> tuple[bool, int, str]:
    """Whether a kernel's top-n lists `got` equal the reference's `want` ([..., n] int, ascending, -1
    padded) up to near ties: a list may differ only by blocks whose keys ([..., NS]) are within rtol
    of the largest finite key of its row. Returns (ok, rows that differ by near ties, message)."""
    got, want, keys = got.cpu(), want.cpu(), keys.cpu()
    n = got.shape[-1]
    g2, w2, k2 = got.reshape(-1, n), want.reshape(-1, n), keys.reshape(-1, keys.shape[-1])
    ties = 0
    for r in torch.nonzero((g2 != w2).any(-1)).flatten().tolist():
        a, b = g2[r].tolist(), w2[r].tolist()
        va, vb = [x for x in a if x >= 0], [x for x in b if x >= 0]
        if va != sorted(va) or len(set(va)) != len(va) or len(va) != len(vb) \
                or a[len(va):] != [-1] * (n - len(va)) or any(x >= k2.shape[-1] for x in va):
            return False, ties, f"row {r}: kernel {a} vs reference {b} (malformed)"
        kk = k2[r]
        fin = kk[torch.isfinite(kk)]
        scale = fin.abs().max().item() if fin.numel() else 1.0
        worst = max(abs(kk[x].item() - kk[y].item()) for x in set(va) - set(vb) for y in set(vb) - set(va))
        if not worst <= rtol * max(scale, 1e-30):
            return False, ties, f"row {r}: kernel {a} vs reference {b}: score gap {worst:.3e} (max {scale:.3e})"
        ties += 1
    return True, ties, ""


# ------------------------------------------------------------------------------------------------
# Selection and window attention
# ------------------------------------------------------------------------------------------------
def _block_rows(x: torch.Tensor, sel_block: int) -> torch.Tensor:
    """x [B, T, H, D] -> [B * H * NS, l' * D]: one row per (batch, head, selection block), zero-padded."""
    B, T, H, D = x.shape
    NS = num_selection_blocks(T, sel_block)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, NS * sel_block - T))
    return x.view(B, NS, sel_block, H, D).permute(0, 3, 1, 2, 4).reshape(B * H * NS, sel_block * D)


def selection_attention(q, k, v, block_indices, sel_block: int, scale: Optional[float] = None,
                        t_offset: int = 0):
    """q [B, T, HQ, Dk], k [B, S, H, Dk], v [B, S, H, Dv], block_indices [B, T, H, n] (-1 = none).

    Row i of q is query t = t_offset + i (S >= t_offset + T; S = T, t_offset = 0 for a whole sequence).
    Query t attends to keys s in the selected blocks with s <= t. Returns o [B, T, HQ, Dv], lse [B, T, HQ].
    """
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = _group(q, k)
    n = block_indices.shape[-1]
    sc = _scale(q, scale)
    NS = num_selection_blocks(k.shape[1], sel_block)
    kb, vb = _block_rows(k, sel_block), _block_rows(v, sel_block)
    row0 = (torch.arange(B, device=q.device)[:, None, None, None] * H
            + torch.arange(H, device=q.device)[None, None, :, None]) * NS
    offs = torch.arange(sel_block, device=q.device)
    out, lses = [], []
    step = _chunk_len(T, H * n * sel_block * (Dk + Dv + G))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        Tc = t1 - t0
        idx = block_indices[:, t0:t1].long()  # [B, Tc, H, n]
        # Whole blocks are gathered as contiguous rows (index_select), not token by token.
        rows = (row0 + idx.clamp_min(0)).flatten()
        ks = kb.index_select(0, rows).view(B, Tc, H, n * sel_block, Dk)
        vs = vb.index_select(0, rows).view(B, Tc, H, n * sel_block, Dv)
        pos = (idx[..., None] * sel_block + offs).flatten(-2)  # [B, Tc, H, n*l']
        t = torch.arange(t0, t1, device=q.device)[None, :, None, None] + t_offset
        valid = (idx >= 0).repeat_interleave(sel_block, dim=-1) & (pos <= t)
        qc = q[:, t0:t1].view(B, Tc, H, G, Dk)
        s = _acc(qc @ ks.transpose(-1, -2)) * sc  # [B, Tc, H, G, n*l']
        p, lse = _masked_softmax(s, valid[:, :, :, None, :])
        o = _weighted_values(p.to(vs.dtype), vs)  # [B, Tc, H, G, Dv]
        out.append(o.reshape(B, Tc, HQ, Dv))
        lses.append(lse.reshape(B, Tc, HQ))
    return _joined(out, lses, q, Dv)


def _joined(out, lses, q, Dv):
    """The chunks' o and lse joined along T; T = 0 (no chunk): empty o [B, 0, HQ, Dv], lse [B, 0, HQ]."""
    if not out:
        B, _, HQ, _ = q.shape
        return q.new_zeros(B, 0, HQ, Dv), q.new_zeros(B, 0, HQ, dtype=_acc(q[:0]).dtype)
    return torch.cat(out, 1), torch.cat(lses, 1)


def window_attention(q, k, v, window: int, scale: Optional[float] = None, t_offset: int = 0):
    """Sliding-window causal attention: query t sees keys (t - window, t]. Shapes and t_offset as
    selection_attention."""
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = _group(q, k)
    sc = _scale(q, scale)
    out, lses = [], []
    # Chunks of about one window: keys per chunk stay under 2 * window.
    step = max(1, min(window, _chunk_len(T, HQ * 2 * window)))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        Tc = t1 - t0
        s0, s1 = max(0, t_offset + t0 - window + 1), t_offset + t1   # keys this chunk can see
        qc = q[:, t0:t1].view(B, Tc, H, G, Dk).permute(0, 2, 1, 3, 4).reshape(B, H, Tc * G, Dk)
        kc = k[:, s0:s1].permute(0, 2, 3, 1)  # [B, H, Dk, S]
        s = _acc(qc @ kc).view(B, H, Tc, G, -1) * sc
        t = torch.arange(t0, t1, device=q.device)[:, None] + t_offset
        sp = torch.arange(s0, s1, device=q.device)[None, :]
        mask = (sp <= t) & (sp > t - window)
        p, lse = _masked_softmax(s, mask[None, None, :, None, :])
        o = _weighted_values(p.to(v.dtype).view(B, H, Tc * G, -1), v[:, s0:s1].permute(0, 2, 1, 3))  # [B, H, Tc*G, Dv]
        out.append(o.view(B, H, Tc, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, Tc, HQ, Dv))
        lses.append(lse.permute(0, 2, 1, 3).reshape(B, Tc, HQ))
    return _joined(out, lses, q, Dv)


def dense_causal_attention(q, k, v, scale: Optional[float] = None):
    """Full causal attention (a window as long as the sequence); for equivalence tests."""
    return window_attention(q, k, v, max(1, q.shape[1]), scale)


# ------------------------------------------------------------------------------------------------
# Compression branch + scoring + top-n, chunked so p_cmp never exists for the whole sequence
# ------------------------------------------------------------------------------------------------
def compression_and_selection(q, k_cmp, v_cmp, spec: NSASpec, T: int, need_indices: bool, t_offset: int = 0):
    """Returns o_cmp [B, Tq, HQ, Dv], lse_cmp [B, Tq, HQ] and block indices [B, Tq, H, n] (or None) of the
    queries t_offset .. t_offset+Tq-1 (q [B, Tq, HQ, Dk]) of a sequence whose keys number T."""
    c, s = spec.compression, spec.selection
    B, Tq, HQ, _ = q.shape
    N = k_cmp.shape[1]
    step = _chunk_len(Tq, HQ * max(N, 1) + (num_selection_blocks(T, s.block) if s else 0) * spec.kv_heads * 4)
    outs, lses, idxs = [], [], []
    for t0 in range(0, Tq, step):
        t1 = min(Tq, t0 + step)
        o, lse, p = compression_attention(q[:, t0:t1], k_cmp, v_cmp, c.block, c.stride, c.first_block,
                                          spec.softmax_scale, t_offset=t_offset + t0, return_probs=True)
        outs.append(o)
        lses.append(lse)
        if need_indices:
            sc = selection_scores(p, spec.kv_heads, T, c.block, c.stride, s.block, c.first_block)
            idxs.append(select_top_n(sc, s.block, s.top_n, s.initial, s.local, t_offset=t_offset + t0))
    return torch.cat(outs, 1), torch.cat(lses, 1), (torch.cat(idxs, 1) if need_indices else None)


def block_keys(q, k_cmp, v_cmp, spec: NSASpec, T: int, t_offset: int = 0) -> torch.Tensor:
    """The ranking keys (selection_keys) of queries t_offset .. t_offset+Tq-1 of a T-token sequence:
    q [B, Tq, HQ, Dk], k_cmp / v_cmp [B, N, H, D] -> [B, Tq, H, NS] float64."""
    c, s = spec.compression, spec.selection
    p = compression_attention(q, k_cmp, v_cmp, c.block, c.stride, c.first_block, spec.softmax_scale,
                              t_offset=t_offset, return_probs=True)[2]
    sc = selection_scores(p, spec.kv_heads, T, c.block, c.stride, s.block, c.first_block)
    return selection_keys(sc, s.block, s.initial, s.local, t_offset)


# ------------------------------------------------------------------------------------------------
# The whole layer
# ------------------------------------------------------------------------------------------------
def check_inputs(q, k, v, spec: NSASpec):
    """Raise naming the argument unless q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv] are
    floating tensors whose shapes match the spec and each other (the ops check the same first)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D: q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv]")
    B, T, HQ, Dk = q.shape
    if HQ != spec.heads or Dk != spec.head_dim:
        raise ValueError(f"q must be [B, T, {spec.heads}, {spec.head_dim}] for this spec, got {list(q.shape)}")
    if tuple(k.shape) != (B, T, spec.kv_heads, spec.head_dim):
        raise ValueError(f"k must be [{B}, {T}, {spec.kv_heads}, {spec.head_dim}], got {list(k.shape)}")
    if tuple(v.shape) != (B, T, spec.kv_heads, spec.v_head_dim):
        raise ValueError(f"v must be [{B}, {T}, {spec.kv_heads}, {spec.v_head_dim}], got {list(v.shape)}")


def check_gates(q, spec: NSASpec, **gates):
    """Each gate of a branch that is on must be a floating [B, T, HQ] tensor (off: ignored, may be None)."""
    on = {"g_cmp": spec.compression, "g_slc": spec.selection, "g_win": spec.window}
    for name, g in gates.items():
        if on[name] is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"{name} is required (its branch is on): a [B, T, HQ] tensor, got {type(g).__name__}")
        if tuple(g.shape) != tuple(q.shape[:3]) or not g.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, T, HQ] = {list(q.shape[:3])} tensor, "
                             f"got {g.dtype} {list(g.shape)}")


def check_block_indices(block_indices, q, spec: NSASpec) -> None:
    """block_indices must be an integer [B, T, H, top_n] tensor of block ids in [-1, ceil(T / block)):
    -1 is a pad; a block that starts after its token is allowed and contributes nothing."""
    s = spec.selection
    B, T = q.shape[:2]
    want = (B, T, spec.kv_heads, s.top_n)
    if not isinstance(block_indices, torch.Tensor) or block_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_indices must be an int32 or int64 tensor {list(want)}, got "
                         f"{getattr(block_indices, 'dtype', type(block_indices).__name__)}")
    if tuple(block_indices.shape) != want:
        raise ValueError(f"block_indices must be [B, T, H, top_n] = {list(want)}, got {list(block_indices.shape)}")
    NS = num_selection_blocks(T, s.block)
    if block_indices.numel():
        lo, hi = int(block_indices.min()), int(block_indices.max())
        if lo < -1 or hi >= NS:
            raise ValueError(f"block_indices must lie in [-1, {NS}) (-1 = pad; {NS} blocks of {s.block} in "
                             f"T = {T}), got values in [{lo}, {hi}]")


def nsa_reference(q, k, v, g_cmp, g_slc, g_win, spec: NSASpec, *, k_cmp=None, v_cmp=None, k_win=None,
                  v_win=None, block_indices=None, cu_seqlens=None, return_indices: bool = False):
    """NSA forward. q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv], gates [B, T, HQ].

    k_cmp / v_cmp [B, N, H, D]: compressed keys/values (default: mean-pool `compress` of k / v).
    k_win / v_win: the window branch's keys/values (default k / v). block_indices [B, T, H, n]
    overrides the selection (required when the compression branch is off). A switched-off branch
    ignores its gate (it may be None). cu_seqlens [S+1] (with B == 1) packs S sequences along T;
    then k_cmp / v_cmp, if given, pack each sequence's compressed rows in the same order.
    Returns o [B, T, HQ, Dv], plus block indices [B, T, H, n] (-1 padded) with return_indices.
    """
    check_inputs(q, k, v, spec)
    check_gates(q, spec, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win)
    if cu_seqlens is not None:
        return run_packed(q, k, v, g_cmp, g_slc, g_win, spec, k_cmp, v_cmp, k_win, v_win, block_indices,
                       cu_seqlens, return_indices)
    if spec.selection is not None and block_indices is not None:
        check_block_indices(block_indices, q, spec)
    return nsa_reference_queries(q, k, v, g_cmp, g_slc, g_win, spec, k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win,
                                 v_win=v_win, block_indices=block_indices, return_indices=return_indices)


def nsa_reference_queries(q, k, v, g_cmp, g_slc, g_win, spec: NSASpec, *, t_offset: int = 0, k_cmp=None,
                          v_cmp=None, k_win=None, v_win=None, win_start: int = 0, block_indices=None,
                          return_indices: bool = False):
    """NSA forward of the queries t_offset .. t_offset+Tq-1 of one sequence (a shard of it, for
    context parallelism): q [B, Tq, HQ, Dk] and gates [B, Tq, HQ] are those queries' rows; k [B, S, H, Dk],
    v [B, S, H, Dv] are the sequence's first S = t_offset + Tq keys (the later ones no query here can
    see; None when the selection branch is off and k_cmp / v_cmp and k_win / v_win are given);
    k_cmp / v_cmp [B, N(S), H, D] its compressed rows complete within them (default: mean pooling of
    k / v); k_win / v_win (default k / v) its keys from position win_start to S - 1 (a window only
    reads the last w); block_indices [B, Tq, H, n]. Inputs are not checked here (the callers do).
    Returns o [B, Tq, HQ, Dv] (and the block indices with return_indices)."""
    B, Tq = q.shape[:2]
    S = t_offset + Tq
    for name, x, want in (("k / v", k, S), ("k_win / v_win", k_win, S - win_start)):
        if x is not None and x.shape[1] != want:
            raise ValueError(f"queries {t_offset}..{S - 1} need {name} of exactly {want} tokens, got {x.shape[1]}")
    c, s = spec.compression, spec.selection
    if Tq == 0:  # defined: an empty output (and empty block lists)
        out = q.new_zeros(B, 0, spec.heads, spec.v_head_dim)
        idx = q.new_zeros(B, 0, spec.kv_heads, s.top_n, dtype=torch.int32) if s is not None else None
        return (out, idx) if return_indices else out
    out = torch.zeros(B, Tq, spec.heads, spec.v_head_dim, dtype=_acc(q[:0]).dtype, device=q.device)
    indices = None
    if s is not None and block_indices is None and c is None:
        raise ValueError("the compression branch is off, so selection needs explicit block_indices")
    if c is not None:
        if k_cmp is None:
            k_cmp = compress(k, c.block, c.stride, c.first_block)
        if v_cmp is None:
            v_cmp = compress(v, c.block, c.stride, c.first_block)
        N = num_compressed_blocks(S, c.block, c.stride, c.first_block)
        if k_cmp.shape[1] != N or v_cmp.shape[1] != N:
            raise ValueError(f"k_cmp / v_cmp must have N = {N} compressed rows for T = {S}, "
                             f"got {k_cmp.shape[1]} / {v_cmp.shape[1]}")
        need = s is not None and block_indices is None
        o_cmp, _, indices = compression_and_selection(q, k_cmp, v_cmp, spec, S, need, t_offset)
        out += g_cmp.unsqueeze(-1).to(out.dtype) * o_cmp.to(out.dtype)
    if s is not None:
        if block_indices is not None:
            indices = block_indices
        o_slc, _ = selection_attention(q, k, v, indices, s.block, spec.softmax_scale, t_offset)
        out += g_slc.unsqueeze(-1).to(out.dtype) * o_slc.to(out.dtype)
    if spec.window is not None:
        kw, vw, start = (k, v, 0) if k_win is None else (k_win, v_win, win_start)
        o_win, _ = window_attention(q, kw, vw, spec.window.size, spec.softmax_scale, t_offset - start)
        out += g_win.unsqueeze(-1).to(out.dtype) * o_win.to(out.dtype)
    out = out.to(q.dtype)
    return (out, indices) if return_indices else out


def run_packed(q, k, v, g_cmp, g_slc, g_win, spec, k_cmp, v_cmp, k_win, v_win, block_indices, cu_seqlens,
               return_indices):
    """Run nsa_reference on each sequence of a packed batch: cu_seqlens a tensor (checked here, one
    host sync) or a packing.Pack (checked when it was made; one from host lengths needs no sync, so
    torch.compile traces it without a graph break, specializing on the lengths)."""
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q must be packed as [1, total, HQ, D], got batch {q.shape[0]}")
    if isinstance(cu_seqlens, packing.Pack):
        if cu_seqlens.total != q.shape[1]:
            raise ValueError(f"the pack holds {cu_seqlens.total} tokens, q has {q.shape[1]}")
        bounds = cu_seqlens.bounds()
    else:
        packing.check_cu_seqlens(cu_seqlens, q.shape[1])
        bounds = [int(x) for x in cu_seqlens.tolist()]
    c = spec.compression
    outs, idxs, cmp_at = [], [], 0

    def cut(x, a, b):
        return None if x is None else x[:, a:b]

    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        kc = vc = None
        if c is not None and k_cmp is not None:
            n_c = num_compressed_blocks(b - a, c.block, c.stride, c.first_block)
            kc, vc = cut(k_cmp, cmp_at, cmp_at + n_c), cut(v_cmp, cmp_at, cmp_at + n_c)
            cmp_at += n_c
        r = nsa_reference(q[:, a:b], k[:, a:b], v[:, a:b], cut(g_cmp, a, b), cut(g_slc, a, b), cut(g_win, a, b),
                          spec, k_cmp=kc, v_cmp=vc, k_win=cut(k_win, a, b), v_win=cut(v_win, a, b),
                          block_indices=cut(block_indices, a, b), return_indices=True)
        outs.append(r[0])
        idxs.append(r[1])
    out = torch.cat(outs, 1)
    if not return_indices:
        return out
    idx = torch.cat(idxs, 1) if all(i is not None for i in idxs) else None
    return out, idx
