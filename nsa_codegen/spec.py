"""The declarative NSA spec: one frozen dataclass tree, YAML in and out, validated.

A spec says *what* attention to compute (heads, head dims, the three branches and their block
sizes); it says nothing about how (that is the schedule's job). Every field has one meaning,
documented in `nsa_codegen.reference`. Two levels of checking:
  validity   NSA's own rules (positive sizes, stride | block, top_n >= initial + local, ...): an
             invalid spec raises `SpecError` naming the field; the reference and the layer run
             every valid spec (on the CPU, or on CUDA through the reference);
  kernels    what the compiled kernels cover (`kernel_support`, the SUPPORTED_* matrix below):
             lowering raises `KernelSupportError` naming the field, the kernel kinds it concerns
             and the supported values.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

DTYPES = ("bfloat16", "float16", "float32")  # valid specs (the reference computes in any of them)
POOLS = ("mlp", "mean")
# The compiled kernels' support matrix.
SUPPORTED_DTYPES = ("bfloat16", "float16")
SUPPORTED_HEAD_DIMS = (64, 128, 192, 256)
SUPPORTED_V_HEAD_DIMS = (64, 128)
SUPPORTED_GROUPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SUPPORTED_CMP_BLOCKS = (16, 32, 64, 128, 256)
SUPPORTED_SEL_BLOCKS = (32, 64, 128)
MAX_TOP_N = 32
WINDOW_RANGE = (1, 4096)  # a window is 0 (off) or in this closed range (4096: the decode kernels' bound)


class SpecError(ValueError):
    """An NSA spec field holds an invalid value."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


class KernelSupportError(SpecError):
    """A valid spec the compiled kernels do not cover (the reference still runs it)."""


@dataclass(frozen=True)
class CompressionBranch:
    """Compressed block i covers tokens [i*stride, i*stride + block); phi pools it to one key/value."""

    block: int = 32
    stride: int = 16
    pool: str = "mlp"
    first_block: int = 0


@dataclass(frozen=True)
class SelectionBranch:
    """Top-n selection of blocks of `block` tokens; `initial` first and `local` latest are forced."""

    block: int = 64
    top_n: int = 16
    initial: int = 1
    local: int = 2


@dataclass(frozen=True)
class WindowBranch:
    """Sliding window: query t sees keys (t - size, t]. size 0 switches the branch off."""

    size: int = 512


@dataclass(frozen=True)
class NSASpec:
    """One NSA attention layer, declaratively. None for a branch switches it off."""

    heads: int = 64
    kv_heads: int = 4
    head_dim: int = 192
    v_head_dim: int | None = None
    dtype: str = "bfloat16"
    causal: bool = True
    scale: float | None = None
    compression: CompressionBranch | None = field(default_factory=CompressionBranch)
    selection: SelectionBranch | None = field(default_factory=SelectionBranch)
    window: WindowBranch | None = field(default_factory=WindowBranch)

    def __post_init__(self):
        # Branches may be given as mappings (as in YAML); coerce them to their dataclasses.
        for name, branch_cls in (("compression", CompressionBranch), ("selection", SelectionBranch),
                                 ("window", WindowBranch)):
            object.__setattr__(self, name, _branch_from(name, branch_cls, getattr(self, name)))
        if self.v_head_dim is None:
            # Default: Dv = Dk, or 128 where Dk is one of the kernels' head dims wider than any of
            # their Dv (the paper's 192 / 128).
            dv = 128 if self.head_dim in SUPPORTED_HEAD_DIMS and self.head_dim > 128 else self.head_dim
            object.__setattr__(self, "v_head_dim", dv)
        if isinstance(self.window, WindowBranch) and self.window.size == 0:
            object.__setattr__(self, "window", None)
        validate(self)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def group(self) -> int:
        """G = heads / kv_heads query heads share one KV head and one block selection."""
        return self.heads // self.kv_heads

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def window_size(self) -> int:
        return self.window.size if self.window is not None else 0

    # ---- YAML / dict ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NSASpec":
        if not isinstance(data, Mapping):
            raise SpecError("spec", f"expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(unknown[0], f"unknown field; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> "NSASpec":
        """Parse YAML text, or read it from a path."""
        text = str(text_or_path)
        if "\n" not in text and text.endswith((".yaml", ".yml")) and not os.path.exists(text):
            raise SpecError("spec", f"no such file: {text}")
        if isinstance(text_or_path, os.PathLike) or ("\n" not in text and os.path.exists(text)):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError("spec", f"not valid YAML: {e}") from None
        if data is None:
            raise SpecError("spec", "empty document")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["window"] is None:
            d["window"] = {"size": 0}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _branch_from(name: str, branch_cls, value):
    if value is None or isinstance(value, branch_cls):
        return value
    if value is False:
        return None
    if not isinstance(value, Mapping):
        raise SpecError(name, f"expected a mapping of {[f.name for f in dataclasses.fields(branch_cls)]} or null")
    known = {f.name for f in dataclasses.fields(branch_cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise SpecError(f"{name}.{unknown[0]}", f"unknown field; known fields are {sorted(known)}")
    return branch_cls(**value)


def _int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(name, f"must be >= {minimum}, got {value}")


def _one_of(name: str, value, supported) -> None:
    if value not in supported:
        raise SpecError(name, f"{value!r} is not supported; supported: {list(supported)}")


def validate(spec: NSASpec) -> None:
    """Raise SpecError for the first field that breaks NSA's own rules (not the kernels' matrix:
    see kernel_support)."""
    _int("heads", spec.heads)
    _int("kv_heads", spec.kv_heads)
    if spec.heads % spec.kv_heads:
        raise SpecError("kv_heads", f"heads ({spec.heads}) must be divisible by kv_heads ({spec.kv_heads})")
    _int("head_dim", spec.head_dim)
    _int("v_head_dim", spec.v_head_dim)
    _one_of("dtype", spec.dtype, DTYPES)
    if spec.causal is not True:
        raise SpecError("causal", "only causal NSA is supported (causal: true)")
    if spec.scale is not None:
        if isinstance(spec.scale, bool) or not isinstance(spec.scale, (int, float)) or not spec.scale > 0 \
                or not math.isfinite(spec.scale):
            raise SpecError("scale", f"must be a positive finite number or null, got {spec.scale!r}")
    c, s, w = spec.compression, spec.selection, spec.window
    if c is not None:
        if not isinstance(c, CompressionBranch):
            raise SpecError("compression", "must be a CompressionBranch or null")
        _int("compression.block", c.block)
        _int("compression.stride", c.stride)
        if c.block % c.stride:
            raise SpecError("compression.stride", f"stride ({c.stride}) must divide compression.block ({c.block})")
        _one_of("compression.pool", c.pool, POOLS)
        _int("compression.first_block", c.first_block, minimum=0)
    if s is not None:
        if not isinstance(s, SelectionBranch):
            raise SpecError("selection", "must be a SelectionBranch or null")
        _int("selection.block", s.block)
        _int("selection.top_n", s.top_n)
        _int("selection.initial", s.initial, minimum=0)
        _int("selection.local", s.local, minimum=0)
        if s.top_n < s.initial + s.local:
            raise SpecError("selection.top_n", f"top_n ({s.top_n}) must be >= initial + local "
                                               f"({s.initial} + {s.local})")
        if c is not None and s.block % c.stride:
            raise SpecError("selection.block", f"compression.stride ({c.stride}) must divide selection.block "
                                               f"({s.block}) so scores map onto selection blocks")
    if w is not None:
        if not isinstance(w, WindowBranch):
            raise SpecError("window", "must be a WindowBranch or null")
        _int("window.size", w.size, minimum=0)
    if c is None and s is None and w is None:
        raise SpecError("spec", "every branch is switched off; enable compression, selection or window")


# Kernel kinds each spec field concerns (for kernel-support errors).
_ALL = "every kernel"
_FIELD_KINDS = {
    "group (heads / kv_heads)": _ALL, "head_dim": _ALL, "v_head_dim": _ALL, "dtype": _ALL,
    "compression.block": "compression_fwd, selection_topn, compression_bwd_*, decode_cmp / decode_topn",
    "selection.block": "selection_topn, selection_fwd, selection_bwd_*, decode_topn / decode_sparse",
    "selection.top_n": "selection_topn, selection_fwd, selection_bwd_*, decode_topn / decode_sparse",
    "window.size": "window_fwd, window_bwd_*, decode_sparse",
}


def kernel_support(spec: NSASpec) -> list[tuple[str, str]]:
    """(field, why) for every field of a valid spec outside the compiled kernels' support matrix;
    empty when the kernels cover the spec."""
    out = []

    def need(name, value, ok, supported):
        if not ok:
            out.append((name, f"{value!r} is not supported by the kernels ({_FIELD_KINDS[name]}); "
                              f"supported: {supported}"))
    need("group (heads / kv_heads)", spec.group, spec.group in SUPPORTED_GROUPS, list(SUPPORTED_GROUPS))
    need("head_dim", spec.head_dim, spec.head_dim in SUPPORTED_HEAD_DIMS, list(SUPPORTED_HEAD_DIMS))
    need("v_head_dim", spec.v_head_dim, spec.v_head_dim in SUPPORTED_V_HEAD_DIMS, list(SUPPORTED_V_HEAD_DIMS))
    need("dtype", spec.dtype, spec.dtype in SUPPORTED_DTYPES, list(SUPPORTED_DTYPES))
    c, s, w = spec.compression, spec.selection, spec.window
    if c is not None:
        need("compression.block", c.block, c.block in SUPPORTED_CMP_BLOCKS, list(SUPPORTED_CMP_BLOCKS))
    if s is not None:
        need("selection.block", s.block, s.block in SUPPORTED_SEL_BLOCKS, list(SUPPORTED_SEL_BLOCKS))
        need("selection.top_n", s.top_n, s.top_n <= MAX_TOP_N, f"1..{MAX_TOP_N}")
    if w is not None:
        lo, hi = WINDOW_RANGE
        need("window.size", w.size, lo <= w.size <= hi, f"{lo}..{hi} (or 0: off)")
    return out


def check_kernel_support(spec: NSASpec) -> None:
    """Raise KernelSupportError naming every field of `spec` the kernels do not cover."""
    problems = kernel_support(spec)
    if problems:
        raise KernelSupportError(problems[0][0], "; ".join(f"{n}: {why}" if i else why
                                                           for i, (n, why) in enumerate(problems))
                                 + " -- the reference (nsa_codegen.reference, backend='reference') runs this spec")
