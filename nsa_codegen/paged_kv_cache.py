"""A paged NSA KV cache: one pool of fixed-size pages per layer, addressed through block tables, as
inference engines (vLLM, SGLang, FlashInfer) keep KV; sequences join and leave and their pages are
reused.

Storage (page_size P tokens a page, sequences numbered by slot 0 .. max_seqs-1):
  kv_k  [num_pages, P, NB, H, Dk], kv_v [num_pages, P, NB, H, Dv]: the selection branch's keys /
        values in slot 0 of NB, the window branch's in slot 1 when separate_window (as NSAKVCache)
  cmp_k_raw / cmp_v_raw [num_pages, P, H, D]: the compression branch's own raw K/V (separate_cmp),
        paged by the same block table
  k_cmp [num_cmp_pages, P, H, Dk], v_cmp [num_cmp_pages, P, H, Dv]: compressed rows, row c of a
        sequence (block first_block + c) at page cmp_block_table[slot, c // P], offset c % P
  block_table     [max_seqs, max_pages] int32: page of a slot's tokens [j * P, (j + 1) * P), -1 none
  cmp_block_table [max_seqs, max_cmp_pages] int32: the same for its compressed rows
  seqlens         [max_seqs] int32: tokens per slot (0 for a free slot)
Pages are taken from a free list when a write first reaches them and return to it when the
sequence is freed; the tables and lengths have host mirrors, so writes need no device sync.
Every pool has one page more than it hands out (index num_pages / num_cmp_pages, kept zero: what
the decode kernels read for a table entry with no page), and a page handed out again is zeroed
first, so the rows past a sequence's length are zero.

kv_dtype=torch.float8_e4m3fn stores every pool (raw and compressed K/V) in fp8 with one float32
scale per KV head and tensor (`scales`: value = stored * scale), set from the first tokens written
to that tensor (their absolute max x fp8_margin / 448) and fixed afterwards: later values beyond
fp8_margin times that max saturate at +-448 x scale. Appends take and reads return the cache dtype;
phi pools the dequantized tokens. The reference decode reads the dequantized values (the decode
kernels read float16 / bfloat16 pools only so far).

`nsa_decode(q, cache.batch(slots), g_cmp, g_slc, g_win)` is the decode step over the slots `slots`
(one batch entry each, in that order) on the GPU kernels, which read the pools through the block
tables; `nsa_decode_reference` the same by the reference.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .buffers import KERNEL_DTYPES
from .kv_cache import compressed_rows, mean_phi
from .spec import NSASpec

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)   # 448


class PagedNSAKVCache:
    """One layer's paged NSA cache (see the module docstring)."""

    def __init__(self, spec: NSASpec, num_pages: int, *, page_size: int = 64, max_seqs: int = 64,
                 max_seq_len: int = 131072, num_cmp_pages: Optional[int] = None, device=None, dtype=None,
                 separate_window: bool = False, separate_cmp: bool = False,
                 phi_k: Optional[Callable] = None, phi_v: Optional[Callable] = None,
                 kv_dtype: Optional[torch.dtype] = None, fp8_margin: float = 2.0):
        if not isinstance(spec, NSASpec):
            raise TypeError(f"spec must be an NSASpec, got {type(spec).__name__}")
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("max_seqs", max_seqs),
                            ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dtype = dtype or getattr(torch, spec.dtype)
        if dtype not in KERNEL_DTYPES and dtype != torch.float32:
            raise ValueError(f"dtype must be float16 or bfloat16 (float32: the reference only), got {dtype}")
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in (dtype, FP8):
            raise ValueError(f"kv_dtype must be the cache dtype ({dtype}) or {FP8}, got {kv_dtype}")
        if not (isinstance(fp8_margin, (int, float)) and fp8_margin >= 1):
            raise ValueError(f"fp8_margin must be a number >= 1, got {fp8_margin!r}")
        if separate_window and spec.window is None:
            raise ValueError("separate_window=True but the spec's window branch is off")
        if separate_cmp and spec.compression is None:
            raise ValueError("separate_cmp=True but the spec's compression branch is off")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        c = spec.compression
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.kv_dtype, self.fp8_margin = kv_dtype, float(fp8_margin)
        # fp8: one float32 scale per KV head and stored tensor (value = stored * scale), set from the
        # first tokens written to it (amax * fp8_margin / 448) and fixed after
        self.scales: dict[str, torch.Tensor] = {}
        self.page_size, self.max_seqs, self.max_seq_len = page_size, max_seqs, max_seq_len
        self.separate_window, self.separate_cmp = bool(separate_window), bool(separate_cmp)
        self.phi_k, self.phi_v = phi_k or mean_phi, phi_v or mean_phi
        P, H, Dk, Dv = page_size, spec.kv_heads, spec.head_dim, spec.v_head_dim
        NB = 2 if self.separate_window else 1
        z = dict(dtype=kv_dtype, device=self.device)
        # Each pool holds one page more than it hands out: its last page, kept zero, is what the decode
        # kernels read for a table entry with no page (templates/decode_attention.py).
        self.num_pages = num_pages
        self.kv_k = torch.zeros(num_pages + 1, P, NB, H, Dk, **z)
        self.device = z["device"] = self.kv_k.device   # "cuda" -> "cuda:0": what tensors on it report
        self.kv_v = torch.zeros(num_pages + 1, P, NB, H, Dv, **z)
        self.cmp_k_raw = torch.zeros(num_pages + 1, P, H, Dk, **z) if self.separate_cmp else None
        self.cmp_v_raw = torch.zeros(num_pages + 1, P, H, Dv, **z) if self.separate_cmp else None
        self.max_pages = -(-max_seq_len // P)
        self.max_cmp_pages = -(-max(compressed_rows(max_seq_len, c), 1) // P) if c is not None else 0
        if num_cmp_pages is None:   # enough for the pool's tokens, plus one partial page per sequence
            num_cmp_pages = (-(-num_pages * P // c.stride // P) + max_seqs) if c is not None else 0
        self.num_cmp_pages = num_cmp_pages
        self.k_cmp = torch.zeros(num_cmp_pages + 1, P, H, Dk, **z) if c is not None else None
        self.v_cmp = torch.zeros(num_cmp_pages + 1, P, H, Dv, **z) if c is not None else None
        self.block_table = torch.full((max_seqs, self.max_pages), -1, dtype=torch.int32, device=self.device)
        self.cmp_block_table = torch.full((max_seqs, max(self.max_cmp_pages, 1)), -1, dtype=torch.int32,
                                          device=self.device)
        self.seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=self.device)
        # host mirrors
        self._free = list(range(num_pages - 1, -1, -1))          # pop() takes the lowest page first
        self._free_cmp = list(range(num_cmp_pages - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}                    # slot -> its pages, in order
        self._cmp_pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        # pages handed out before: zeroed when handed out again, so rows past a length are zero (a
        # kernel's masked rows are multiplied by 0, and 0 * NaN left by an earlier sequence is NaN)
        self._used: set[int] = set()
        self._used_cmp: set[int] = set()

    # ---- sequences ------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def active(self) -> list[int]:
        """The slots that hold a sequence, in the order they were added."""
        return list(self._lens)

    def length(self, slot: int) -> int:
        return self._lens[self._slot(slot)]

    def add_sequence(self) -> int:
        """A new empty sequence; returns its slot (block-table row)."""
        if not self._free_slots:
            raise RuntimeError(f"all {self.max_seqs} sequence slots are in use: free one first")
        slot = self._free_slots.pop()
        self._pages[slot], self._cmp_pages[slot], self._lens[slot] = [], [], 0
        return slot

    def free_sequence(self, slot: int) -> None:
        """Drop a sequence: its pages go back to the pool, its slot to the free slots."""
        self.clear_sequence(slot)
        del self._lens[slot], self._pages[slot], self._cmp_pages[slot]
        self._free_slots.append(slot)

    def clear_sequence(self, slot: int) -> None:
        """Empty a sequence (length 0, its pages back to the pool); it keeps its slot."""
        slot = self._slot(slot)
        self._free.extend(reversed(self._pages[slot]))
        self._free_cmp.extend(reversed(self._cmp_pages[slot]))
        self._pages[slot], self._cmp_pages[slot], self._lens[slot] = [], [], 0
        self.block_table[slot] = -1
        self.cmp_block_table[slot] = -1
        self.seqlens[slot] = 0

    def _slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or slot not in self._lens:
            raise ValueError(f"slot {slot!r} holds no sequence (active: {self.active})")
        return slot

    # ---- writes ---------------------------------------------------------------------------------
    def append(self, slots: Sequence[int], k_new, v_new, k_win_new=None, v_win_new=None, seqlens_new=None, *,
               k_cmp_new=None, v_cmp_new=None) -> None:
        """Write new tokens after each listed sequence's current length and compress its completed
        blocks. k_new [b, s, H, Dk], v_new [b, s, H, Dv] for b = len(slots) sequences; seqlens_new [b]:
        how many of the s tokens are real per sequence (default s). k_win_new / v_win_new iff
        separate_window, k_cmp_new / v_cmp_new iff separate_cmp. Pages are taken as needed; when the
        pool runs out nothing is written and the error says how many pages were missing."""
        slots = [self._slot(s) for s in slots]
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        b = len(slots)
        spec = self.spec
        H, Dk, Dv = spec.kv_heads, spec.head_dim, spec.v_head_dim
        if not isinstance(k_new, torch.Tensor) or k_new.dim() != 4:
            raise ValueError("k_new must be a 4-D tensor [b, s, H, Dk]")
        s = k_new.shape[1]
        news = {"k_new": (k_new, Dk), "v_new": (v_new, Dv)}
        for flag, names in ((self.separate_window, ("k_win_new", "v_win_new")),
                            (self.separate_cmp, ("k_cmp_new", "v_cmp_new"))):
            given = {"k_win_new": k_win_new, "v_win_new": v_win_new, "k_cmp_new": k_cmp_new, "v_cmp_new": v_cmp_new}
            for n, D in zip(names, (Dk, Dv)):
                if flag and given[n] is None:
                    raise ValueError(f"this cache keeps separate K/V for {n}: pass it")
                if not flag and given[n] is not None:
                    raise ValueError(f"{n} given, but the cache was built without its separate slot")
                if flag:
                    news[n] = (given[n], D)
        for n, (t, D) in news.items():
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, s, H, D):
                raise ValueError(f"{n} must have shape {[b, s, H, D]}, got {list(getattr(t, 'shape', []))}")
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(f"{n} must be {self.dtype} on {self.device}, got {t.dtype} on {t.device}")
        n_host = [s] * b if seqlens_new is None else [int(x) for x in (
            seqlens_new.tolist() if isinstance(seqlens_new, torch.Tensor) else seqlens_new)]
        if len(n_host) != b or any(not 0 <= x <= s for x in n_host):
            raise ValueError(f"seqlens_new must be {b} ints in [0, {s}], got {n_host}")
        L0 = [self._lens[sl] for sl in slots]
        L1 = [a + n for a, n in zip(L0, n_host)]
        too_long = [sl for sl, L in zip(slots, L1) if L > self.max_seq_len]
        if too_long:
            raise ValueError(f"slot {too_long[0]} would hold more than max_seq_len = {self.max_seq_len} tokens")
        P, c = self.page_size, spec.compression
        need = sum(max(0, -(-L // P) - len(self._pages[sl])) for sl, L in zip(slots, L1))
        need_cmp = 0 if c is None else sum(
            max(0, -(-compressed_rows(L, c) // P) - len(self._cmp_pages[sl])) for sl, L in zip(slots, L1))
        if need > len(self._free) or need_cmp > len(self._free_cmp):
            raise RuntimeError(f"out of pages: this append needs {need} token pages ({len(self._free)} free) and "
                               f"{need_cmp} compressed-row pages ({len(self._free_cmp)} free); free a sequence")
        reused, reused_cmp = [], []
        for sl, L in zip(slots, L1):
            reused += self._grow(sl, -(-L // P), self._pages, self._free, self.block_table, self._used)
            if c is not None:
                reused_cmp += self._grow(sl, -(-compressed_rows(L, c) // P), self._cmp_pages, self._free_cmp,
                                         self.cmp_block_table, self._used_cmp)
        for pages, pools in ((reused, (self.kv_k, self.kv_v, self.cmp_k_raw, self.cmp_v_raw)),
                             (reused_cmp, (self.k_cmp, self.v_cmp))):
            if pages:   # one index tensor (one host-to-device copy) per page list
                idx = torch.tensor(pages, device=self.device)
                for pool in pools:
                    if pool is not None:
                        pool[idx] = 0
        # Token rows: flat index page * P + offset of each new token (device arithmetic, one slice of
        # the page list per sequence); dropped tokens go nowhere.
        ii, jj, flat = [], [], []
        for i, (sl, a, n) in enumerate(zip(slots, L0, n_host)):
            if n:
                j = torch.arange(n, device=self.device)
                ii.append(torch.full_like(j, i))
                jj.append(j)
                flat.append(self._flat(self._pages[sl], a + j))
        if flat:
            ii, jj, flat = torch.cat(ii), torch.cat(jj), torch.cat(flat)
            NB = self.kv_k.shape[2]
            self.kv_k.view(-1, NB, H, Dk)[flat, 0] = self._store("k", k_new[ii, jj])
            self.kv_v.view(-1, NB, H, Dv)[flat, 0] = self._store("v", v_new[ii, jj])
            if self.separate_window:
                self.kv_k.view(-1, NB, H, Dk)[flat, 1] = self._store("k_win", k_win_new[ii, jj])
                self.kv_v.view(-1, NB, H, Dv)[flat, 1] = self._store("v_win", v_win_new[ii, jj])
            if self.separate_cmp:
                self.cmp_k_raw.view(-1, H, Dk)[flat] = self._store("cmp_k_raw", k_cmp_new[ii, jj])
                self.cmp_v_raw.view(-1, H, Dv)[flat] = self._store("cmp_v_raw", v_cmp_new[ii, jj])
        for sl, L in zip(slots, L1):
            self._lens[sl] = L
        self.seqlens[torch.tensor(slots, device=self.device, dtype=torch.long)] = torch.tensor(
            L1, dtype=torch.int32, device=self.device)
        if c is not None:
            self._compress(slots, L0, L1)

    def _store(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [..., H, D] in the cache dtype -> what the pool stores (fp8: x / scale per head, saturated)."""
        if self.kv_dtype != FP8:
            return x
        if name not in self.scales:
            amax = x.detach().float().abs().amax(dim=tuple(i for i in range(x.dim()) if i != x.dim() - 2))
            self.scales[name] = (amax * self.fp8_margin / FP8_MAX).clamp_min(1e-12)
        q = x.float() / self.scales[name][:, None]
        return q.clamp(-FP8_MAX, FP8_MAX).to(FP8)

    def _load(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Stored rows [..., H, D] -> values in the cache dtype."""
        if self.kv_dtype != FP8:
            return x
        scale = self.scales.get(name)
        x = x.float() if scale is None else x.float() * scale[:, None]   # no scale: nothing was written
        return x.to(self.dtype)

    def _grow(self, slot, pages, owned, free, table, used) -> list[int]:
        """Give slot pages up to `pages`; returns those that were handed out before (to zero)."""
        reused = []
        while len(owned[slot]) < pages:
            p = free.pop()
            table[slot, len(owned[slot])] = p
            owned[slot].append(p)
            if p in used:
                reused.append(p)
            used.add(p)
        return reused

    def _flat(self, pages: list[int], pos: torch.Tensor) -> torch.Tensor:
        """Flat pool rows (page * P + offset) of positions pos (int64) through a sequence's pages."""
        table = torch.tensor(pages, dtype=torch.long, device=self.device)
        return table[pos // self.page_size] * self.page_size + pos % self.page_size

    def _compress(self, slots, L0, L1) -> None:
        """phi over the blocks each sequence completed (rows N(L0) .. N(L1) - 1), read through its pages."""
        c, H = self.spec.compression, self.spec.kv_heads
        tok, dst = [], []
        for sl, a, b in zip(slots, L0, L1):
            r = torch.arange(compressed_rows(a, c), compressed_rows(b, c), device=self.device)
            if r.numel():
                first = (r + c.first_block) * c.stride
                tok.append(self._flat(self._pages[sl], first[:, None] + torch.arange(c.block, device=self.device)))
                dst.append(self._flat(self._cmp_pages[sl], r))
        if not tok:
            return
        tok, dst = torch.cat(tok), torch.cat(dst)                                # [rows, l], [rows]
        NB = self.kv_k.shape[2]
        if self.separate_cmp:
            (nk, src_k), (nv, src_v) = (("cmp_k_raw", self.cmp_k_raw.view(-1, H, self.spec.head_dim)),
                                        ("cmp_v_raw", self.cmp_v_raw.view(-1, H, self.spec.v_head_dim)))
        else:
            (nk, src_k), (nv, src_v) = (("k", self.kv_k.view(-1, NB, H, self.spec.head_dim)[:, 0]),
                                        ("v", self.kv_v.view(-1, NB, H, self.spec.v_head_dim)[:, 0]))
        # phi pools the stored (for fp8: dequantized) tokens, as a reader of the cache would see them
        self.k_cmp.view(-1, H, self.spec.head_dim)[dst] = self._store(
            "k_cmp", self.phi_k(self._load(nk, src_k[tok])).to(self.dtype))
        self.v_cmp.view(-1, H, self.spec.v_head_dim)[dst] = self._store(
            "v_cmp", self.phi_v(self._load(nv, src_v[tok])).to(self.dtype))

    # ---- reads ----------------------------------------------------------------------------------
    def sequence(self, slot: int) -> dict:
        """One sequence's cache, gathered contiguous through its pages: k, v, k_win, v_win [1, L, H, D]
        and k_cmp, v_cmp [1, N(L), H, D] (None with the compression branch off)."""
        slot = self._slot(slot)
        L = self._lens[slot]
        pages = torch.tensor(self._pages[slot], dtype=torch.long, device=self.device)

        def tokens(x, name):   # [pages, P, ...] -> [1, L, ...] in the cache dtype
            return self._load(name, x[pages].flatten(0, 1)[:L].unsqueeze(0))
        win = "_win" if self.separate_window else ""
        out = {"k": tokens(self.kv_k[:, :, 0], "k"), "v": tokens(self.kv_v[:, :, 0], "v"),
               "k_win": tokens(self.kv_k[:, :, -1], "k" + win), "v_win": tokens(self.kv_v[:, :, -1], "v" + win),
               "k_cmp": None, "v_cmp": None}
        c = self.spec.compression
        if c is not None:
            n = compressed_rows(L, c)
            cp = torch.tensor(self._cmp_pages[slot], dtype=torch.long, device=self.device)
            out["k_cmp"] = self._load("k_cmp", self.k_cmp[cp].flatten(0, 1)[:n].unsqueeze(0))
            out["v_cmp"] = self._load("v_cmp", self.v_cmp[cp].flatten(0, 1)[:n].unsqueeze(0))
        return out

    def batch(self, slots: Sequence[int]) -> "PagedBatch":
        """The sequences `slots` as one decode batch (entry i = slots[i])."""
        return PagedBatch(self, [self._slot(s) for s in slots])


class PagedBatch:
    """Sequences of a PagedNSAKVCache as one batch (entry i = slots[i]), with NSAKVCache's interface
    where the layer and `nsa_decode_reference` use it: spec, dtype, device, batch_size, lengths,
    entry(i), append, reset, separate_window / separate_cmp."""

    def __init__(self, cache: PagedNSAKVCache, slots: list[int]):
        self.cache, self.slots = cache, slots
        self.spec, self.dtype, self.device = cache.spec, cache.dtype, cache.device
        self.separate_window, self.separate_cmp = cache.separate_window, cache.separate_cmp
        self.batch_size = len(slots)
        self.page_size, self.capacity = cache.page_size, cache.max_seq_len
        self.slot_index = torch.tensor(slots, dtype=torch.long, device=cache.device)
        self.decode_workspaces: dict = {}   # nsa_decode's per-q_len scratch, as NSAKVCache's

    def kernel_tables(self) -> dict:
        """What the decode kernels read for this batch (device gathers, no host sync): cache_seqlens
        [B], and the lengths with each entry's block table after them, seqlens_table [B, 1 + pages] /
        seqlens_cmp_table [B, 1 + compressed-row pages] (templates/decode_attention.py)."""
        c = self.cache
        lens = c.seqlens[self.slot_index]
        return {"cache_seqlens": lens,
                "seqlens_table": torch.cat([lens[:, None], c.block_table[self.slot_index]], 1),
                "seqlens_cmp_table": torch.cat([lens[:, None], c.cmp_block_table[self.slot_index]], 1)}

    def append(self, k_new, v_new, k_win_new=None, v_win_new=None, seqlens_new=None, *, k_cmp_new=None,
               v_cmp_new=None) -> None:
        self.cache.append(self.slots, k_new, v_new, k_win_new, v_win_new, seqlens_new, k_cmp_new=k_cmp_new,
                          v_cmp_new=v_cmp_new)

    def reset(self) -> None:
        """Empty these sequences (their pages go back to the pool; they keep their slots)."""
        for s in self.slots:
            self.cache.clear_sequence(s)

    @property
    def lengths(self) -> list[int]:
        return [self.cache.length(s) for s in self.slots]

    def entry(self, i: int) -> dict:
        return self.cache.sequence(self.slots[i])
