"""KV cache for NSA decode, and the reference decode step over it.

`NSAKVCache` holds one layer's cache, preallocated for `capacity` tokens per batch entry:
  k, v           [B, cap, H, Dk / Dv]  selection-branch keys/values (views into kv_k / kv_v)
  k_win, v_win   [B, cap, H, Dk / Dv]  window-branch keys/values (the same views unless
                                       separate_window=True)
  k_cmp, v_cmp   [B, cap_cmp, H, D]    compressed rows; row c = block first_block + c
  cache_seqlens  [B] int32             per-entry lengths (entries may differ)
Physically keys live in kv_k [B, cap_phys, NB, H, Dk] (NB = 2 with a separate window slot), so
one kernel argument serves both branches; cap_phys adds padding rows (tile over-reads and
dropped writes land there).  Buffers are zero-filled once: rows past a length are never used
but must stay finite.  A host mirror of the lengths makes capacity checks and launch sizing
free of device syncs (pass seqlens_new as a CPU tensor / list to keep it that way).

phi: a callable [..., cmp_block, H, D] -> [..., H, D] (default: mean, = reference.compress).
`compressor_phi(module)` adapts nsa_codegen.layer.MeanCompressor / MLPCompressor.  phi runs on
the K/V given as k_cmp_new / v_cmp_new (the compression branch's own raw K/V, when the cache was
built with separate_cmp=True) or else on the selection K/V, and only on newly completed blocks.

`nsa_codegen.decode.nsa_decode(q, cache, g_cmp, g_slc, g_win, spec)` runs one decode step on the
GPU kernels; `nsa_decode_reference` here computes the same by the reference (the CPU path).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import reference
from .buffers import KERNEL_DTYPES as _DTYPES
from .spec import NSASpec

_ROW_PAD = 128           # tile over-read / dropped-write padding rows (>= any tile)
_GATHER_BUDGET = 1 << 26  # elements per phi call when compressing many blocks at once


def mean_phi(blocks: torch.Tensor) -> torch.Tensor:
    """[..., l, H, D] -> [..., H, D]: the mean pool of reference.compress."""
    return blocks.mean(dim=-3)


def compressor_phi(module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Adapt a layer.MeanCompressor / MLPCompressor (x [B, T, H, D] -> [B, N, H, D]) to a block phi.

    Each block is fed as its own length-l sequence with first_block forced to 0, which yields
    exactly that block's compressed row.
    """
    def phi(blocks: torch.Tensor) -> torch.Tensor:
        lead = blocks.shape[:-3]
        l, H, D = blocks.shape[-3:]
        x = blocks.reshape(-1, l, H, D)
        saved = module.first_block
        module.first_block = 0
        try:
            out = module(x)  # [X, 1, H, D]
        finally:
            module.first_block = saved
        return out.reshape(*lead, H, D)
    return phi


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def compressed_rows(L: int, c) -> int:
    return reference.num_compressed_blocks(L, c.block, c.stride, c.first_block)


def _num_cmp_dev(L: torch.Tensor, c) -> torch.Tensor:
    n = torch.div(L - c.block, c.stride, rounding_mode="floor") + 1 - c.first_block
    return torch.where(L >= c.block, n.clamp_min(0), torch.zeros_like(n))


class NSAKVCache:
    """One layer's NSA decode cache (see module docstring)."""

    def __init__(self, spec: NSASpec, batch_size: int, capacity: int, *, device=None, dtype=None,
                 separate_window: bool = False, separate_cmp: bool = False,
                 phi_k: Optional[Callable] = None, phi_v: Optional[Callable] = None):
        if not isinstance(spec, NSASpec):
            raise TypeError(f"spec must be an NSASpec, got {type(spec).__name__}")
        for name, value in (("batch_size", batch_size), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        dtype = dtype or getattr(torch, spec.dtype)
        if dtype not in _DTYPES and dtype != torch.float32:
            raise ValueError(f"dtype must be float16 or bfloat16 (float32: nsa_decode_reference only), got {dtype}")
        if device is None and not torch.cuda.is_available():
            device = "cpu"   # the reference decode runs there
        if separate_window and spec.window is None:
            raise ValueError("separate_window=True but the spec's window branch is off")
        if separate_cmp and spec.compression is None:
            raise ValueError("separate_cmp=True but the spec's compression branch is off")
        self.spec = spec
        self.batch_size = B = int(batch_size)
        self.capacity = int(capacity)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        self.separate_window = bool(separate_window)
        self.separate_cmp = bool(separate_cmp)
        self.phi_k = phi_k or mean_phi
        self.phi_v = phi_v or mean_phi
        H, Dk, Dv = spec.kv_heads, spec.head_dim, spec.v_head_dim
        self.cap_phys = _round_up(self.capacity, 128) + _ROW_PAD
        NB = 2 if self.separate_window else 1
        z = dict(dtype=dtype, device=self.device)
        self.kv_k = torch.zeros(B, self.cap_phys, NB, H, Dk, **z)
        self.kv_v = torch.zeros(B, self.cap_phys, NB, H, Dv, **z)
        self.k_cmp_raw = self.v_cmp_raw = None
        if self.separate_cmp:
            self.k_cmp_raw = torch.zeros(B, self.cap_phys, H, Dk, **z)
            self.v_cmp_raw = torch.zeros(B, self.cap_phys, H, Dv, **z)
        c = spec.compression
        self.cap_cmp = compressed_rows(self.capacity, c) if c is not None else 0
        self.cap_cmp_phys = _round_up(max(self.cap_cmp, 1), 128) + _ROW_PAD
        if c is not None:
            self.k_cmp = torch.zeros(B, self.cap_cmp_phys, H, Dk, **z)
            self.v_cmp = torch.zeros(B, self.cap_cmp_phys, H, Dv, **z)
        else:
            self.k_cmp = self.v_cmp = None
        self.device = self.kv_k.device   # "cuda" -> "cuda:0": what tensors on it report
        self.cache_seqlens = torch.zeros(B, dtype=torch.int32, device=self.device)
        self._lens = [0] * B          # host mirror of cache_seqlens
        # decode workspace (nsa_codegen.decode): q_len -> (Scores f16, ScoreMax f32), see decode_attention
        self.decode_workspaces = {}

    # ---- views --------------------------------------------------------------------------------
    @property
    def k(self) -> torch.Tensor:
        return self.kv_k[:, :, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv_v[:, :, 0]

    @property
    def k_win(self) -> torch.Tensor:
        return self.kv_k[:, :, -1]

    @property
    def v_win(self) -> torch.Tensor:
        return self.kv_v[:, :, -1]

    @property
    def lengths(self) -> list[int]:
        """Host copy of cache_seqlens."""
        return list(self._lens)

    def entry(self, b: int) -> dict:
        """Batch entry b's cache (views): k, v, k_win, v_win [1, L, H, D], k_cmp, v_cmp [1, N(L), H, D]
        (None with the compression branch off)."""
        L, n = self._lens[b], self.num_cmp_host[b]
        return {"k": self.k[b:b + 1, :L], "v": self.v[b:b + 1, :L], "k_win": self.k_win[b:b + 1, :L],
                "v_win": self.v_win[b:b + 1, :L],
                "k_cmp": None if self.k_cmp is None else self.k_cmp[b:b + 1, :n],
                "v_cmp": None if self.v_cmp is None else self.v_cmp[b:b + 1, :n]}

    @property
    def num_cmp(self) -> torch.Tensor:
        """[B] int32: complete compressed rows per batch entry."""
        c = self.spec.compression
        if c is None:
            return torch.zeros_like(self.cache_seqlens)
        return _num_cmp_dev(self.cache_seqlens.long(), c).to(torch.int32)

    @property
    def num_cmp_host(self) -> list[int]:
        c = self.spec.compression
        return [compressed_rows(L, c) if c is not None else 0 for L in self._lens]

    # ---- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty every entry (contents stay; they are past the lengths)."""
        self.cache_seqlens.zero_()
        self._lens = [0] * self.batch_size

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Declare lengths without writing (benchmarks / tests: the contents are taken as they are)."""
        lens = [int(x) for x in lengths]
        if len(lens) != self.batch_size or any(not 0 <= x <= self.capacity for x in lens):
            raise ValueError(f"lengths must be {self.batch_size} ints in [0, {self.capacity}], got {lens}")
        self._lens = lens
        self.cache_seqlens.copy_(torch.tensor(lens, dtype=torch.int32))

    def narrow_batch(self, n: int) -> "NSAKVCache":
        """A cache over the first n batch entries sharing this one's storage."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"n must be in [1, {self.batch_size}], got {n}")
        new = object.__new__(NSAKVCache)
        new.__dict__.update(self.__dict__)
        new.batch_size = n
        for name in ("kv_k", "kv_v", "k_cmp_raw", "v_cmp_raw", "k_cmp", "v_cmp", "cache_seqlens"):
            t = getattr(self, name)
            setattr(new, name, None if t is None else t[:n])
        new._lens = self._lens[:n]
        new.decode_workspaces = {}
        return new

    # ---- writes ---------------------------------------------------------------------------------
    def _check_new(self, name, t, s, D, B):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        want = (B, s, self.spec.kv_heads, D)
        if t.dim() != 4 or tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)}, got {list(t.shape)}")
        if t.dtype != self.dtype:
            raise ValueError(f"{name} must be {self.dtype} (the cache dtype), got {t.dtype}")
        if t.device != self.kv_k.device:
            raise ValueError(f"{name} is on {t.device}, the cache on {self.kv_k.device}")

    def prefill(self, k, v, k_win=None, v_win=None, seqlens=None, *, k_cmp=None, v_cmp=None) -> None:
        """Reset and write k/v [B, T, H, D] (seqlens [B]: valid tokens per entry, default T)."""
        self.reset()
        self.append(k, v, k_win, v_win, seqlens, k_cmp_new=k_cmp, v_cmp_new=v_cmp)

    def append(self, k_new, v_new, k_win_new=None, v_win_new=None, seqlens_new=None, *,
               k_cmp_new=None, v_cmp_new=None) -> None:
        """Write new tokens in place after each entry's current length and compress completed blocks.

        k_new [B, s, H, Dk], v_new [B, s, H, Dv]; seqlens_new [B] (default s): how many of the s
        tokens are real for each entry (the rest are dropped).  k_win_new / v_win_new are required
        iff the cache has a separate window slot; k_cmp_new / v_cmp_new iff separate_cmp.
        """
        spec, B = self.spec, self.batch_size
        Dk, Dv = spec.head_dim, spec.v_head_dim
        if not isinstance(k_new, torch.Tensor) or k_new.dim() != 4:
            raise ValueError(f"k_new must be a 4-D tensor [B, s, H, Dk], got "
                             f"{list(k_new.shape) if isinstance(k_new, torch.Tensor) else type(k_new).__name__}")
        s = k_new.shape[1]
        self._check_new("k_new", k_new, s, Dk, B)
        self._check_new("v_new", v_new, s, Dv, B)
        if self.separate_window:
            if k_win_new is None or v_win_new is None:
                raise ValueError("this cache keeps separate window K/V: pass k_win_new and v_win_new")
            self._check_new("k_win_new", k_win_new, s, Dk, B)
            self._check_new("v_win_new", v_win_new, s, Dv, B)
        elif k_win_new is not None or v_win_new is not None:
            raise ValueError("k_win_new / v_win_new given, but the cache was built with separate_window=False")
        if self.separate_cmp:
            if k_cmp_new is None or v_cmp_new is None:
                raise ValueError("this cache keeps separate compression K/V: pass k_cmp_new and v_cmp_new")
            self._check_new("k_cmp_new", k_cmp_new, s, Dk, B)
            self._check_new("v_cmp_new", v_cmp_new, s, Dv, B)
        elif k_cmp_new is not None or v_cmp_new is not None:
            raise ValueError("k_cmp_new / v_cmp_new given, but the cache was built with separate_cmp=False")
        if seqlens_new is None:
            n_host = [s] * B
        else:
            n_host = [int(x) for x in (seqlens_new.tolist() if isinstance(seqlens_new, torch.Tensor)
                                       else seqlens_new)]
            if len(n_host) != B or any(not 0 <= x <= s for x in n_host):
                raise ValueError(f"seqlens_new must be {B} ints in [0, {s}], got {n_host}")
        over = [b for b in range(B) if self._lens[b] + n_host[b] > self.capacity]
        if over:
            b = over[0]
            raise ValueError(f"capacity overflow: entry {b} has {self._lens[b]} tokens + {n_host[b]} new > "
                             f"capacity {self.capacity}")
        if s == 0 or max(n_host) == 0:
            return
        dev = self.kv_k.device
        L0_host = list(self._lens)
        L0 = self.cache_seqlens.long()
        j = torch.arange(s, device=dev)
        pos = L0[:, None] + j[None, :]                                    # [B, s]
        if seqlens_new is not None:
            n_dev = torch.tensor(n_host, dtype=torch.long).to(dev, non_blocking=True)
            pos = torch.where(j[None, :] < n_dev[:, None], pos, torch.full_like(pos, self.cap_phys - 1))
        else:
            n_dev = None
        bi = torch.arange(B, device=dev)[:, None].expand(B, s)
        self.kv_k[bi, pos, 0] = k_new
        self.kv_v[bi, pos, 0] = v_new
        if self.separate_window:
            self.kv_k[bi, pos, 1] = k_win_new
            self.kv_v[bi, pos, 1] = v_win_new
        if self.separate_cmp:
            self.k_cmp_raw[bi, pos] = k_cmp_new
            self.v_cmp_raw[bi, pos] = v_cmp_new
        if n_dev is None:
            self.cache_seqlens += s
        else:
            self.cache_seqlens += n_dev.to(torch.int32)
        self._lens = [a + n for a, n in zip(L0_host, n_host)]
        if spec.compression is not None:
            self._compress(L0, L0_host)

    def _compress(self, L0: torch.Tensor, L0_host: list[int]) -> None:
        """phi over the blocks completed between lengths L0 and the current ones (rows N(L0)..N(L1)-1)."""
        c = self.spec.compression
        N0h = [compressed_rows(L, c) for L in L0_host]
        N1h = [compressed_rows(L, c) for L in self._lens]
        K = max(b - a for a, b in zip(N0h, N1h))
        if K <= 0:
            return
        B, H = self.batch_size, self.spec.kv_heads
        src_k = self.k_cmp_raw if self.separate_cmp else self.kv_k[:, :, 0]
        src_v = self.v_cmp_raw if self.separate_cmp else self.kv_v[:, :, 0]
        D = max(src_k.shape[-1], src_v.shape[-1])
        step = max(1, _GATHER_BUDGET // (B * c.block * H * D))
        uniform = len(set(N0h)) == 1 and len(set(N1h)) == 1
        dev = self.kv_k.device
        if not uniform:
            N0 = _num_cmp_dev(L0, c)
            N1 = _num_cmp_dev(self.cache_seqlens.long(), c)
        for k0 in range(0, K, step):
            kn = min(step, K - k0)
            if uniform:
                row0 = N0h[0] + k0
                kb = self._blocks_uniform(src_k, row0, kn)
                vb = self._blocks_uniform(src_v, row0, kn)
                self.k_cmp[:, row0:row0 + kn] = self.phi_k(kb).to(self.dtype)
                self.v_cmp[:, row0:row0 + kn] = self.phi_v(vb).to(self.dtype)
            else:
                rows = N0[:, None] + k0 + torch.arange(kn, device=dev)[None, :]          # [B, kn]
                valid = rows < N1[:, None]
                tok = (rows + c.first_block) * c.stride
                tok = tok[:, :, None] + torch.arange(c.block, device=dev)                # [B, kn, l]
                tok = tok.clamp(0, self.cap_phys - 1)
                bi = torch.arange(B, device=dev)[:, None, None]
                kb, vb = src_k[bi, tok], src_v[bi, tok]                                  # [B, kn, l, H, D]
                dst = torch.where(valid, rows, torch.full_like(rows, self.cap_cmp_phys - 1))
                bj = torch.arange(B, device=dev)[:, None].expand_as(dst)
                self.k_cmp[bj, dst] = self.phi_k(kb).to(self.dtype)
                self.v_cmp[bj, dst] = self.phi_v(vb).to(self.dtype)

    def _blocks_uniform(self, src: torch.Tensor, row0: int, kn: int) -> torch.Tensor:
        """[B, kn, l, H, D] strided view of blocks row0 .. row0+kn-1 of src [B, cap, H, D] (no copy)."""
        c = self.spec.compression
        sB, sT, sH, sD = src.stride()
        B, _, H, D = src.shape
        return src.as_strided((B, kn, c.block, H, D), (sB, c.stride * sT, sT, sH, sD),
                              src.storage_offset() + (row0 + c.first_block) * c.stride * sT)


# ------------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------------
def check_step(q, cache, spec: Optional[NSASpec], gates, max_q_len: Optional[int] = None):
    """Validate one decode step's q [B, ql, HQ, Dk] and gates [B, ql, HQ] against the cache (every
    entry holding >= ql tokens); returns (spec, gates in q's dtype)."""
    spec = spec or cache.spec
    if spec != cache.spec:
        raise ValueError("spec differs from the cache's spec")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("q must be a 4-D tensor [B, q_len, HQ, Dk]")
    B, ql, HQ, Dk = q.shape
    if B != cache.batch_size:
        raise ValueError(f"q batch {B} != cache batch {cache.batch_size}")
    if ql < 1 or (max_q_len is not None and ql > max_q_len):
        raise ValueError(f"q_len must be in 1..{max_q_len or 'cached length'}, got {ql}")
    if HQ != spec.heads or Dk != spec.head_dim:
        raise ValueError(f"q must be [B, ql, {spec.heads}, {spec.head_dim}], got {list(q.shape)}")
    if q.dtype != cache.dtype or q.device != cache.device:
        raise ValueError(f"q must be {cache.dtype} on {cache.device}, got {q.dtype} on {q.device}")
    out = []
    for name, g in zip(("g_cmp", "g_slc", "g_win"), gates):
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, ql, HQ) or not g.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor of shape [{B}, {ql}, {HQ}]")
        out.append(g.to(q.dtype))
    short = [b for b, L in enumerate(cache.lengths) if L < ql]
    if short:
        raise ValueError(f"entry {short[0]} has {cache.lengths[short[0]]} cached tokens < q_len {ql}: append first")
    return spec, out


def nsa_decode_reference(q: torch.Tensor, cache, g_cmp: torch.Tensor, g_slc: torch.Tensor,
                         g_win: torch.Tensor, spec: Optional[NSASpec] = None, *,
                         block_indices: Optional[torch.Tensor] = None, return_selection: bool = False):
    """What `nsa_decode` computes, by the reference: each entry's last q_len positions of
    reference.nsa_reference over its cached sequence (cached compressed rows included). The CPU path
    and the oracle, not a fast path. q [B, ql, HQ, Dk] -> o [B, ql, HQ, Dv]. cache: an NSAKVCache or
    a PagedNSAKVCache's batch (`cache.batch(slots)`).

    block_indices [B, ql, H, n]: attend over these blocks (a kernel's choice) instead of the
    reference's own top-n. return_selection: also return, per entry, the reference's own top-n
    [ql, H, n] and the ranking keys [ql, H, NS] it sorted (for reference.compare_block_indices)."""
    spec, (g_cmp, g_slc, g_win) = check_step(q, cache, spec, (g_cmp, g_slc, g_win))
    B, ql, HQ, Dk = q.shape
    outs, sels = [], []
    for b, L in enumerate(cache.lengths):
        e = cache.entry(b)
        args = (q[b:b + 1], e["k"], e["v"], g_cmp[b:b + 1], g_slc[b:b + 1], g_win[b:b + 1], spec)
        kw = dict(t_offset=L - ql, k_cmp=e["k_cmp"], v_cmp=e["v_cmp"], k_win=e["k_win"], v_win=e["v_win"])
        if block_indices is None or return_selection:
            o, idx = reference.nsa_reference_queries(*args, return_indices=True, **kw)
        if block_indices is not None:
            o = reference.nsa_reference_queries(*args, block_indices=block_indices[b:b + 1], **kw)
        outs.append(o)
        if return_selection:
            sels.append((idx[0], reference.block_keys(q[b:b + 1], e["k_cmp"], e["v_cmp"], spec, L, L - ql)[0]))
    o = torch.cat(outs, 0)
    return (o, sels) if return_selection else o
