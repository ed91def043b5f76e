"""The backward custom ops (each with a fake implementation for torch.compile) and the autograd
rules that register them as the forward ops' backward (nsa_codegen.ops registers them).

  nsa_codegen::compression_attention_bwd(do, dlse, q, k_cmp, v_cmp, o, lse, block, stride, first_block,
                                         scale, seq_start=None, cmp_start=None) -> (dq, dk_cmp, dv_cmp)
  nsa_codegen::selection_attention_bwd(do, dlse, q, k, v, o, lse, block_indices, sel_block, scale,
                                       seq_start=None) -> (dq, dk, dv)
  nsa_codegen::window_attention_bwd(do, dlse, q, k, v, o, lse, window, scale, seq_start=None) -> (dq, dk, dv)
  nsa_codegen::gate_combine_bwd(do, o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, kv_heads) -> [do_x, dg_x, ...]
Layouts as in nsa_codegen.ops; do / dlse None mean zero cotangents.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import packing
from .buffers import empty
from .launch import (contiguous, gate_key, gate_slots, kernel, kernel_key, launch, pack_maps, run_kernel,
                     token_map)


# ------------------------------------------------------------------------------------------------
# Backward: one custom op per branch (so torch.compile traces it), registered as the forward's autograd.
# Every kernel is deterministic (no atomics): a query-major dq kernel that also writes
# Delta = rowsum(dO * O) - dlse, and a key-major dk/dv kernel; gradients are bit-identical run to run.
# ------------------------------------------------------------------------------------------------
def _delta_inputs(do, dlse, o, lse):
    """do (zeros where the output's gradient is None) and dlse as float32 (zeros where None)."""
    do = torch.zeros_like(o) if do is None else contiguous(do.to(o.dtype))
    dlse = torch.zeros_like(lse) if dlse is None else contiguous(dlse.to(torch.float32))
    return do, dlse


def _dq_and_delta(kind_dq: str, params: dict, q, k, v, o, lse, do, dlse, scale, *extra):
    """The dq phase every branch's backward starts with: launch kind_dq's kernel on
    (q, k, v, o, do, lse, dlse, *extra) -> (dq, delta = rowsum(do * o) - dlse).

    Returns (dq, delta, (q, k, v, do, lse) made contiguous, for the dk/dv kernels)."""
    B, T, HQ, _ = q.shape
    do, dlse = _delta_inputs(do, dlse, o, lse)
    q, k, v, o, lse = (contiguous(x) for x in (q, k, v, o, lse))
    dq = empty(q.shape, q.dtype, q.device)
    delta = empty((B, T, HQ), torch.float32, q.device)
    launch(kernel_key(kind_dq, q, k, v.shape[3], scale, **params), q, k, v, o, do, lse, dlse, *extra, dq, delta)
    return dq, delta, (q, k, v, do, lse)


def _no_grads(q, k, v):
    return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)


@torch.library.custom_op("nsa_codegen::compression_attention_bwd", mutates_args=())
def compression_attention_bwd(do: Optional[torch.Tensor], dlse: Optional[torch.Tensor], q: torch.Tensor,
                              k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              block: int, stride: int, first_block: int, scale: float,
                              seq_start: Optional[torch.Tensor] = None, cmp_start: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B,T,HQ,Dk], dk_cmp [B,N,H,Dk], dv_cmp [B,N,H,Dv]) of compression_attention (seq_start /
    cmp_start: a pack's token maps, as the forward's).

    The dk/dv kernel splits each compressed-row tile's tokens over S programs (few rows, many
    tokens) and writes fp32 partials [S, B, N, H, D]; their sum over S is taken here, in order."""
    B, T, HQ, Dk = q.shape
    N = k_cmp.shape[1]
    if T == 0 or N == 0:
        return _no_grads(q, k_cmp, v_cmp)
    params = dict(cmp_block=block, stride=stride, first_block=first_block)
    packed = seq_start is not None
    seq_start, cmp_start = pack_maps("compression_attention_bwd", q, seq_start, cmp_start)
    dq, delta, (q, k_cmp, v_cmp, do, lse) = _dq_and_delta("compression_bwd_dq", params, q, k_cmp, v_cmp, o, lse,
                                                          do, dlse, scale, seq_start, cmp_start)
    # each compressed row's visible tokens (the dk/dv kernel walks them)
    row_first, row_end = packing.compressed_row_spans(T, N, block, stride, first_block,
                                                      seq_start if packed else None,
                                                      cmp_start if packed else None, q.device)
    dkdv = kernel(kernel_key("compression_bwd_dkdv", q, k_cmp, v_cmp.shape[3], scale, **params))
    # S as templates/compression_attention_bwd.splits computes it (kv_splits, 0 = stride // 16);
    # read from the schedule so a prebuilt kernel needs no template import.
    S = dict(dkdv.key.schedule or ()).get("kv_splits", 0) or max(1, stride // 16)
    part_k = empty((S, B, N, k_cmp.shape[2], Dk), torch.float32, q.device)
    part_v = empty((S, B, N, v_cmp.shape[2], v_cmp.shape[3]), torch.float32, q.device)
    run_kernel(dkdv, q, k_cmp, v_cmp, do, lse, delta, row_first, row_end, part_k, part_v)
    return dq, part_k.sum(0).to(k_cmp.dtype), part_v.sum(0).to(v_cmp.dtype)


@compression_attention_bwd.register_fake
def _(do, dlse, q, k_cmp, v_cmp, o, lse, block, stride, first_block, scale, seq_start=None, cmp_start=None):
    return torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp)


@torch.library.custom_op("nsa_codegen::window_attention_bwd", mutates_args=())
def window_attention_bwd(do: Optional[torch.Tensor], dlse: Optional[torch.Tensor], q: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, window: int,
                         scale: float, seq_start: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of window_attention (seq_start [B, T] int32: a pack's token map, as the forward's)."""
    if q.shape[1] == 0:
        return _no_grads(q, k, v)
    params = dict(window=window)
    seq_start = token_map("seq_start", seq_start, q)
    dq, delta, (q, k, v, do, lse) = _dq_and_delta("window_bwd_dq", params, q, k, v, o, lse, do, dlse, scale,
                                                  seq_start)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    launch(kernel_key("window_bwd_dkdv", q, k, v.shape[3], scale, **params), q, k, v, do, lse, delta, seq_start,
           dk, dv)
    return dq, dk, dv


@window_attention_bwd.register_fake
def _(do, dlse, q, k, v, o, lse, window, scale, seq_start=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Tokens per unit of selection's transposed map: a block selected by more queries (block 0 is forced
# for every query) is split into several units, each its own program, summed in a fixed order after.
SELECTION_UNIT_TOKENS = 256


def selection_block_units(block_indices: torch.Tensor, T: int, sel_block: int,
                          unit_tokens: int = SELECTION_UNIT_TOKENS, seq_start: Optional[torch.Tensor] = None):
    """The transposed selection map (block CSR) cut into units of at most unit_tokens queries.

    block_indices [B, T, H, n] (-1 = pad) -> (tok_idx [P], unit_block [U], unit_start [U], unit_end [U],
    block_unit_start [B*H*NBG + 1], block_row0 [NBG], block_row_end [NBG]), all int32. The blocks are
    each sequence's (seq_start [1, T]: a pack's token map; None: one sequence of T tokens): block g
    holds keys [block_row0[g], block_row_end[g]), and token t's block id j is block
    (first block of t's sequence) + j. Entries are sorted by flat block id (b*H + h)*NBG + g, then by
    token; unit u covers entries [unit_start[u], unit_end[u]) of block unit_block[u]; the units of
    block bid are block_unit_start[bid] .. block_unit_start[bid+1]-1. Sort-based, so deterministic.
    """
    B, _, H, n = block_indices.shape
    dev = block_indices.device
    t = torch.arange(T, device=dev)
    if seq_start is None:
        ss = torch.zeros(T, dtype=torch.long, device=dev)
    else:
        ss = seq_start[0].long()
    # Blocks start at every sel_block tokens into each sequence: their first rows, in order.
    is_first = (t - ss) % sel_block == 0
    row0 = torch.nonzero(is_first).flatten()                 # (a host sync, like U below)
    seq_end = torch.searchsorted(ss, ss, right=True)         # per token: its sequence's end
    row_end = torch.minimum(row0 + sel_block, seq_end[row0])
    NBG = row0.numel()
    base = (torch.cumsum(is_first.long(), 0) - 1)[ss]        # per token: its sequence's first block
    nblk = B * H * NBG
    idx = block_indices.long()
    # usable: a block of the token's own sequence (later blocks stay, and add nothing: causality)
    valid = (idx >= 0) & (ss.view(1, T, 1, 1) + idx * sel_block < seq_end.view(1, T, 1, 1))
    bb = torch.arange(B, device=dev).view(B, 1, 1, 1)
    tt = t.view(1, T, 1, 1)
    hh = torch.arange(H, device=dev).view(1, 1, H, 1)
    flat = ((bb * H + hh) * NBG + base.view(1, T, 1, 1) + idx) * T + tt  # block id major, token minor
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
    return (tok_idx, unit_block.to(i32), unit_start.to(i32), unit_end.to(i32), block_unit_start.to(i32),
            row0.to(i32), row_end.to(i32))


@torch.library.custom_op("nsa_codegen::selection_attention_bwd", mutates_args=())
def selection_attention_bwd(do: Optional[torch.Tensor], dlse: Optional[torch.Tensor], q: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                            block_indices: torch.Tensor, sel_block: int, scale: float,
                            seq_start: Optional[torch.Tensor] = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of selection_attention (seq_start: a pack's token map, as the forward's); dk/dv
    run over the transposed block map."""
    B, T, HQ, Dk = q.shape
    if T == 0:
        return _no_grads(q, k, v)
    params = dict(sel_block=sel_block, top_n=block_indices.shape[3])
    bi = contiguous(block_indices.to(torch.int32))
    packed = seq_start is not None
    seq_start = token_map("seq_start", seq_start, q)
    # The dq kernels take K with its non-finite values zeroed: dQ += dS K would carry a NaN key that a
    # row must not see (dS = 0 there: a block only its tile's other tokens chose, a key after t in t's
    # block) into the row as 0 * NaN in the tensor cores. A row that does see such a key still gets
    # NaN (its forward lse is NaN, so P is), as in the reference. dk / dv read K itself.
    k_dq = torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
    dq, delta, (q, _, v, do, lse) = _dq_and_delta("selection_bwd_dq", params, q, k_dq, v, o, lse, do, dlse, scale,
                                                  bi, seq_start)
    k = contiguous(k)
    tok_idx, unit_block, unit_start, unit_end, block_unit_start, row0, row_end = selection_block_units(
        bi, T, sel_block, seq_start=seq_start if packed else None)
    U = unit_block.shape[0]
    part_k = empty((max(U, 1), sel_block, Dk), torch.float32, q.device)
    part_v = empty((max(U, 1), sel_block, v.shape[3]), torch.float32, q.device)
    if U:
        launch(kernel_key("selection_bwd_dkdv", q, k, v.shape[3], scale, **params), q, k, v, do, lse, delta,
                tok_idx, unit_block, unit_start, unit_end, row0, row_end, part_k, part_v)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    launch(kernel_key("selection_bwd_reduce", q, k, v.shape[3], scale, **params), part_k, part_v, block_unit_start,
           row0, row_end, dk, dv)
    return dq, dk, dv


@selection_attention_bwd.register_fake
def _(do, dlse, q, k, v, o, lse, block_indices, sel_block, scale, seq_start=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("nsa_codegen::gate_combine_bwd", mutates_args=())
def gate_combine_bwd(do: torch.Tensor, o_cmp: Optional[torch.Tensor], g_cmp: Optional[torch.Tensor],
                     o_slc: Optional[torch.Tensor], g_slc: Optional[torch.Tensor], o_win: Optional[torch.Tensor],
                     g_win: Optional[torch.Tensor], kv_heads: int) -> list[torch.Tensor]:
    """[do_x, dg_x for each branch given, in cmp, slc, win order]: do_x = g_x * do, dg_x = sum_d do * o_x."""
    pairs = [(n, o, g) for n, o, g in (("cmp", o_cmp, g_cmp), ("slc", o_slc, g_slc), ("win", o_win, g_win))
             if o is not None]
    first = pairs[0][1]
    grads = {n: (empty(o.shape, o.dtype, o.device), empty(g.shape, g.dtype, g.device)) for n, o, g in pairs}
    if first.shape[1]:
        launch(gate_key("gate_combine_bwd", first, kv_heads, pairs), contiguous(do.to(first.dtype)),
                *gate_slots({n: (contiguous(o), contiguous(g)) for n, o, g in pairs}), *gate_slots(grads))
    return [x for n, _, _ in pairs for x in grads[n]]


@gate_combine_bwd.register_fake
def _(do, o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, kv_heads):
    out = []
    for o, g in ((o_cmp, g_cmp), (o_slc, g_slc), (o_win, g_win)):
        if o is not None:
            out += [torch.empty_like(o), torch.empty_like(g)]
    return out


def setup_compression(ctx, inputs, output):
    q, k_cmp, v_cmp, block, stride, first_block, scale, seq_start, cmp_start = inputs
    ctx.save_for_backward(q, k_cmp, v_cmp, seq_start, cmp_start, *output)   # (it takes packs)
    ctx.params = (block, stride, first_block, scale)


def backward_compression(ctx, do, dlse):
    q, k_cmp, v_cmp, seq_start, cmp_start, o, lse = ctx.saved_tensors
    dq, dk, dv = compression_attention_bwd(do, dlse, q, k_cmp, v_cmp, o, lse, *ctx.params, seq_start, cmp_start)
    return dq, dk, dv, None, None, None, None, None, None


def setup_window(ctx, inputs, output):
    q, k, v, window, scale, seq_start = inputs
    ctx.save_for_backward(q, k, v, seq_start, *output)   # (the window backward takes packs)
    ctx.params = (window, scale)


def backward_window(ctx, do, dlse):
    q, k, v, seq_start, o, lse = ctx.saved_tensors
    dq, dk, dv = window_attention_bwd(do, dlse, q, k, v, o, lse, *ctx.params, seq_start)
    return dq, dk, dv, None, None, None


def setup_selection(ctx, inputs, output):
    q, k, v, block_indices, sel_block, scale, seq_start = inputs
    ctx.save_for_backward(q, k, v, block_indices, seq_start, *output)   # (it takes packs)
    ctx.params = (sel_block, scale)


def backward_selection(ctx, do, dlse):
    q, k, v, block_indices, seq_start, o, lse = ctx.saved_tensors
    dq, dk, dv = selection_attention_bwd(do, dlse, q, k, v, o, lse, block_indices, *ctx.params, seq_start)
    return dq, dk, dv, None, None, None, None


def setup_gate(ctx, inputs, output):
    ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in inputs[:6]))
    ctx.present = tuple(x is not None for x in inputs[:6])
    ctx.kv_heads = inputs[6]


def backward_gate(ctx, do):
    saved = [x if p else None for x, p in zip(ctx.saved_tensors, ctx.present)]
    grads = iter(gate_combine_bwd(do, *saved, ctx.kv_heads))
    out = []
    for i in range(0, 6, 2):
        if ctx.present[i]:
            out += [next(grads), next(grads)]
        else:
            out += [None, None]
    return (*out, None)
