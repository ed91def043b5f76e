"""PyTorch ops over the compiled kernels.

Per-branch ops (torch.library custom ops, each with a fake implementation for torch.compile):
  nsa_codegen::compression_attention(q, k_cmp, v_cmp, block, stride, first_block, scale,
                                     seq_start=None, cmp_start=None) -> (o, lse)
  nsa_codegen::selection_topn(q, k_cmp, lse, block, stride, first_block, sel_block, top_n, initial,
                              local, scale, seq_start=None, cmp_start=None, cu_seqlens=None)
                              -> (block_indices int32, block_counts int32)
  nsa_codegen::selection_attention(q, k, v, block_indices, sel_block, scale, seq_start=None) -> (o, lse)
  nsa_codegen::window_attention(q, k, v, window, scale, seq_start=None) -> (o, lse)
  nsa_codegen::gate_combine(o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, kv_heads) -> o
and `nsa_attention(...)`, the whole forward, which matches `nsa_codegen.reference.nsa_reference`.
Every op but selection_topn (a discrete choice, not differentiated) is differentiable: its
autograd calls a backward custom op (`*_bwd`, also with a fake, in nsa_codegen.ops_backward) that
runs the backward kernels. nsa_codegen.launch has what every op does around a launch.
Layouts: q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv], k_cmp [B, N, H, Dk], o [B, T, HQ, Dv],
lse [B, T, HQ] float32 (natural log), block_indices [B, T, H, n]. Scale < 0 means 1/sqrt(Dk).
seq_start / cmp_start [B, T] int32 (nsa_codegen.packing) run a packed batch in one launch: token t
belongs to the sequence starting at token seq_start[t], whose compressed rows start at cmp_start[t];
None is an unpacked batch (selection_topn also takes the pack's cu_seqlens, for its tile table); their
backwards take the same maps.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .buffers import KERNEL_DTYPES, empty
from . import context_parallel, packing, value_guard
from .kernel_key import KernelKey
from .launch import (arch_of, attend, attend_fake, check_tensor, contiguous, gate_key, gate_slots, kernel,
                     kernel_key, launch, pack_maps, run_kernel, token_map)
from .lowering import lower_to_plan
from .ops_backward import (backward_compression, backward_gate, backward_selection, backward_window,
                           compression_attention_bwd, gate_combine_bwd, selection_attention_bwd,
                           selection_block_units, setup_compression, setup_gate, setup_selection, setup_window,
                           window_attention_bwd)
from .spec import SUPPORTED_GROUPS, NSASpec

# The backward ops live in nsa_codegen.ops_backward; they are part of this module's API too.
__all__ = ["compression_attention", "selection_topn", "selection_attention", "window_attention", "gate_combine",
           "compression_attention_bwd", "selection_attention_bwd", "window_attention_bwd", "gate_combine_bwd",
           "selection_block_units", "nsa_attention"]


# ------------------------------------------------------------------------------------------------
# Per-branch ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("nsa_codegen::compression_attention", mutates_args=())
def compression_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block: int, stride: int,
                          first_block: int, scale: float, seq_start: Optional[torch.Tensor] = None,
                          cmp_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("q", q, 4)
    check_tensor("k_cmp", k_cmp, 4, like=q)
    check_tensor("v_cmp", v_cmp, 4, like=q)
    B, T, HQ, _ = q.shape
    key = kernel_key("compression_fwd", q, k_cmp, v_cmp.shape[3], scale, cmp_block=block, stride=stride,
               first_block=first_block)
    if k_cmp.shape[1] == 0:  # T < block: no compressed block exists yet, for any query
        return (q.new_zeros(B, T, HQ, v_cmp.shape[3]),
                torch.full((B, T, HQ), float("-inf"), device=q.device))
    return attend(key, q, v_cmp.shape[3], q, k_cmp, v_cmp, *pack_maps("compression_attention", q, seq_start,
                                                                       cmp_start))


@compression_attention.register_fake
def _(q, k_cmp, v_cmp, block, stride, first_block, scale, seq_start=None, cmp_start=None):
    return attend_fake(q, v_cmp.shape[3])


@torch.library.custom_op("nsa_codegen::selection_topn", mutates_args=())
def selection_topn(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, block: int, stride: int,
                   first_block: int, sel_block: int, top_n: int, initial: int, local: int, scale: float,
                   seq_start: Optional[torch.Tensor] = None, cmp_start: Optional[torch.Tensor] = None,
                   cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("q", q, 4)
    check_tensor("k_cmp", k_cmp, 4, like=q)
    check_tensor("lse", lse, 3, dtype=torch.float32)
    B, T, HQ, _ = q.shape
    H = k_cmp.shape[2]
    key = kernel_key("selection_topn", q, k_cmp, 0, scale, cmp_block=block, stride=stride, first_block=first_block,
               sel_block=sel_block, top_n=top_n, initial=initial, local=local)
    maps = pack_maps("selection_topn", q, seq_start, cmp_start)
    if (seq_start is None) != (cu_seqlens is None):
        raise ValueError("selection_topn: a pack needs both seq_start / cmp_start and cu_seqlens (the tile table)")
    if k_cmp.shape[1] == 0 and cu_seqlens is None:
        # no compressed block: every score is 0, only visibility and forcing matter
        scores = torch.zeros(B, T, H, reference.num_selection_blocks(T, sel_block), device=q.device)
        idx = reference.select_top_n(scores, sel_block, top_n, initial, local)
        return idx, (idx >= 0).sum(-1, dtype=torch.int32)
    idx = empty((B, T, H, top_n), torch.int32, q.device)
    cnt = empty((B, T, H), torch.int32, q.device)
    if T:
        kern = kernel(key)
        tiles = topn_tile_starts(kern.key, T, cu_seqlens, q.device)
        k_cmp = k_cmp if k_cmp.shape[1] else k_cmp.new_zeros(B, 1, *k_cmp.shape[2:])   # (no row is read)
        run_kernel(kern, contiguous(q), contiguous(k_cmp), contiguous(lse), *maps, tiles, idx, cnt)
    return idx, cnt


def topn_tile_starts(key: KernelKey, T: int, cu_seqlens=None, device=None) -> torch.Tensor:
    """The top-n kernel's tile table (packing.tile_starts) for its scheduled key: tiles of
    block_M // G tokens, never across sequences. The tile size comes from the schedule, not the
    template, so a prebuilt kernel runs without importing TileLang."""
    return packing.tile_starts(T, dict(key.schedule)["block_M"] // key.group, cu_seqlens, device)


@selection_topn.register_fake
def _(q, k_cmp, lse, block, stride, first_block, sel_block, top_n, initial, local, scale, seq_start=None,
      cmp_start=None, cu_seqlens=None):
    B, T, _, _ = q.shape
    H = k_cmp.shape[2]
    return (q.new_empty(B, T, H, top_n, dtype=torch.int32), q.new_empty(B, T, H, dtype=torch.int32))


@torch.library.custom_op("nsa_codegen::selection_attention", mutates_args=())
def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                        sel_block: int, scale: float,
                        seq_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("q", q, 4)
    check_tensor("k", k, 4, like=q)
    check_tensor("v", v, 4, like=q)
    check_tensor("block_indices", block_indices, 4, dtype=torch.int32)
    B, T, HQ, _ = q.shape
    if tuple(block_indices.shape[:3]) != (B, T, k.shape[2]):
        raise ValueError(f"block_indices must be [B, T, H, n] = [{B}, {T}, {k.shape[2]}, n], "
                         f"got {list(block_indices.shape)}")
    key = kernel_key("selection_fwd", q, k, v.shape[3], scale, sel_block=sel_block, top_n=block_indices.shape[3])
    return attend(key, q, v.shape[3], q, k, v, block_indices, token_map("seq_start", seq_start, q))


@selection_attention.register_fake
def _(q, k, v, block_indices, sel_block, scale, seq_start=None):
    return attend_fake(q, v.shape[3])


@torch.library.custom_op("nsa_codegen::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                     seq_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("q", q, 4)
    check_tensor("k", k, 4, like=q)
    check_tensor("v", v, 4, like=q)
    key = kernel_key("window_fwd", q, k, v.shape[3], scale, window=window)
    return attend(key, q, v.shape[3], q, k, v, token_map("seq_start", seq_start, q))


@window_attention.register_fake
def _(q, k, v, window, scale, seq_start=None):
    return attend_fake(q, v.shape[3])


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
    check_tensor(f"o_{pairs[0][0]}", first, 4)
    B, T, HQ, Dv = first.shape
    for n, o, g in pairs:
        check_tensor(f"o_{n}", o, 4, like=first)
        if g is None:
            raise ValueError(f"g_{n} is required with o_{n}")
        check_tensor(f"g_{n}", g, 3, like=first)
        if tuple(o.shape) != (B, T, HQ, Dv) or tuple(g.shape) != (B, T, HQ):
            raise ValueError(f"o_{n} must be [{B}, {T}, {HQ}, {Dv}] and g_{n} [{B}, {T}, {HQ}], "
                             f"got {list(o.shape)} and {list(g.shape)}")
    if HQ % kv_heads or HQ // kv_heads not in SUPPORTED_GROUPS:
        raise ValueError(f"kv_heads ({kv_heads}) must divide the {HQ} heads into a supported group")
    out = empty((B, T, HQ, Dv), first.dtype, first.device)
    if T:
        launch(gate_key("gate_combine", first, kv_heads, pairs),
                *gate_slots({n: (contiguous(o), contiguous(g)) for n, o, g in pairs}), out)
    return out


@gate_combine.register_fake
def _(o_cmp, g_cmp, o_slc, g_slc, o_win, g_win, kv_heads):
    first = next(o for o in (o_cmp, o_slc, o_win) if o is not None)
    return torch.empty_like(first)


compression_attention.register_autograd(backward_compression, setup_context=setup_compression)
window_attention.register_autograd(backward_window, setup_context=setup_window)
selection_attention.register_autograd(backward_selection, setup_context=setup_selection)
gate_combine.register_autograd(backward_gate, setup_context=setup_gate)


# ------------------------------------------------------------------------------------------------
# The whole forward
# ------------------------------------------------------------------------------------------------
def _check_against_spec(q, k, v, spec: NSASpec):
    check_tensor("q", q, 4)
    if KERNEL_DTYPES[q.dtype] != spec.dtype:
        raise ValueError(f"q is {q.dtype} but the spec's dtype is {spec.dtype}")
    reference.check_inputs(q, k, v, spec)
    check_tensor("k", k, 4, like=q)
    check_tensor("v", v, 4, like=q)


def nsa_attention(q, k, v, g_cmp, g_slc, g_win, spec: NSASpec, *, k_cmp=None, v_cmp=None, k_win=None, v_win=None,
                  block_indices=None, cu_seqlens=None, return_indices: bool = False, cp_group=None,
                  cp_layout: str = "zigzag"):
    """NSA forward on the GPU kernels; same contract as `nsa_codegen.reference.nsa_reference`.

    q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv], gates [B, T, HQ] -> o [B, T, HQ, Dv].
    k_cmp / v_cmp default to mean pooling of k / v; k_win / v_win default to k / v.
    cu_seqlens [S+1] with B == 1 packs S sequences (k_cmp / v_cmp, if given, pack each sequence's
    compressed rows back to back): a pack runs one launch per kernel, forward and backward. A
    `packing.Pack` in its place is checked and counted once for every call (every layer) that shares it.
    cp_group: the sequence is split across this torch.distributed group (context parallelism): every
    tensor is this rank's shard in layout cp_layout, k_cmp / v_cmp all rows of the whole sequence
    (`nsa_codegen.context_parallel.nsa_context_parallel`; it runs the reference math so far).
    """
    if cp_group is not None:
        if cu_seqlens is not None or return_indices:
            raise NotImplementedError("cp_group with cu_seqlens or return_indices is not supported yet")
        return context_parallel.nsa_context_parallel(q, k, v, g_cmp, g_slc, g_win, spec, group=cp_group,
                                                     layout=cp_layout, k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win,
                                                     v_win=v_win, block_indices=block_indices)
    if not isinstance(spec, NSASpec):
        raise TypeError(f"spec must be an NSASpec, got {type(spec).__name__}")
    _check_against_spec(q, k, v, spec)
    B, T = q.shape[:2]
    c, s = spec.compression, spec.selection
    pack = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens, q must be packed as [1, total, HQ, D], got batch {B}")
        if isinstance(cu_seqlens, packing.Pack):   # checked and counted once, shared by the layers
            if cu_seqlens.total != T:
                raise ValueError(f"the Pack covers {cu_seqlens.total} tokens, q has {T}")
            pack = cu_seqlens
        else:   # checked here (one host sync; under torch.compile the type only), counted by the Pack
            pack = packing.Pack(cu_seqlens, T)
        pack = pack.to(q.device)
        cu_seqlens = pack.cu_seqlens
        maps = pack.maps(c)
    else:
        maps = {"seq_start": None, "cmp_start": None}   # an unpacked batch: the ops pass zeros
    if s is not None and block_indices is not None:
        reference.check_block_indices(block_indices, q, spec)
    plan = lower_to_plan(spec, arch_of(q), explicit_indices=block_indices is not None)
    scale = spec.scale if spec.scale is not None else -1.0
    env = {"q": q, "k": k, "v": v, "k_win": k if k_win is None else k_win, "v_win": v if v_win is None else v_win,
           "block_indices": None if block_indices is None else block_indices.to(torch.int32), **maps}
    if c is not None:
        env["k_cmp"], env["v_cmp"] = _compressed(k, v, k_cmp, v_cmp, c, cu_seqlens,
                                                 None if pack is None else pack.rows(c))
    for gate, _ in plan.combine:
        env[gate] = _gate(gate, {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win}[gate], q)
    bad = _finite_value_rows(env, spec, win_is_v=v_win is None)
    for call in plan.calls:
        try:
            run = _FORWARD_RUNNERS[call.kind]
        except KeyError:
            raise NotImplementedError(f"{call.key}: no op runs kernel kind {call.kind!r}") from None
        if call.kind == "gate_combine":
            _poison_gates(env, bad, spec, T)
        outs = run(spec, scale, cu_seqlens, **{name: env[name] for name in call.inputs})
        env.update(zip(call.outputs, outs))
    out = env["o"]
    return (out, env["block_indices"]) if return_indices else out


def _finite_value_rows(env, spec, win_is_v: bool):
    """Replace env's value tensors by copies with non-finite elements zeroed (the kernels would spread
    them as 0 * NaN to rows that must not see them; nsa_codegen.value_guard) and return each one's
    non-finite row flags {"v": [B, T, H], "v_win": ..., "v_cmp": [B, N, H]} for the branches that are
    on. win_is_v: the window reads v itself (no k_win / v_win given): one pass serves both."""
    bad = {}
    if spec.selection is not None or (spec.window is not None and win_is_v):
        env["v"], bad["v"] = value_guard.split_finite(env["v"])
    if spec.window is not None:
        if win_is_v:
            bad["v_win"], env["v_win"] = bad["v"], env["v"]
        else:
            env["v_win"], bad["v_win"] = value_guard.split_finite(env["v_win"])
    if spec.compression is not None:
        env["v_cmp"], bad["v_cmp"] = value_guard.split_finite(env["v_cmp"])
    return bad


def _poison_gates(env, bad, spec, T):
    """NaN into the gate of each branch at the (token, KV head) pairs whose visible value rows include
    a non-finite one (nsa_codegen.value_guard), so the combine gives NaN exactly where the reference does."""
    ss, cs = env.get("seq_start"), env.get("cmp_start")
    if "v" in bad and "g_slc" in env:
        sees = value_guard.sees_nonfinite_selection(bad["v"], env["block_indices"], spec.selection.block, ss)
        env["g_slc"] = value_guard.poison_gates(env["g_slc"], sees)
    if "v_win" in bad and "g_win" in env:
        sees = value_guard.sees_nonfinite_window(bad["v_win"], spec.window.size, ss)
        env["g_win"] = value_guard.poison_gates(env["g_win"], sees)
    if "v_cmp" in bad and "g_cmp" in env:
        c = spec.compression
        sees = value_guard.sees_nonfinite_compression(bad["v_cmp"], T, c.block, c.stride, c.first_block, ss, cs)
        env["g_cmp"] = value_guard.poison_gates(env["g_cmp"], sees)


def _compressed(k, v, k_cmp, v_cmp, c, cu_seqlens, rows=None):
    """(k_cmp, v_cmp): given, checked against the row count, or mean-pooled from k / v. rows: the
    pack's row count (Pack.rows: counted once, or packing.rows_bound under torch.compile); unused
    for a batch."""
    T = k.shape[1]
    N = reference.num_compressed_blocks(T, c.block, c.stride, c.first_block) if cu_seqlens is None else rows
    if k_cmp is None or v_cmp is None:
        pool = (lambda x: reference.compress(x, c.block, c.stride, c.first_block)) if cu_seqlens is None else \
            (lambda x: packing.compress_packed(x, cu_seqlens, c.block, c.stride, c.first_block, N))
        k_cmp = pool(k) if k_cmp is None else k_cmp
        v_cmp = pool(v) if v_cmp is None else v_cmp
    if k_cmp.shape[1] != N or v_cmp.shape[1] != N:
        raise ValueError(f"k_cmp / v_cmp must have N = {N} compressed rows for T = {T}"
                         f"{' (all sequences of the pack)' if cu_seqlens is not None else ''}, "
                         f"got {k_cmp.shape[1]} / {v_cmp.shape[1]}")
    return k_cmp, v_cmp


# The plan's interpreter: per forward kind, the op that runs a call, given the spec, the scale (< 0:
# 1/sqrt(Dk)), the pack's cu_seqlens (None: a batch) and the call's input tensors by their plan
# names; it returns the call's outputs in order.
def _run_compression_fwd(spec, scale, cu_seqlens, q, k_cmp, v_cmp, seq_start, cmp_start):
    c = spec.compression
    return compression_attention(q, k_cmp, v_cmp, c.block, c.stride, c.first_block, scale, seq_start, cmp_start)


def _run_selection_topn(spec, scale, cu_seqlens, q, k_cmp, lse_cmp, seq_start, cmp_start):
    c, s = spec.compression, spec.selection
    # Top-n is not differentiated (as in the paper): its inputs are detached.
    return selection_topn(q.detach(), k_cmp.detach(), lse_cmp.detach(), c.block, c.stride, c.first_block, s.block,
                          s.top_n, s.initial, s.local, scale, seq_start, cmp_start, cu_seqlens)


def _run_selection_fwd(spec, scale, cu_seqlens, q, k, v, block_indices, seq_start):
    return selection_attention(q, k, v, block_indices, spec.selection.block, scale, seq_start)


def _run_window_fwd(spec, scale, cu_seqlens, q, k_win, v_win, seq_start):
    return window_attention(q, k_win, v_win, spec.window.size, scale, seq_start)


def _run_gate_combine(spec, scale, cu_seqlens, o_cmp=None, g_cmp=None, o_slc=None, g_slc=None, o_win=None,
                      g_win=None):
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
