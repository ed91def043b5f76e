"""nsa-codegen: a compiler-style generator of Native Sparse Attention (NSA) GPU kernels.

Import costs nothing GPU-side: TileLang and the compiled kernels load on first use.
"""
from .spec import (CompressionBranch, KernelSupportError, NSASpec, SelectionBranch, SpecError, WindowBranch)
from .reference import nsa_reference
from .layer import NativeSparseAttention

__version__ = "0.1.0"

__all__ = ["NSASpec", "CompressionBranch", "SelectionBranch", "WindowBranch", "SpecError", "KernelSupportError",
           "nsa_reference", "NativeSparseAttention", "nsa_attention", "__version__"]


def __getattr__(name):
    # nsa_attention pulls in torch.library op registration; keep it lazy.
    if name == "nsa_attention":
        from .ops import nsa_attention
        return nsa_attention
    raise AttributeError(f"module 'nsa_codegen' has no attribute {name!r}")
