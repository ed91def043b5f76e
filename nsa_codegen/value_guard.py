"""Non-finite value rows in the forward kernels: zeroed for the kernels, their NaN put back where it belongs.

A kernel multiplies its tile's probabilities P by the tile's value rows; a value row a query must not
see has P = 0 there, but the tensor cores compute 0 * NaN = NaN, so a NaN or Inf value row would
reach the outputs of every query that shares a tile with it (later tokens' rows in the window and
compression query tiles, blocks only a neighbouring token chose in the selection token tile, a packed
neighbour's rows). The reference does not let it: a masked position contributes nothing.

So the op hands the kernels value tensors with their non-finite elements zeroed (`split_finite`),
and makes non-finite exactly the outputs that see a non-finite value row in the reference: per branch,
the (token, KV head) pairs whose visible keys include such a row (`sees_*`, from prefix sums over the
rows' flags, no host sync) get the branch's gate set to NaN (`poison_gates`), so the gate combine
gives NaN there (NaN * o, whatever o is), and the backward gives those tokens NaN gradients through
the gate as the reference does. (The reference gives +-Inf instead of NaN where an Inf value row is
seen with no NaN: both are non-finite.) Keys need none of this: the kernels replace masked logits,
so a non-finite key reaches only the rows that see it.

Shapes: bad flags [B, T, H] bool (value rows: v, v_win; [B, N, H] for compressed rows), seq_start /
cmp_start [B, T] int32 token maps of a pack or None (one sequence per batch row).
"""
from __future__ import annotations

import torch


class _SplitFinite(torch.autograd.Function):
    """(x with non-finite elements zeroed, [B, T, H] non-finite row flags). The gradient passes
    straight through: saving the isfinite mask for torch.where's backward would keep half a value
    tensor more per layer alive until the backward, and a gradient at a non-finite input means nothing."""

    @staticmethod
    def forward(ctx, x):
        fin = torch.isfinite(x)
        bad = ~fin.all(dim=-1)
        ctx.mark_non_differentiable(bad)
        return torch.where(fin, x, torch.zeros((), dtype=x.dtype, device=x.device)), bad

    @staticmethod
    def backward(ctx, grad, _):
        return grad


def split_finite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [B, T, H, D] with its non-finite elements zeroed, [B, T, H] bool: rows holding a NaN or Inf)
    from one isfinite pass; the gradient passes through unchanged (nothing saved for the backward)."""
    return _SplitFinite.apply(x)


def _prefix(bad: torch.Tensor) -> torch.Tensor:
    """[B, T, H] bool -> [B, T + 1, H] int32 counts: out[:, i] = bad rows before row i."""
    c = torch.cumsum(bad.to(torch.int32), dim=1, dtype=torch.int32)
    return torch.cat([c.new_zeros(c.shape[0], 1, c.shape[2]), c], dim=1)


def _count(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Bad rows in [lo, hi) per (b, ., h): prefix [B, R + 1, H], lo / hi [B, T, H, ...] int64 (lo <= hi)."""
    B, _, H = prefix.shape
    shape = lo.shape
    p = prefix.permute(0, 2, 1)                                     # [B, H, R + 1]
    lo_, hi_ = lo.reshape(B, shape[1], H, -1), hi.reshape(B, shape[1], H, -1)
    take = lambda i: torch.gather(p, 2, i.permute(0, 2, 1, 3).reshape(B, H, -1))  # noqa: E731
    n = take(hi_) - take(lo_)
    return n.view(B, H, shape[1], -1).permute(0, 2, 1, 3).reshape(shape)


def _positions(T: int, device, seq_start) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [1, T, 1], s0 [B, T, 1]) int64: token index and its sequence's first token."""
    t = torch.arange(T, device=device)[None, :, None]
    s0 = torch.zeros_like(t) if seq_start is None else seq_start.long()[..., None]
    return t, s0


def sees_nonfinite_window(bad: torch.Tensor, window: int, seq_start=None) -> torch.Tensor:
    """[B, T, H] bool: token t sees a bad value row among keys (t - window, t] of its sequence."""
    t, s0 = _positions(bad.shape[1], bad.device, seq_start)
    B, T, H = bad.shape
    hi = (t + 1).expand(B, T, H)
    lo = torch.maximum(t - window + 1, s0).expand(B, T, H)
    return _count(_prefix(bad), lo, hi) > 0


def sees_nonfinite_selection(bad: torch.Tensor, block_indices: torch.Tensor, block: int,
                             seq_start=None) -> torch.Tensor:
    """[B, T, H] bool: token t sees a bad value row in one of its selected blocks (block j of t: keys
    [s0 + j * block, s0 + (j + 1) * block) that are <= t; pads -1 and blocks after t see nothing)."""
    t, s0 = _positions(bad.shape[1], bad.device, seq_start)
    j = block_indices.long()                                          # [B, T, H, n]
    lo = s0[..., None] + j.clamp_min(0) * block
    hi = torch.minimum(lo + block, t[..., None] + 1)
    use = (j >= 0) & (lo <= t[..., None])
    lo = torch.where(use, lo, torch.zeros_like(lo))
    hi = torch.where(use, hi, torch.zeros_like(hi))
    return (_count(_prefix(bad), lo, hi) > 0).any(dim=-1)


def sees_nonfinite_compression(bad_cmp: torch.Tensor, T: int, block: int, stride: int, first_block: int,
                               seq_start=None, cmp_start=None) -> torch.Tensor:
    """[B, T, H] bool: token t sees a bad compressed value row (row c of t's sequence, block
    first_block + c, is visible once (first_block + c) * stride + block - 1 <= t - s0)."""
    B, N, H = bad_cmp.shape
    t, s0 = _positions(T, bad_cmp.device, seq_start)
    c0 = torch.zeros_like(t) if cmp_start is None else cmp_start.long()[..., None]
    visible = torch.div(t - s0 - block + 1, stride, rounding_mode="floor") - first_block + 1
    visible = visible.clamp_min(0)
    lo = c0.expand(B, T, H)
    hi = (c0 + visible).clamp_max(N).expand(B, T, H)
    return _count(_prefix(bad_cmp), torch.minimum(lo, hi), hi) > 0


def poison_gates(g: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """g [B, T, HQ] with NaN where the token's KV head (HQ = H * G, head-major groups) sees a bad row."""
    G = g.shape[2] // sees.shape[2]
    nan = torch.full((), float("nan"), dtype=g.dtype, device=g.device)
    return torch.where(sees.repeat_interleave(G, dim=2), nan, g)
