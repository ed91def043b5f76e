"""Kernel dtypes and the output buffers the ops and the decode step allocate for kernels to fill."""
from __future__ import annotations

import os

import torch

# The torch dtypes the kernels take, by the spec's name for them.
KERNEL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def poisoned() -> bool:
    """Tests set NSA_CODEGEN_POISON_OUTPUTS=1 so that every element a kernel fails to write shows up
    as NaN (floats) or -7 (integers)."""
    return os.environ.get("NSA_CODEGEN_POISON_OUTPUTS") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or filled with NaN / -7 under NSA_CODEGEN_POISON_OUTPUTS=1."""
    if not poisoned():
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -7, dtype=dtype, device=device)
