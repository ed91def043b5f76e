"""PyTorch ops over the compiled kernels.

Per-branch ops (torch.library custom ops, each with a fake implementation for torch.compile):
  nsa_codegen::compression_attention(q, k_cmp, v_cmp, block, stride, first_block, scale) -> (o, lse)
  nsa_codegen::selection_topn(q, k_cmp, lse, block, stride, first_block, sel_block, top_n, initial,
                              local, scale) -> (block_indices int32, block_counts int32)
  nsa_codegen::selection_attention(q, k, v, block_indices, sel_block, scale) -> (o, lse)
  nsa_codegen::window_attention(q, k, v, window, scale) -> (o, lse)
  nsa_codegen::gate_combine(o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, kv_heads) -> o
and `nsa_attention(...)`, the whole forward, which matches `nsa_codegen.reference.nsa_reference`.
Every op but selection_topn (a discrete choice, not differentiated) is differentiable: its
autograd calls a backward custom op (`*_bwd`, also with a fake) that runs the backward kernels.
Layouts: q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv], k_cmp [B, N, H, Dk], o [B, T, HQ, Dv],
lse [B, T, HQ] float32 (natural log), block_indices [B, T, H, n]. Scale < 0 means 1/sqrt(Dk).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .buffers import KERNEL_DTYPES as _DTYPES
from .buffers import empty as _empty
from .cache import get_kernel
from .kernel_key import KernelKey
from .lowering import arch_of_capability, lower_to_plan
from .spec import SUPPORTED_GROUPS, SUPPORTED_HEAD_DIMS, SUPPORTED_V_HEAD_DIMS, NSASpec



def _is_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _check_tensor(name: str, t: torch.Tensor, ndim: int, like: Optional[torch.Tensor] = None, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(t.shape)}")
    if not _is_gpu(t):
        raise ValueError(f"{name} must be a CUDA tensor (the kernels run on the GPU), got device {t.device}; "
                         f"use nsa_codegen.reference on the CPU")
    want = dtype if dtype is not None else (like.dtype if like is not None else None)
    if want is None and t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be bfloat16 or float16, got {t.dtype}")
    if want is not None and t.dtype != want:
        raise ValueError(f"{name} must be {want} (like q), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but q is on {like.device}")


def _arch(t: torch.Tensor) -> str:
    return arch_of_capability(*torch.cuda.get_device_capability(t.device))


def _heads(q, k, what="k"):
    HQ, H = q.shape[2], k.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"q heads ({HQ}) must be a multiple of {what} heads ({H})")
    G = HQ // H
    if G not in SUPPORTED_GROUPS:
        raise ValueError(f"group HQ/H = {G} is not supported; supported: {list(SUPPORTED_GROUPS)}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head dim {q.shape[3]} is not supported; supported: {list(SUPPORTED_HEAD_DIMS)}")
    return H, G


def _key(kind, q, k, v_dim, scale, **params) -> KernelKey:
    H, G = _heads(q, k)
    if v_dim and v_dim not in SUPPORTED_V_HEAD_DIMS:
        raise ValueError(f"v head dim {v_dim} is not supported; supported: {list(SUPPORTED_V_HEAD_DIMS)}")
    return KernelKey.make(arch=_arch(q), kind=kind, dtype=_DTYPES[q.dtype], head_dim=q.shape[3], v_head_dim=v_dim,
                          kv_heads=H, group=G, scale=None if scale < 0 else float(scale), **params)


def _launch(key: KernelKey, *tensors):
    _run(get_kernel(key), *tensors)


def _run(kernel, *tensors):
    try:
        kernel(*tensors)
    except Exception as e:
        raise RuntimeError(f"launching {kernel.key} failed: {type(e).__name__}: {e}") from e


def _c(x):
    return x if x.is_contiguous() else x.contiguous()


def _attend(key: KernelKey, q: torch.Tensor, v_dim: int, *inputs: torch.Tensor):
    """Allocate o [B, T, HQ, v_dim] (q's dtype) and lse [B, T, HQ] float32, launch key's kernel on
    (*inputs, o, lse) made contiguous, and return (o, lse)."""
    B, T, HQ, _ = q.shape
    o = _empty((B, T, HQ, v_dim), q.dtype, q.device)
    lse = _empty((B, T, HQ), torch.float32, q.device)
    if T:
        _launch(key, *(_c(x) for x in inputs), o, lse)
    return o, lse


def _attend_fake(q: torch.Tensor, v_dim: int):
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v_dim), q.new_empty(B, T, HQ, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Per-branch ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("nsa_codegen::compression_attention", mutates_args=())
def compression_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block: int, stride: int,
                          first_block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("q", q, 4)
    _check_tensor("k_cmp", k_cmp, 4, like=q)
    _check_tensor("v_cmp", v_cmp, 4, like=q)
    B, T, HQ, _ = q.shape
    key = _key("compression_fwd", q, k_cmp, v_cmp.shape[3], scale, cmp_block=block, stride=stride,
               first_block=first_block)
    if k_cmp.shape[1] == 0:  # T < block: no compressed block exists yet, for any query
        return (q.new_zeros(B, T, HQ, v_cmp.shape[3]),
                torch.full((B, T, HQ), float("-inf"), device=q.device))
    return _attend(key, q, v_cmp.shape[3], q, k_cmp, v_cmp)


@compression_attention.register_fake
def _(q, k_cmp, v_cmp, block, stride, first_block, scale):
    return _attend_fake(q, v_cmp.shape[3])


@torch.library.custom_op("nsa_codegen::selection_topn", mutates_args=())
def selection_topn(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, block: int, stride: int,
                   first_block: int, sel_block: int, top_n: int, initial: int, local: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("q", q, 4)
    _check_tensor("k_cmp", k_cmp, 4, like=q)
    _check_tensor("lse", lse, 3, dtype=torch.float32)
    B, T, HQ, _ = q.shape
    H = k_cmp.shape[2]
    key = _key("selection_topn", q, k_cmp, 0, scale, cmp_block=block, stride=stride, first_block=first_block,
               sel_block=sel_block, top_n=top_n, initial=initial, local=local)
    if k_cmp.shape[1] == 0:  # no compressed block: every score is 0, only visibility and forcing matter
        scores = torch.zeros(B, T, H, reference.num_selection_blocks(T, sel_block), device=q.device)
        idx = reference.select_top_n(scores, sel_block, top_n, initial, local)
        return idx, (idx >= 0).sum(-1, dtype=torch.int32)
    idx = _empty((B, T, H, top_n), torch.int32, q.device)
    cnt = _empty((B, T, H), torch.int32, q.device)
    if T:
        _launch(key, _c(q), _c(k_cmp), _c(lse), idx, cnt)
    return idx, cnt


@selection_topn.register_fake
def _(q, k_cmp, lse, block, stride, first_block, sel_block, top_n, initial, local, scale):
    B, T, _, _ = q.shape
    H = k_cmp.shape[2]
    return (q.new_empty(B, T, H, top_n, dtype=torch.int32), q.new_empty(B, T, H, dtype=torch.int32))


@torch.library.custom_op("nsa_codegen::selection_attention", mutates_args=())
def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                        sel_block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4, like=q)
    _check_tensor("v", v, 4, like=q)
    _check_tensor("block_indices", block_indices, 4, dtype=torch.int32)
    B, T, HQ, _ = q.shape
    if tuple(block_indices.shape[:3]) != (B, T, k.shape[2]):
        raise ValueError(f"block_indices must be [B, T, H, n] = [{B}, {T}, {k.shape[2]}, n], "
                         f"got {list(block_indices.shape)}")
    key = _key("selection_fwd", q, k, v.shape[3], scale, sel_block=sel_block, top_n=block_indices.shape[3])
    return _attend(key, q, v.shape[3], q, k, v, block_indices)


@selection_attention.register_fake
def _(q, k, v, block_indices, sel_block, scale):
    return _attend_fake(q, v.shape[3])


@torch.library.custom_op("nsa_codegen::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4, like=q)
    _check_tensor("v", v, 4, like=q)
    key = _key("window_fwd", q, k, v.shape[3], scale, window=window)
    return _attend(key, q, v.shape[3], q, k, v)


@window_attention.register_fake
def _(q, k, v, window, scale):
    return _attend_fake(q, v.shape[3])


@torch.library.custom_op("nsa_codegen::gate_combine", mutates_args=())
def gate_combine(o_cmp: Optional[torch.Tensor], g_cmp: Optional[torch.Tensor], o_slc: Optional[torch.Tensor],
                 g_slc: Optional[torch.Tensor], o_win: Optional[torch.Tensor], g_win: Optional[torch.Tensor],
                 kv_heads: int) -> torch.Tensor:
    """o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win over the branches given (o: [B, T, HQ, Dv], g: [B, T, HQ])."""
    pairs = [(n, o, g) for n, o, g in (("cmp", o_cmp, g_cmp), ("slc", o_slc, g_slc), ("win", o_win, g_win))
             if o is not None]
    if not pairs:
        raise ValueError("gate_combine needs at least one branch output")
    first = pairs[0][1]
    _check_tensor(f"o_{pairs[0][0]}", first, 4)
    B, T, HQ, Dv = first.shape
    for n, o, g in pairs:
        _check_tensor(f"o_{n}", o, 4, like=first)
        if g is None:
            raise ValueError(f"g_{n} is required with o_{n}")
        _check_tensor(f"g_{n}", g, 3, like=first)
        if tuple(o.shape) != (B, T, HQ, Dv) or tuple(g.shape) != (B, T, HQ):
            raise ValueError(f"o_{n} must be [{B}, {T}, {HQ}, {Dv}] and g_{n} [{B}, {T}, {HQ}], "
                             f"got {list(o.shape)} and {list(g.shape)}")
    if HQ % kv_heads or HQ // kv_heads not in SUPPORTED_GROUPS:
        raise ValueError(f"kv_heads ({kv_heads}) must divide the {HQ} heads into a supported group")
    out = _empty((B, T, HQ, Dv), first.dtype, first.device)
    if T:
        _launch(_gate_key("gate_combine", first, kv_heads, pairs),
                *_gate_slots({n: (_c(o), _c(g)) for n, o, g in pairs}), out)
    return out


def _gate_key(kind: str, first: torch.Tensor, kv_heads: int, pairs) -> KernelKey:
    B, T, HQ, Dv = first.shape
    return KernelKey.make(arch=_arch(first), kind=kind, dtype=_DTYPES[first.dtype], head_dim=0, v_head_dim=Dv,
                          kv_heads=kv_heads, group=HQ // kv_heads, branches=".".join(n for n, _, _ in pairs))


def _gate_slots(per_branch: dict) -> list:
    """The kernel's cmp, slc, win slots: a branch that is off is never read or written, so the first
    present branch's tensors (of the right shape) fill its slots."""
    filler = next(iter(per_branch.values()))
    return [x for n in ("cmp", "slc", "win") for x in per_branch.get(n, filler)]


@gate_combine.register_fake
def _(o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, kv_heads):
    first = next(o for o in (o_cmp, o_slc, o_win) if o is not None)
    return torch.empty_like(first)


# ------------------------------------------------------------------------------------------------
# Backward: one custom op per branch (so torch.compile traces it), registered as the forward's autograd.
# Every kernel is deterministic (no atomics): a query-major dq kernel that also writes
# Delta = rowsum(dO * O) - dlse, and a key-major dk/dv kernel; gradients are bit-identical run to run.
# ------------------------------------------------------------------------------------------------
def _delta_inputs(do, dlse, o, lse):
    """do (zeros where the output's gradient is None) and dlse as float32 (zeros where None)."""
    do = torch.zeros_like(o) if do is None else _c(do.to(o.dtype))
    dlse = torch.zeros_like(lse) if dlse is None else _c(dlse.to(torch.float32))
    return do, dlse


def _dq_and_delta(kind_dq: str, params: dict, q, k, v, o, lse, do, dlse, scale, *extra):
    """The dq phase every branch's backward starts with: launch kind_dq's kernel on
    (q, k, v, o, do, lse, dlse, *extra) -> (dq, delta = rowsum(do * o) - dlse).

    Returns (dq, delta, (q, k, v, do, lse) made contiguous, for the dk/dv kernels)."""
    B, T, HQ, _ = q.shape
    do, dlse = _delta_inputs(do, dlse, o, lse)
    q, k, v, o, lse = (_c(x) for x in (q, k, v, o, lse))
    dq = _empty(q.shape, q.dtype, q.device)
    delta = _empty((B, T, HQ), torch.float32, q.device)
    _launch(_key(kind_dq, q, k, v.shape[3], scale, **params), q, k, v, o, do, lse, dlse, *extra, dq, delta)
    return dq, delta, (q, k, v, do, lse)


def _no_grads(q, k, v):
    return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)


@torch.library.custom_op("nsa_codegen::compression_attention_bwd", mutates_args=())
def compression_attention_bwd(do: Optional[torch.Tensor], dlse: Optional[torch.Tensor], q: torch.Tensor,
                              k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              block: int, stride: int, first_block: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B,T,HQ,Dk], dk_cmp [B,N,H,Dk], dv_cmp [B,N,H,Dv]) of compression_attention.

    The dk/dv kernel splits each compressed-row tile's tokens over S programs (few rows, many
    tokens) and writes fp32 partials [S, B, N, H, D]; their sum over S is taken here, in order."""
    B, T, HQ, Dk = q.shape
    N = k_cmp.shape[1]
    if T == 0 or N == 0:
        return _no_grads(q, k_cmp, v_cmp)
    params = dict(cmp_block=block, stride=stride, first_block=first_block)
    dq, delta, (q, k_cmp, v_cmp, do, lse) = _dq_and_delta("compression_bwd_dq", params, q, k_cmp, v_cmp, o, lse,
                                                          do, dlse, scale)
    dkdv = get_kernel(_key("compression_bwd_dkdv", q, k_cmp, v_cmp.shape[3], scale, **params))
    # S as templates/compression_attention_bwd.splits computes it (kv_splits, 0 = stride // 16);
    # read from the schedule so a prebuilt kernel needs no template import.
    S = dict(dkdv.key.schedule or ()).get("kv_splits", 0) or max(1, stride // 16)
    part_k = _empty((S, B, N, k_cmp.shape[2], Dk), torch.float32, q.device)
    part_v = _empty((S, B, N, v_cmp.shape[2], v_cmp.shape[3]), torch.float32, q.device)
    _run(dkdv, q, k_cmp, v_cmp, do, lse, delta, part_k, part_v)
    return dq, part_k.sum(0).to(k_cmp.dtype), part_v.sum(0).to(v_cmp.dtype)


@compression_attention_bwd.register_fake
def _(do, dlse, q, k_cmp, v_cmp, o, lse, block, stride, first_block, scale):
    return torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp)


@torch.library.custom_op("nsa_codegen::window_attention_bwd", mutates_args=())
def window_attention_bwd(do: Optional[torch.Tensor], dlse: Optional[torch.Tensor], q: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, window: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of window_attention."""
    if q.shape[1] == 0:
        return _no_grads(q, k, v)
    params = dict(window=window)
    dq, delta, (q, k, v, do, lse) = _dq_and_delta("window_bwd_dq", params, q, k, v, o, lse, do, dlse, scale)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    _launch(_key("window_bwd_dkdv", q, k, v.shape[3], scale, **params), q, k, v, do, lse, delta, dk, dv)
    return dq, dk, dv


@window_attention_bwd.register_fake
def _(do, dlse, q, k, v, o, lse, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Tokens per unit of selection's transposed map: a block selected by more queries (block 0 is forced
# for every query) is split into several units, each its own program, summed in a fixed order after.
SELECTION_UNIT_TOKENS = 256


def selection_block_units(block_indices: torch.Tensor, T: int, sel_block: int,
                          unit_tokens: int = SELECTION_UNIT_TOKENS):
    """The transposed selection map (block CSR) cut into units of at most unit_tokens queries.

    block_indices [B, T, H, n] (-1 = pad) -> (tok_idx [P], unit_block [U], unit_start [U], unit_end [U],
    block_unit_start [B*H*NB + 1]), all int32: entries sorted by flat block id (b*H + h)*NB + j, then by
    token; unit u covers entries [unit_start[u], unit_end[u]) of block unit_block[u]; the units of block
    bid are block_unit_start[bid] .. block_unit_start[bid+1]-1. Sort-based, so deterministic.
    """
    B, _, H, n = block_indices.shape
    dev = block_indices.device
    NB = -(-T // sel_block)
    nblk = B * H * NB
    idx = block_indices.long()
    valid = (idx >= 0) & (idx < NB)
    bb = torch.arange(B, device=dev).view(B, 1, 1, 1)
    tt = torch.arange(T, device=dev).view(1, T, 1, 1)
    hh = torch.arange(H, device=dev).view(1, 1, H, 1)
    flat = ((bb * H + hh) * NB + idx) * T + tt  # block id major, token minor
    keys, _ = torch.sort(flat[valid])
    tok_idx = (keys % T).to(torch.int32)
    counts = torch.bincount(keys // T, minlength=nblk)
    units = (counts + unit_tokens - 1) // unit_tokens
    block_unit_start = torch.zeros(nblk + 1, dtype=torch.long, device=dev)
    torch.cumsum(units, 0, out=block_unit_start[1:])
    entry_start = torch.cumsum(counts, 0) - counts
    U = int(block_unit_start[-1])
    unit_block = torch.repeat_interleave(torch.arange(nblk, device=dev), units, output_size=U)
    rank = torch.arange(U, device=dev) - block_unit_start[unit_block]
    unit_start = entry_start[unit_block] + rank * unit_tokens
    unit_end = torch.minimum(unit_start + unit_tokens, entry_start[unit_block] + counts[unit_block])
    i32 = torch.int32
    return tok_idx, unit_block.to(i32), unit_start.to(i32), unit_end.to(i32), block_unit_start.to(i32)


@torch.library.custom_op("nsa_codegen::selection_attention_bwd", mutates_args=())
def selection_attention_bwd(do: Optional[torch.Tensor], dlse: Optional[torch.Tensor], q: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                            block_indices: torch.Tensor, sel_block: int,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of selection_attention; dk/dv run over the transposed block map."""
    B, T, HQ, Dk = q.shape
    if T == 0:
        return _no_grads(q, k, v)
    params = dict(sel_block=sel_block, top_n=block_indices.shape[3])
    bi = _c(block_indices.to(torch.int32))
    dq, delta, (q, k, v, do, lse) = _dq_and_delta("selection_bwd_dq", params, q, k, v, o, lse, do, dlse, scale, bi)
    tok_idx, unit_block, unit_start, unit_end, block_unit_start = selection_block_units(bi, T, sel_block)
    U = unit_block.shape[0]
    part_k = _empty((max(U, 1), sel_block, Dk), torch.float32, q.device)
    part_v = _empty((max(U, 1), sel_block, v.shape[3]), torch.float32, q.device)
    if U:
        _launch(_key("selection_bwd_dkdv", q, k, v.shape[3], scale, **params), q, k, v, do, lse, delta,
                tok_idx, unit_block, unit_start, unit_end, part_k, part_v)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    _launch(_key("selection_bwd_reduce", q, k, v.shape[3], scale, **params), part_k, part_v, block_unit_start,
            dk, dv)
    return dq, dk, dv


@selection_attention_bwd.register_fake
def _(do, dlse, q, k, v, o, lse, block_indices, sel_block, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("nsa_codegen::gate_combine_bwd", mutates_args=())
def gate_combine_bwd(do: torch.Tensor, o_cmp: Optional[torch.Tensor], g_cmp: Optional[torch.Tensor],
                     o_slc: Optional[torch.Tensor], g_slc: Optional[torch.Tensor], o_win: Optional[torch.Tensor],
                     g_win: Optional[torch.Tensor], kv_heads: int) -> list[torch.Tensor]:
    """[do_x, dg_x for each branch given, in cmp, slc, win order]: do_x = g_x * do, dg_x = sum_d do * o_x."""
    pairs = [(n, o, g) for n, o, g in (("cmp", o_cmp, g_cmp), ("slc", o_slc, g_slc), ("win", o_win, g_win))
             if o is not None]
    first = pairs[0][1]
    grads = {n: (_empty(o.shape, o.dtype, o.device), _empty(g.shape, g.dtype, g.device)) for n, o, g in pairs}
    if first.shape[1]:
        _launch(_gate_key("gate_combine_bwd", first, kv_heads, pairs), _c(do.to(first.dtype)),
                *_gate_slots({n: (_c(o), _c(g)) for n, o, g in pairs}), *_gate_slots(grads))
    return [x for n, _, _ in pairs for x in grads[n]]


@gate_combine_bwd.register_fake
def _(do, o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, kv_heads):
    out = []
    for o, g in ((o_cmp, g_cmp), (o_slc, g_slc), (o_win, g_win)):
        if o is not None:
            out += [torch.empty_like(o), torch.empty_like(g)]
    return out


def _setup_compression(ctx, inputs, output):
    q, k_cmp, v_cmp, block, stride, first_block, scale = inputs
    ctx.save_for_backward(q, k_cmp, v_cmp, *output)
    ctx.params = (block, stride, first_block, scale)


def _backward_compression(ctx, do, dlse):
    q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
    dq, dk, dv = compression_attention_bwd(do, dlse, q, k_cmp, v_cmp, o, lse, *ctx.params)
    return dq, dk, dv, None, None, None, None


def _setup_window(ctx, inputs, output):
    q, k, v, window, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.params = (window, scale)


def _backward_window(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = window_attention_bwd(do, dlse, q, k, v, o, lse, *ctx.params)
    return dq, dk, dv, None, None


def _setup_selection(ctx, inputs, output):
    q, k, v, block_indices, sel_block, scale = inputs
    ctx.save_for_backward(q, k, v, block_indices, *output)
    ctx.params = (sel_block, scale)


def _backward_selection(ctx, do, dlse):
    q, k, v, block_indices, o, lse = ctx.saved_tensors
    dq, dk, dv = selection_attention_bwd(do, dlse, q, k, v, o, lse, block_indices, *ctx.params)
    return dq, dk, dv, None, None, None


def _setup_gate(ctx, inputs, output):
    ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in inputs[:6]))
    ctx.present = tuple(x is not None for x in inputs[:6])
    ctx.kv_heads = inputs[6]


def _backward_gate(ctx, do):
    saved = [x if p else None for x, p in zip(ctx.saved_tensors, ctx.present)]
    grads = iter(gate_combine_bwd(do, *saved, ctx.kv_heads))
    out = []
    for i in range(0, 6, 2):
        if ctx.present[i]:
            out += [next(grads), next(grads)]
        else:
            out += [None, None]
    return (*out, None)


compression_attention.register_autograd(_backward_compression, setup_context=_setup_compression)
window_attention.register_autograd(_backward_window, setup_context=_setup_window)
selection_attention.register_autograd(_backward_selection, setup_context=_setup_selection)
gate_combine.register_autograd(_backward_gate, setup_context=_setup_gate)


# ------------------------------------------------------------------------------------------------
# The whole forward
# ------------------------------------------------------------------------------------------------
def _check_against_spec(q, k, v, spec: NSASpec):
    _check_tensor("q", q, 4)
    if _DTYPES[q.dtype] != spec.dtype:
        raise ValueError(f"q is {q.dtype} but the spec's dtype is {spec.dtype}")
    reference.check_inputs(q, k, v, spec)
    _check_tensor("k", k, 4, like=q)
    _check_tensor("v", v, 4, like=q)


def nsa_attention(q, k, v, g_cmp, g_slc, g_win, spec: NSASpec, *, k_cmp=None, v_cmp=None, k_win=None, v_win=None,
                  block_indices=None, cu_seqlens=None, return_indices: bool = False):
    """NSA forward on the GPU kernels; same contract as `nsa_codegen.reference.nsa_reference`.

    q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv], gates [B, T, HQ] -> o [B, T, HQ, Dv].
    k_cmp / v_cmp default to mean pooling of k / v; k_win / v_win default to k / v.
    cu_seqlens [S+1] with B == 1 packs S sequences (each runs as its own launch sequence).
    """
    if not isinstance(spec, NSASpec):
        raise TypeError(f"spec must be an NSASpec, got {type(spec).__name__}")
    _check_against_spec(q, k, v, spec)
    if cu_seqlens is not None:
        return reference.run_packed(q, k, v, g_cmp, g_slc, g_win, spec, k_cmp, v_cmp, k_win, v_win, block_indices,
                                 cu_seqlens, return_indices, forward=nsa_attention)
    T = q.shape[1]
    c, s = spec.compression, spec.selection
    if s is not None and block_indices is not None:
        reference.check_block_indices(block_indices, q, spec)
    plan = lower_to_plan(spec, _arch(q), explicit_indices=block_indices is not None)
    scale = spec.scale if spec.scale is not None else -1.0
    env = {"q": q, "k": k, "v": v, "k_win": k if k_win is None else k_win, "v_win": v if v_win is None else v_win,
           "block_indices": None if block_indices is None else block_indices.to(torch.int32)}
    if c is not None:
        N = reference.num_compressed_blocks(T, c.block, c.stride, c.first_block)
        env["k_cmp"] = reference.compress(k, c.block, c.stride, c.first_block) if k_cmp is None else k_cmp
        env["v_cmp"] = reference.compress(v, c.block, c.stride, c.first_block) if v_cmp is None else v_cmp
        if env["k_cmp"].shape[1] != N or env["v_cmp"].shape[1] != N:
            raise ValueError(f"k_cmp / v_cmp must have N = {N} compressed rows for T = {T}, "
                             f"got {env['k_cmp'].shape[1]} / {env['v_cmp'].shape[1]}")
    for gate, _ in plan.combine:
        env[gate] = _gate(gate, {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win}[gate], q)
    for call in plan.calls:
        try:
            run = _FORWARD_RUNNERS[call.kind]
        except KeyError:
            raise NotImplementedError(f"{call.key}: no op runs kernel kind {call.kind!r}") from None
        outs = run(spec, scale, **{name: env[name] for name in call.inputs})
        env.update(zip(call.outputs, outs))
    out = env["o"]
    return (out, env["block_indices"]) if return_indices else out


# The plan's interpreter: per forward kind, the op that runs a call, given the spec, the scale (< 0:
# 1/sqrt(Dk)) and the call's input tensors by their plan names; it returns the call's outputs in order.
def _run_compression_fwd(spec, scale, q, k_cmp, v_cmp):
    c = spec.compression
    return compression_attention(q, k_cmp, v_cmp, c.block, c.stride, c.first_block, scale)


def _run_selection_topn(spec, scale, q, k_cmp, lse_cmp):
    c, s = spec.compression, spec.selection
    # Top-n is not differentiated (as in the paper): its inputs are detached.
    return selection_topn(q.detach(), k_cmp.detach(), lse_cmp.detach(), c.block, c.stride, c.first_block,
                          s.block, s.top_n, s.initial, s.local, scale)


def _run_selection_fwd(spec, scale, q, k, v, block_indices):
    return selection_attention(q, k, v, block_indices, spec.selection.block, scale)


def _run_window_fwd(spec, scale, q, k_win, v_win):
    return window_attention(q, k_win, v_win, spec.window.size, scale)


def _run_gate_combine(spec, scale, o_cmp=None, g_cmp=None, o_slc=None, g_slc=None, o_win=None, g_win=None):
    return (gate_combine(o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, spec.kv_heads),)


_FORWARD_RUNNERS = {"compression_fwd": _run_compression_fwd, "selection_topn": _run_selection_topn,
                    "selection_fwd": _run_selection_fwd, "window_fwd": _run_window_fwd,
                    "gate_combine": _run_gate_combine}


def _gate(name: str, g, q):
    if g is None:
        raise ValueError(f"{name} is required: its branch is on in the spec")
    if tuple(g.shape) != tuple(q.shape[:3]):
        raise ValueError(f"{name} must be [B, T, HQ] = {list(q.shape[:3])}, got {list(g.shape)}")
    return g.to(q.dtype)
