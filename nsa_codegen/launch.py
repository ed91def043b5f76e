"""What every op does around a kernel launch: check its tensors, name its kernel, allocate its
outputs, launch it with a clear error.

The ops (nsa_codegen.ops, nsa_codegen.ops_backward) derive a kernel's key from their tensors'
shapes here (`kernel_key`), through `KernelKey.make`, as lowering does from the spec:
tests/test_ops_plan.py checks that both name the same kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from .buffers import KERNEL_DTYPES, empty
from .cache import get_kernel
from .kernel_key import KernelKey
from .lowering import arch_of_capability
from .spec import SUPPORTED_GROUPS, SUPPORTED_HEAD_DIMS, SUPPORTED_V_HEAD_DIMS


def is_gpu(t: torch.Tensor) -> bool:
    """Whether t lives where the kernels run (a seam for CPU tests of the launch path)."""
    return t.is_cuda


def check_tensor(name: str, t: torch.Tensor, ndim: int, like: Optional[torch.Tensor] = None, dtype=None):
    """Raise naming `name` unless t is an ndim-D CUDA tensor of `dtype` (else like's dtype, else a
    kernel dtype) on like's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(t.shape)}")
    if not is_gpu(t):
        raise ValueError(f"{name} must be a CUDA tensor (the kernels run on the GPU), got device {t.device}; "
                         f"use nsa_codegen.reference on the CPU")
    want = dtype if dtype is not None else (like.dtype if like is not None else None)
    if want is None and t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be bfloat16 or float16, got {t.dtype}")
    if want is not None and t.dtype != want:
        raise ValueError(f"{name} must be {want}{' (like q)' if dtype is None else ''}, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but q is on {like.device}")


def arch_of(t: torch.Tensor) -> str:
    """The arch whose kernels run on t's device (sm90 / sm80)."""
    return arch_of_capability(*torch.cuda.get_device_capability(t.device))


def check_heads(q, k, what="k"):
    """(H, G) of q [B, T, HQ, Dk] over k [B, *, H, Dk], or a ValueError naming what the kernels lack."""
    HQ, H = q.shape[2], k.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"q heads ({HQ}) must be a multiple of {what} heads ({H})")
    G = HQ // H
    if G not in SUPPORTED_GROUPS:
        raise ValueError(f"group HQ/H = {G} is not supported; supported: {list(SUPPORTED_GROUPS)}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head dim {q.shape[3]} is not supported; supported: {list(SUPPORTED_HEAD_DIMS)}")
    return H, G


def kernel_key(kind, q, k, v_dim, scale, **params) -> KernelKey:
    """The problem key of `kind` for q [B, T, HQ, Dk] and k [B, *, H, Dk] (v_dim: Dv, 0 if no V;
    scale < 0: 1/sqrt(Dk); params: the kind's problem parameters)."""
    H, G = check_heads(q, k)
    if v_dim and v_dim not in SUPPORTED_V_HEAD_DIMS:
        raise ValueError(f"v head dim {v_dim} is not supported; supported: {list(SUPPORTED_V_HEAD_DIMS)}")
    return KernelKey.make(arch=arch_of(q), kind=kind, dtype=KERNEL_DTYPES[q.dtype], head_dim=q.shape[3], v_head_dim=v_dim,
                          kv_heads=H, group=G, scale=None if scale < 0 else float(scale), **params)


def kernel(key: KernelKey):
    """The compiled kernel of a problem key (nsa_codegen.cache.get_kernel)."""
    return get_kernel(key)


def launch(key: KernelKey, *tensors):
    """Launch the problem's kernel on tensors (its inputs, then its preallocated outputs)."""
    run_kernel(kernel(key), *tensors)


def run_kernel(kernel, *tensors):
    """kernel(*tensors), a failure re-raised naming the kernel's key."""
    try:
        kernel(*tensors)
    except Exception as e:
        raise RuntimeError(f"launching {kernel.key} failed: {type(e).__name__}: {e}") from e


def contiguous(x):
    return x if x.is_contiguous() else x.contiguous()


def token_map(name: str, m: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """A per-token int32 map [B, T] of q's tokens (seq_start / cmp_start, nsa_codegen.packing): m
    checked, or zeros (an unpacked batch) where m is None."""
    B, T = q.shape[:2]
    if m is None:
        return torch.zeros(B, T, dtype=torch.int32, device=q.device)
    check_tensor(name, m, 2, dtype=torch.int32)
    if tuple(m.shape) != (B, T) or m.device != q.device:
        raise ValueError(f"{name} must be an int32 [B, T] = [{B}, {T}] tensor on {q.device}, "
                         f"got {list(m.shape)} on {m.device}")
    return contiguous(m)


def pack_maps(op: str, q: torch.Tensor, seq_start: Optional[torch.Tensor], cmp_start: Optional[torch.Tensor]):
    """(seq_start, cmp_start) of a kind that reads compressed rows: both checked (token_map), or both
    zeros (an unpacked batch). One without the other would read the missing map as zeros: a wrong
    answer for a pack, so it is an error."""
    if (seq_start is None) != (cmp_start is None):
        raise ValueError(f"{op}: a pack needs both seq_start and cmp_start (nsa_codegen.packing.packed_maps), "
                         f"got only {'seq_start' if cmp_start is None else 'cmp_start'}")
    return token_map("seq_start", seq_start, q), token_map("cmp_start", cmp_start, q)


def attend(key: KernelKey, q: torch.Tensor, v_dim: int, *inputs: torch.Tensor):
    """Allocate o [B, T, HQ, v_dim] (q's dtype) and lse [B, T, HQ] float32, launch key's kernel on
    (*inputs, o, lse) made contiguous, and return (o, lse)."""
    B, T, HQ, _ = q.shape
    o = empty((B, T, HQ, v_dim), q.dtype, q.device)
    lse = empty((B, T, HQ), torch.float32, q.device)
    if T:
        launch(key, *(contiguous(x) for x in inputs), o, lse)
    return o, lse


def attend_fake(q: torch.Tensor, v_dim: int):
    """attend's outputs for torch.compile's fake tensors: o [B, T, HQ, v_dim], lse [B, T, HQ] float32."""
    B, T, HQ, _ = q.shape
    return q.new_empty(B, T, HQ, v_dim), q.new_empty(B, T, HQ, dtype=torch.float32)


def gate_key(kind: str, first: torch.Tensor, kv_heads: int, pairs) -> KernelKey:
    """The gate kernel's key (gate_combine / _bwd) for branch outputs like first [B, T, HQ, Dv];
    pairs: (branch name, o, g) of the branches present, in cmp, slc, win order."""
    B, T, HQ, Dv = first.shape
    return KernelKey.make(arch=arch_of(first), kind=kind, dtype=KERNEL_DTYPES[first.dtype], head_dim=0, v_head_dim=Dv,
                          kv_heads=kv_heads, group=HQ // kv_heads, branches=".".join(n for n, _, _ in pairs))


def gate_slots(per_branch: dict) -> list:
    """The kernel's cmp, slc, win slots: a branch that is off is never read or written, so the first
    present branch's tensors (of the right shape) fill its slots."""
    filler = next(iter(per_branch.values()))
    return [x for n in ("cmp", "slc", "win") for x in per_branch.get(n, filler)]
