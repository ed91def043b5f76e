"""Packed batches: the per-token maps with which one kernel launch covers every sequence of a pack.

A pack is q [1, total, HQ, D] with cu_seqlens [S+1] (0 = cu[0] <= cu[1] <= ... <= cu[S] = total):
sequence i is tokens [cu[i], cu[i+1]). Its compressed K/V pack each sequence's rows back to back
(reference.run_packed's layout): sequence i has num_compressed_blocks(len_i) rows from cmp_cu[i].
The kernels that take a pack read, per token t:
    seq_start [1, total] int32   cu[i], the first token of t's sequence
    cmp_start [1, total] int32   cmp_cu[i], the first compressed row of t's sequence
An unpacked batch [B, T] is the same with 0 everywhere (the ops' default, launch.token_map).

Everything here is device tensor arithmetic: no host sync (torch.compile and CUDA graphs can
capture it). `check_cu_seqlens` validates the values, which needs one sync; nsa_attention and Pack
call it outside torch.compile only (`check_cu_seqlens_type` there). The one count that needs the
values, the pack's compressed rows, is replaced under torch.compile by `rows_bound` (from the token
count alone), with zero rows past the pack's own that no token sees.
"""
from __future__ import annotations

import itertools

import torch


def check_cu_seqlens_type(cu_seqlens) -> None:
    """cu_seqlens must be a 1-D int32/int64 tensor [S+1] (no sync)."""
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"cu_seqlens must be a 1-D int32 / int64 tensor [S + 1] (offsets of S sequences), got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{list(getattr(cu_seqlens, 'shape', []))}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """cu_seqlens is a 1-D int32/int64 tensor rising from 0 to total (one host sync)."""
    check_cu_seqlens_type(cu_seqlens)
    cu = cu_seqlens.long()
    ok = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
    if not bool(ok):
        raise ValueError(f"cu_seqlens must rise from 0 to total tokens {total}, got {cu_seqlens.tolist()}")


class Pack:
    """A checked pack: cu_seqlens validated once, and per compression branch its row count and the
    token maps computed once, so every layer of a model can share one (nsa_attention and the layer
    take a Pack wherever they take cu_seqlens) instead of each validating and counting again (two
    host syncs a layer). `Pack.from_lengths` builds one from host lengths with no sync at all."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int | None = None, *, lengths: list[int] | None = None):
        check_cu_seqlens_type(cu_seqlens)
        if total is None:
            total = int(cu_seqlens[-1])
        if lengths is None and not torch.compiler.is_compiling():
            check_cu_seqlens(cu_seqlens, total)   # the one host sync (not under torch.compile: no sync there)
        self.cu_seqlens, self.total, self.lengths = cu_seqlens, int(total), lengths
        self._rows: dict = {}
        self._maps: dict = {}

    @classmethod
    def from_lengths(cls, lengths, device=None) -> "Pack":
        """The pack of sequences of these (host) lengths, back to back."""
        lens = [int(x) for x in lengths]
        if not lens or any(x < 0 for x in lens):
            raise ValueError(f"lengths must be one or more ints >= 0, got {lengths}")
        cu = [0, *itertools.accumulate(lens)]
        return cls(torch.tensor(cu, dtype=torch.int32, device=device), cu[-1], lengths=lens)

    def bounds(self) -> list[int]:
        """The host offsets [0, ..., total] of the sequences: from the lengths (no device read) where
        the pack was made from them, else cu_seqlens read once (it was checked when the pack was made)."""
        if self.lengths is not None:
            return [0, *itertools.accumulate(self.lengths)]
        return [int(x) for x in self.cu_seqlens.tolist()]

    def to(self, device) -> "Pack":
        """The same pack with cu_seqlens on `device` (its counts carried over, its maps not)."""
        if self.cu_seqlens.device == torch.device(device):
            return self
        new = Pack(self.cu_seqlens.to(device), self.total, lengths=self.lengths or [])
        new.lengths, new._rows = self.lengths, dict(self._rows)
        return new

    @staticmethod
    def _key(c):
        return None if c is None else (c.block, c.stride, c.first_block)

    def rows(self, c) -> int:
        """The pack's compressed rows under compression branch c (sum over its sequences). Under
        torch.compile, for a pack made from cu_seqlens alone, a bound instead (rows_bound: no sync,
        so no graph break, and the same for every pack of this many tokens, so no recompile); the
        rows past the pack's own are zero and no token sees them."""
        key = self._key(c)
        if key not in self._rows:
            if self.lengths is None and torch.compiler.is_compiling():
                return rows_bound(self.total, c)
            if self.lengths is not None:   # host arithmetic: compressed_offsets' count, no sync
                self._rows[key] = sum(max(0, (L - c.block) // c.stride + 1 - c.first_block) if L >= c.block else 0
                                      for L in self.lengths)
            else:
                self._rows[key] = int(compressed_offsets(self.cu_seqlens, c.block, c.stride, c.first_block)[-1])
        return self._rows[key]

    def maps(self, c=None) -> dict[str, torch.Tensor]:
        """packed_maps of this pack under compression branch c (device tensors, computed once)."""
        key = self._key(c)
        if key not in self._maps:
            self._maps[key] = packed_maps(self.cu_seqlens, self.total, c)
        return self._maps[key]


def rows_bound(total: int, c) -> int:
    """An upper bound of a pack's compressed rows that needs only its token count: total // stride (a
    sequence of L >= block tokens has (L - block) // stride + 1 - first_block <= L // stride rows, as
    block >= stride; a shorter one has none)."""
    return total // c.stride


def sequence_of_token(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: the sequence each token belongs to (empty sequences own no token)."""
    t = torch.arange(total, device=cu_seqlens.device)
    # (over all of cu, minus 1: cu[0] = 0 <= t; Inductor fails to lower searchsorted over a slice)
    return torch.searchsorted(cu_seqlens.long(), t, right=True) - 1


def compressed_offsets(cu_seqlens: torch.Tensor, block: int, stride: int, first_block: int) -> torch.Tensor:
    """[S+1] int64: where each sequence's compressed rows start in the packed k_cmp (the last entry is
    the total row count). A sequence of length L has max(0, (L - block) // stride + 1 - first_block)
    rows when L >= block, else none (reference.num_compressed_blocks)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    rows = torch.where(lengths >= block, ((lengths - block) // stride + 1 - first_block).clamp_min(0),
                       torch.zeros_like(lengths))
    return torch.cat([rows.new_zeros(1), rows.cumsum(0)])


def packed_maps(cu_seqlens: torch.Tensor, total: int, compression=None) -> dict[str, torch.Tensor]:
    """{"seq_start": [1, total] int32, "cmp_start": [1, total] int32 (zeros without compression)}."""
    seq = sequence_of_token(cu_seqlens, total)
    cu = cu_seqlens.long()
    maps = {"seq_start": cu[seq].to(torch.int32)[None]}
    if compression is not None:
        cmp_cu = compressed_offsets(cu_seqlens, compression.block, compression.stride, compression.first_block)
        maps["cmp_start"] = cmp_cu[seq].to(torch.int32)[None]
    else:
        maps["cmp_start"] = torch.zeros_like(maps["seq_start"])
    return {k: v.contiguous() for k, v in maps.items()}


def compressed_row_spans(T: int, N: int, block: int, stride: int, first_block: int, seq_start=None,
                         cmp_start=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_first [N], row_end [N]) int32: compressed row c is visible to the tokens
    [row_first[c], row_end[c]): from the token that completes it to its sequence's end. From the
    token maps [1, T] of a pack (device ops, no sync); None: one sequence of T tokens per batch row
    (row c is completed by token (first_block + c) * stride + block - 1)."""
    c = torch.arange(N, device=device if seq_start is None else seq_start.device)
    if seq_start is None:
        first = (first_block + c) * stride + block - 1
        return first.to(torch.int32), torch.full_like(first, T).to(torch.int32)
    ss, cs = seq_start[0].long(), cmp_start[0].long()
    # the last token whose sequence's rows start at or before c owns row c (sequences without rows
    # share their cmp_start with the next one, and come before it)
    t = (torch.searchsorted(cs, c, right=True) - 1).clamp_min(0)
    first = ss[t] + (first_block + c - cs[t]) * stride + block - 1
    end = torch.searchsorted(ss, ss[t], right=True)          # the next sequence's first token
    return first.to(torch.int32), end.to(torch.int32)


def tile_starts(T: int, tile: int, cu_seqlens=None, device=None) -> torch.Tensor:
    """[P] int32: the first token of each tile of `tile` tokens that stays inside one sequence
    (a tile at every multiple of `tile` tokens into each sequence; for a batch, every `tile` tokens),
    -1 in the unused slots. P = ceil(T / tile) + S bounds the count with no host sync."""
    if cu_seqlens is None:
        return torch.arange(0, T, tile, dtype=torch.int32, device=device)
    cu = cu_seqlens.long()
    S = cu.numel() - 1
    n = (cu[1:] - cu[:-1] + tile - 1) // tile        # tiles of each sequence
    end = n.cumsum(0)
    p = torch.arange(-(-T // tile) + S, device=cu.device)
    i = torch.searchsorted(end, p, right=True)        # the sequence of slot p (S: unused)
    ic = i.clamp_max(S - 1)
    start = cu[ic] + (p - (end[ic] - n[ic])) * tile
    return torch.where(i < S, start, -1).to(torch.int32)


def gather_blocks(x: torch.Tensor, cu_seqlens: torch.Tensor, block: int, stride: int, first_block: int,
                  rows: int) -> torch.Tensor:
    """Each packed sequence's compressed blocks: x [1, total, H, D] -> [1, rows, H, l, D], sequence
    i's rows from compressed_offsets(...)[i]; row r of sequence i holds its tokens
    [(f + c) * d, (f + c) * d + l), c = r - offset_i (rows: the total, from the caller, or more, as
    rows_bound: the rows past the pack's own are zero). No host sync given rows."""
    cmp_cu = compressed_offsets(cu_seqlens, block, stride, first_block)
    r = torch.arange(rows, device=x.device)
    seq = (torch.searchsorted(cmp_cu, r, right=True) - 1).clamp_max(cmp_cu.numel() - 2)   # (as sequence_of_token)
    first_token = cu_seqlens.long()[seq] + (first_block + r - cmp_cu[seq]) * stride       # [rows]
    idx = first_token[:, None] + torch.arange(block, device=x.device)[None]                # [rows, l]
    idx = idx.clamp(0, max(x.shape[1] - 1, 0))   # rows past the pack's own read a real token ...
    blocks = x[0].index_select(0, idx.reshape(-1)).reshape(rows, block, *x.shape[2:])     # [rows, l, H, D]
    own = (r < cmp_cu[-1]).view(rows, *([1] * (blocks.dim() - 1)))
    blocks = torch.where(own, blocks, torch.zeros((), dtype=blocks.dtype, device=blocks.device))  # ... zeroed
    return blocks.transpose(1, 2)[None]


def compress_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, block: int, stride: int, first_block: int,
                    rows: int) -> torch.Tensor:
    """Mean pooling of each packed sequence's blocks: x [1, total, H, D] -> [1, rows, H, D] (the layout
    of gather_blocks)."""
    return gather_blocks(x, cu_seqlens, block, stride, first_block, rows).mean(-2)
