"""Selection block lists for tuning and benchmarks, with the structure real top-n selections have.

Every list is what `reference.select_top_n` makes of some block scores: the forced blocks (the
first `initial`, the `local` latest) plus the top-scoring visible blocks, ascending, -1 padded.
Only the scores differ:
  uniform  independent random scores per token: the union of neighbouring tokens' lists is as
           large as it can be (the worst case for kernels that share blocks across tokens);
  drift    scores that vary smoothly along the sequence (random anchors every `coherence` tokens,
           linearly interpolated): neighbouring tokens pick mostly the same blocks, as queries that
           change slowly do. `coherence` sets how slowly.
`union_size` measures the locality of any block list: the mean number of distinct blocks in the
lists of `tile` consecutive tokens (per KV head), the quantity a token-tile kernel's loads scale with.
"""
from __future__ import annotations

import torch

from .reference import num_selection_blocks, select_top_n

KINDS = ("uniform", "drift")


def _scores(kind: str, B: int, t0: int, t1: int, H: int, NS: int, coherence: int, anchors, gen, device):
    if kind == "uniform":
        return torch.rand(B, t1 - t0, H, NS, generator=gen, device=device)
    t = torch.arange(t0, t1, device=device)
    a, w = t // coherence, ((t % coherence).float() / coherence)[None, :, None, None]
    return anchors[:, a] * (1 - w) + anchors[:, a + 1] * w


def block_indices(kind: str, B: int, T: int, H: int, sel_block: int, top_n: int, initial: int = 1,
                  local: int = 2, coherence: int = 256, seed: int = 0, device="cuda") -> torch.Tensor:
    """[B, T, H, top_n] int32 block lists of the given kind (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if coherence < 1:
        raise ValueError(f"coherence must be >= 1, got {coherence}")
    gen = torch.Generator(device=device).manual_seed(seed)
    NS = num_selection_blocks(T, sel_block)
    anchors = (torch.rand(B, T // coherence + 2, H, NS, generator=gen, device=device)
               if kind == "drift" else None)
    out = torch.empty(B, T, H, top_n, dtype=torch.int32, device=device)
    step = max(1, (1 << 24) // max(1, B * H * NS))  # select_top_n sorts float64 keys: bound the chunk
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        s = _scores(kind, B, t0, t1, H, NS, coherence, anchors, gen, device)
        out[:, t0:t1] = select_top_n(s, sel_block, top_n, initial, local, t_offset=t0)
    return out


def union_size(block_indices: torch.Tensor, tile: int) -> float:
    """Mean number of distinct blocks (-1 not counted) in the lists of `tile` consecutive tokens
    (tiles aligned at multiples of `tile`), over batch, tiles and KV heads."""
    B, T, H, n = block_indices.shape
    Tt = T // tile * tile
    if Tt == 0:
        raise ValueError(f"need at least tile = {tile} tokens, got T = {T}")
    x = block_indices[:, :Tt].long().view(B, Tt // tile, tile, H, n).permute(0, 1, 3, 2, 4)
    x = x.reshape(-1, tile * n).sort(-1).values
    distinct = (x >= 0) & torch.cat([torch.ones_like(x[:, :1], dtype=torch.bool), x[:, 1:] != x[:, :-1]], 1)
    return distinct.sum(-1).double().mean().item()
