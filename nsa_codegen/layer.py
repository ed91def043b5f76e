"""`NativeSparseAttention`: the nn.Module users put in their model.

Per the paper, each branch has its own keys and values: the compression branch pools its own
K/V with phi (mean, or a learnable MLP with an intra-block position encoding, separate for K and
V), the selection and window branches project their own. A gate MLP + sigmoid mixes the three
branch outputs per (token, query head). On CUDA the forward runs the compiled kernels
(`nsa_codegen.ops.nsa_attention`); elsewhere it runs `nsa_codegen.reference.nsa_reference`.
Positional encoding (e.g. RoPE) is the caller's: apply it to x or to q/k before this layer.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import context_parallel, packing, reference
from .spec import NSASpec, check_kernel_support, kernel_support


class MeanCompressor(nn.Module):
    """phi = mean over each compressed block. x [B, T, H, D] -> [B, N, H, D]."""

    def __init__(self, block: int, stride: int, first_block: int = 0):
        super().__init__()
        self.block, self.stride, self.first_block = block, stride, first_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.compress(x, self.block, self.stride, self.first_block)

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, rows: int) -> torch.Tensor:
        """x [1, total, H, D] packed by cu_seqlens -> [1, rows, H, D], each sequence's rows in turn."""
        return packing.compress_packed(x, cu_seqlens, self.block, self.stride, self.first_block, rows)


class MLPCompressor(nn.Module):
    """phi = MLP over the l keys of a block plus a learnable intra-block position encoding.

    x [B, T, H, D] -> [B, N, H, D]; weights are shared across heads. Initialised so that phi starts
    close to the mean pool (a stable starting point for training).
    """

    def __init__(self, dim: int, block: int, stride: int, first_block: int = 0, hidden: int | None = None):
        super().__init__()
        self.block, self.stride, self.first_block = block, stride, first_block
        hidden = hidden or dim
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.fc1 = nn.Linear(block * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, D = x.shape
        N = reference.num_compressed_blocks(T, self.block, self.stride, self.first_block)
        if N == 0:
            return x.new_zeros(B, 0, H, D)
        blocks = x.unfold(1, self.block, self.stride)[:, self.first_block:self.first_block + N]  # [B,N,H,D,l]
        return self._pool(blocks.transpose(-1, -2))

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, rows: int) -> torch.Tensor:
        """x [1, total, H, D] packed by cu_seqlens -> [1, rows, H, D], each sequence's rows in turn."""
        return self._pool(packing.gather_blocks(x, cu_seqlens, self.block, self.stride, self.first_block, rows))

    def _pool(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [..., N, H, l, D] -> [..., N, H, D]."""
        blocks = blocks + self.pos.to(blocks.dtype)
        h = torch.nn.functional.gelu(self.fc1(blocks.flatten(-2)))
        return self.fc2(h) + blocks.mean(dim=-2)


class NativeSparseAttention(nn.Module):
    """x [B, T, hidden] -> [B, T, hidden] NSA attention (causal). cu_seqlens packs sequences (B == 1).

    backend: "auto" (the compiled kernels on CUDA, the reference elsewhere), "kernels" or "reference".
    deterministic: insist on bit-identical gradients run to run. Every nsa-codegen backward kernel is
    deterministic (no atomics; selection's dk/dv sums its per-unit partials in a fixed order), so the
    kernel path always is; the reference on CUDA is not (its gather backward scatter-adds with atomics),
    so with deterministic=True the layer refuses to train through it.
    cp_group: a torch.distributed group the sequence is split across (context parallelism,
    `nsa_codegen.context_parallel`): x is then this rank's shard [B, T / cp, hidden] in layout
    cp_layout ("zigzag" or "contiguous") and so is the output. Parameter gradients are this rank's
    part: sum them over the group (as data parallelism does) for the whole sequence's gradient.
    """

    def __init__(self, hidden_size: int, spec: NSASpec, bias: bool = False, backend: str = "auto",
                 deterministic: bool = False, cp_group=None, cp_layout: str = "zigzag"):
        super().__init__()
        if not isinstance(spec, NSASpec):
            raise TypeError(f"spec must be an NSASpec, got {type(spec).__name__}")
        if backend not in ("auto", "kernels", "reference"):
            raise ValueError(f"backend must be 'auto', 'kernels' or 'reference', got {backend!r}")
        if cp_group is not None:
            if backend == "kernels":
                raise NotImplementedError("backend='kernels' with cp_group: the kernels take no query offset "
                                          "yet, so context parallelism runs the reference (backend 'auto' or "
                                          "'reference')")
            if cp_layout not in context_parallel.LAYOUTS:
                raise ValueError(f"cp_layout must be one of {context_parallel.LAYOUTS}, got {cp_layout!r}")
        self.spec, self.backend, self.deterministic = spec, backend, deterministic
        self.cp_group, self.cp_layout = cp_group, cp_layout
        HQ, H, Dk, Dv = spec.heads, spec.kv_heads, spec.head_dim, spec.v_head_dim
        self.q_proj = nn.Linear(hidden_size, HQ * Dk, bias=bias)
        # Each branch owns its keys and values (paper Sec. 3.3): one fused projection per branch.
        self.branches = [name for name, on in (("cmp", spec.compression), ("slc", spec.selection),
                                               ("win", spec.window)) if on is not None]
        self.kv_proj = nn.ModuleDict({b: nn.Linear(hidden_size, H * (Dk + Dv), bias=bias) for b in self.branches})
        c = spec.compression
        if c is not None:
            if c.pool == "mlp":
                self.k_phi = MLPCompressor(Dk, c.block, c.stride, c.first_block)
                self.v_phi = MLPCompressor(Dv, c.block, c.stride, c.first_block)
            else:
                self.k_phi = MeanCompressor(c.block, c.stride, c.first_block)
                self.v_phi = MeanCompressor(c.block, c.stride, c.first_block)
        self.gate = nn.Linear(hidden_size, 3 * HQ, bias=True)
        self.o_proj = nn.Linear(HQ * Dv, hidden_size, bias=bias)

    def _kv(self, x, branch):
        B, T, _ = x.shape
        H, Dk, Dv = self.spec.kv_heads, self.spec.head_dim, self.spec.v_head_dim
        kv = self.kv_proj[branch](x).view(B, T, H, Dk + Dv)
        return kv[..., :Dk], kv[..., Dk:]

    def _project(self, x):
        """x [B, T, hidden] -> q [B, T, HQ, Dk], gates (g_cmp, g_slc, g_win) [B, T, HQ], {branch: (k, v)}."""
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"x must be [B, T, hidden] with hidden = {self.q_proj.in_features}, "
                             f"got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        spec = self.spec
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, spec.heads, spec.head_dim)
        g = torch.sigmoid(self.gate(x)).view(B, T, 3, spec.heads)
        return q, (g[:, :, 0], g[:, :, 1], g[:, :, 2]), {b: self._kv(x, b) for b in self.branches}

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """cu_seqlens: a tensor, or a `packing.Pack` shared by every layer of the model (checked and
        counted once, instead of once a layer)."""
        if cu_seqlens is not None and not isinstance(cu_seqlens, packing.Pack) and self.cp_group is None:
            cu_seqlens = packing.Pack(cu_seqlens, x.shape[1])
        return self._attend(*self._project(x), cu_seqlens)

    @torch.no_grad()
    def block_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, H, top_n] int32: the selection blocks each token reads per KV head
        (ascending, -1 padded), ranked from this layer's own compression scores by the reference top-n
        (the kernels' top-n agrees up to near ties). For inspecting what a trained layer selects;
        needs the compression and selection branches, one unpacked batch, no cp_group."""
        if self.spec.compression is None or self.spec.selection is None:
            raise ValueError("block_indices needs the compression and selection branches (the top-n ranks "
                             "compression scores)")
        if self.cp_group is not None:
            raise NotImplementedError("block_indices with cp_group: run it on a layer without cp_group")
        q, _, kv = self._project(x)
        k_cmp, v_cmp = self._compress(*kv["cmp"], None)
        T = q.shape[1]
        return reference.compression_and_selection(q.float(), k_cmp.float(), v_cmp.float(), self.spec, T,
                                                   need_indices=True)[2]

    def _attend(self, q, gates, kv, cu_seqlens=None):
        spec = self.spec
        B, T = q.shape[:2]
        g_cmp, g_slc, g_win = gates
        k, v = _main_kv(kv)
        k_cmp = v_cmp = k_win = v_win = None
        if self.cp_group is not None:
            return self.o_proj(self._attend_cp(q, gates, kv, cu_seqlens).reshape(B, T, spec.heads * spec.v_head_dim))
        if "cmp" in kv:
            k_cmp, v_cmp = self._compress(*kv["cmp"], cu_seqlens)
        if "win" in kv:
            k_win, v_win = kv["win"]
        attn = _attention_fn(q, self.backend, spec)
        if self.deterministic and attn is reference.nsa_reference and q.is_cuda and torch.is_grad_enabled():
            raise RuntimeError("deterministic=True: the reference backend's backward on CUDA is not deterministic "
                               "(atomic scatter-add); use backend='kernels'")
        o = attn(q, k, v, g_cmp, g_slc, g_win, spec, k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win, v_win=v_win,
                 cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, spec.heads * spec.v_head_dim))

    def _attend_cp(self, q, gates, kv, cu_seqlens):
        """This rank's shard of the attention output, the sequence split across self.cp_group: each
        rank pools the compressed rows that end in its chunks with this layer's phi, from the
        compression branch's own K/V and an l - 1 token halo, and the rows are gathered."""
        from .kv_cache import compressor_phi
        if cu_seqlens is not None:
            raise NotImplementedError("cu_seqlens with cp_group: packed batches are not split across ranks yet")
        if self.deterministic and q.is_cuda and torch.is_grad_enabled():
            raise RuntimeError("deterministic=True: context parallelism runs the reference, whose backward on "
                               "CUDA is not deterministic (atomic scatter-add)")
        k, v = _main_kv(kv)
        extra = {}
        if "cmp" in kv:
            extra.update(cmp_kv=kv["cmp"], phi=(compressor_phi(self.k_phi), compressor_phi(self.v_phi)))
        if "win" in kv:
            extra.update(k_win=kv["win"][0], v_win=kv["win"][1])
        return context_parallel.nsa_context_parallel(q, k, v, *gates, self.spec, group=self.cp_group,
                                                     layout=self.cp_layout, **extra)

    # ---- inference: prefill, then one step at a time against an NSAKVCache -----------------------
    def new_cache(self, batch_size: int, capacity: int, device=None, dtype=None):
        """An `NSAKVCache` for this layer: the selection and window branches' own K/V, and the
        compression branch's raw K/V pooled by this layer's phi (k_phi / v_phi) block by block."""
        from .kv_cache import NSAKVCache, compressor_phi
        on_cmp = "cmp" in self.branches
        return NSAKVCache(self.spec, batch_size, capacity, device=device or self.q_proj.weight.device,
                          dtype=dtype or getattr(torch, self.spec.dtype),
                          separate_window="win" in self.branches and "slc" in self.branches,
                          separate_cmp=on_cmp, phi_k=compressor_phi(self.k_phi) if on_cmp else None,
                          phi_v=compressor_phi(self.v_phi) if on_cmp else None)

    def new_paged_cache(self, num_pages: int, page_size: int = 64, max_seqs: int = 64, max_seq_len: int = 131072,
                        device=None, dtype=None, kv_dtype=None):
        """A `PagedNSAKVCache` for this layer (the same branch K/V and phi as new_cache; kv_dtype
        torch.float8_e4m3fn stores fp8 pages); pass `cache.batch(slots)` to prefill / decode. Decode
        over pages runs the reference so far."""
        from .kv_cache import compressor_phi
        from .paged_kv_cache import PagedNSAKVCache
        on_cmp = "cmp" in self.branches
        return PagedNSAKVCache(self.spec, num_pages, page_size=page_size, max_seqs=max_seqs, max_seq_len=max_seq_len,
                               device=device or self.q_proj.weight.device, dtype=dtype or getattr(torch, self.spec.dtype),
                               separate_window="win" in self.branches and "slc" in self.branches,
                               separate_cmp=on_cmp, phi_k=compressor_phi(self.k_phi) if on_cmp else None,
                               phi_v=compressor_phi(self.v_phi) if on_cmp else None, kv_dtype=kv_dtype)

    def _append(self, cache, kv, seqlens=None):
        dt = cache.dtype
        k, v = _main_kv(kv)
        win = kv.get("win") if cache.separate_window else None
        cmp_kv = kv.get("cmp") if cache.separate_cmp else None
        cache.append(k.to(dt), v.to(dt), *(x.to(dt) for x in win) if win else (None, None), seqlens,
                     k_cmp_new=cmp_kv[0].to(dt) if cmp_kv else None, v_cmp_new=cmp_kv[1].to(dt) if cmp_kv else None)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, cache, seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The forward over x [B, T, hidden] (entry b's first seqlens[b] tokens are real, default all),
        writing every branch's K/V into `cache` (emptied first): an NSAKVCache, or the batch of a
        paged cache (`paged.batch(slots)`). Returns y [B, T, hidden]."""
        self._no_cp("prefill")
        cache.reset()
        q, gates, kv = self._project(x)
        self._append(cache, kv, seqlens)
        return self._attend(q, gates, kv)

    @torch.no_grad()
    def decode(self, x_new: torch.Tensor, cache) -> torch.Tensor:
        """x_new [B, s, hidden] (s = 1..8 new tokens per entry, appended to `cache`) -> y [B, s, hidden],
        equal to the full forward's output at those positions. Runs `nsa_decode`'s kernels on CUDA
        (backend auto/kernels; all three branches on) and the reference otherwise."""
        from .decode import nsa_decode, paged_decode_unsupported
        from .kv_cache import nsa_decode_reference
        self._no_cp("decode")
        spec = self.spec
        q, gates, kv = self._project(x_new)
        B, s = q.shape[:2]
        use_kernels = _attention_fn(q, self.backend, spec) is not reference.nsa_reference
        from .paged_kv_cache import PagedBatch
        why = paged_decode_unsupported(cache) if use_kernels and isinstance(cache, PagedBatch) else None
        if why:   # an fp8 pool, or pages the kernels do not take
            if self.backend == "kernels":
                raise NotImplementedError(f"backend='kernels': {why}")
            if why not in _WARNED:
                _WARNED.add(why)
                warnings.warn(f"NativeSparseAttention.decode: {why}; running the PyTorch reference decode (slow; "
                              "backend='kernels' makes this an error)", stacklevel=2)
            use_kernels = False
        self._append(cache, kv)   # after every check that can refuse the step: a refused step writes nothing
        fn = nsa_decode if use_kernels else nsa_decode_reference
        o = fn(q.to(cache.dtype), cache, *(g.to(cache.dtype) for g in gates), spec)
        return self.o_proj(o.to(x_new.dtype).reshape(B, s, spec.heads * spec.v_head_dim))

    def _no_cp(self, what):
        if self.cp_group is not None:
            raise NotImplementedError(f"{what} with cp_group: serving with context parallelism is not built; "
                                      f"use a layer without cp_group (same parameters) for inference")

    def _compress(self, k, v, cu_seqlens):
        if cu_seqlens is None:
            return self.k_phi(k), self.v_phi(v)
        # Packed sequences: every sequence's blocks pooled in one call, rows packed in order (the
        # row count from the Pack: counted once for all layers that share it).
        c = self.spec.compression
        pack = cu_seqlens.to(k.device)
        rows = pack.rows(c)
        return self.k_phi.forward_packed(k, pack.cu_seqlens, rows), self.v_phi.forward_packed(v, pack.cu_seqlens, rows)


def _main_kv(kv: dict):
    """The selection branch's K/V are "the" k, v; with selection off, a branch that is on lends them
    (for shape only: nsa_attention / the cache then read that branch's own K/V)."""
    return kv.get("slc") or kv.get("win") or kv["cmp"]


_WARNED: set = set()


def _attention_fn(q: torch.Tensor, backend: str, spec: NSASpec):
    """The compiled-kernel op on CUDA (backend auto/kernels), the reference otherwise. A spec the
    kernels do not cover raises with backend='kernels'; with 'auto' on CUDA it runs the reference,
    after one warning per spec that names why (it is far slower)."""
    if backend == "reference":
        return reference.nsa_reference
    if backend == "kernels" and not q.is_cuda:
        raise ValueError(f"backend='kernels' needs CUDA tensors, got device {q.device}")
    if not q.is_cuda:
        return reference.nsa_reference
    if backend == "kernels":
        check_kernel_support(spec)
    elif problems := kernel_support(spec):
        if spec not in _WARNED:
            _WARNED.add(spec)
            why = "; ".join(f"{n}: {w}" for n, w in problems)
            warnings.warn(f"NativeSparseAttention: the kernels do not cover this spec ({why}); running the "
                          f"PyTorch reference on CUDA instead (slow; backend='kernels' makes this an error)",
                          stacklevel=3)
        return reference.nsa_reference
    from .ops import nsa_attention
    return nsa_attention
