"""Lowering: spec (+ arch, dtype, which inputs the caller gave) -> `KernelPlan`.

A plan is the ordered list of kernel calls that compute one NSA forward, each naming its kernel
problem (a `KernelKey` without schedule) and the tensors it reads and writes. Pure Python: no
TileLang, no torch. Tensor names: q, k, v (selection K/V), k_cmp, v_cmp, k_win, v_win, lse_cmp,
block_indices, block_counts, o_cmp, o_slc, o_win, and the gates g_cmp, g_slc, g_win.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .kernel_key import KernelKey
from .kinds import KINDS
from .spec import NSASpec, check_kernel_support

ARCH_ALIASES = {"sm90": "sm90", "sm_90": "sm90", "sm_90a": "sm90", "sm90a": "sm90", "hopper": "sm90",
                "sm80": "sm80", "sm_80": "sm80", "ampere": "sm80"}


def normalize_arch(arch: str) -> str:
    try:
        return ARCH_ALIASES[str(arch).lower()]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; supported: sm80, sm90") from None


def arch_of_capability(major: int, minor: int) -> str:
    """The arch whose kernels run on a device of this compute capability. The environment variable
    NSA_CODEGEN_ARCH=sm80 picks the sm80 kernels on an sm90 device too (they carry sm_90 code):
    how the sm80 kernels are tested on an H100."""
    if major == 9:
        native = "sm90"
    elif major >= 8:
        native = "sm80"
    else:
        raise ValueError(f"compute capability {major}.{minor} is not supported; nsa-codegen needs sm80 or newer")
    forced = os.environ.get("NSA_CODEGEN_ARCH")
    if not forced:
        return native
    arch = normalize_arch(forced)
    if arch == "sm90" and native != "sm90":
        raise ValueError(f"NSA_CODEGEN_ARCH={forced}: sm90 kernels need compute capability 9.x, "
                         f"this device is {major}.{minor}")
    return arch


@dataclass(frozen=True)
class KernelCall:
    kind: str
    key: KernelKey  # the problem; the schedule is chosen later
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class KernelPlan:
    spec: NSASpec
    arch: str
    calls: tuple[KernelCall, ...]
    # Gated sum of the branch outputs that are on: ((gate, branch output), ...)
    combine: tuple[tuple[str, str], ...]
    # The backward's kernels, in launch order (the top-n selection is not differentiated).
    backward: tuple[KernelCall, ...] = ()
    # One decode step of one new token per sequence against a KV cache of up to 128k tokens, and the
    # cmp / sparse kernels of the same step over a paged cache of DECODE_PAGE_SIZE-token pages
    # (`lower_decode` gives other q_len / cache bounds / pages); empty unless all three branches are on.
    decode: tuple[KernelCall, ...] = ()

    @property
    def all_calls(self) -> tuple[KernelCall, ...]:
        return self.calls + self.backward + self.decode

    def describe(self, backward: bool = False) -> str:
        calls = self.all_calls if backward else self.calls
        lines = [f"{c.kind:<20} {c.key}  ({', '.join(c.inputs)}) -> ({', '.join(c.outputs)})" for c in calls]
        return "\n".join(lines)


def _key_fields(spec: NSASpec, arch: str) -> dict:
    """The KernelKey fields every kernel of spec shares (kinds override what they do not read)."""
    return dict(arch=arch, dtype=spec.dtype, head_dim=spec.head_dim, v_head_dim=spec.v_head_dim,
                kv_heads=spec.kv_heads, group=spec.group, scale=spec.scale)


def lower_to_plan(spec: NSASpec, arch: str = "sm90", explicit_indices: bool = False) -> KernelPlan:
    """The kernels that compute `spec`'s forward on `arch`, in order.

    explicit_indices: the caller passes block_indices, so no scoring / top-n kernel runs. A valid spec
    the kernels do not cover raises KernelSupportError naming the fields and the kernels concerned.
    """
    arch = normalize_arch(arch)
    check_kernel_support(spec)
    c, s = spec.compression, spec.selection
    common = _key_fields(spec, arch)
    calls, combine = [], []
    if s is not None and c is None and not explicit_indices:
        raise ValueError("the compression branch is off, so the selection branch needs explicit block_indices")
    if c is not None:
        cmp_params = dict(cmp_block=c.block, stride=c.stride, first_block=c.first_block)
        calls.append(KernelCall("compression_fwd", KernelKey.make(kind="compression_fwd", **common, **cmp_params),
                                ("q", "k_cmp", "v_cmp", "seq_start", "cmp_start"), ("o_cmp", "lse_cmp")))
        combine.append(("g_cmp", "o_cmp"))
        if s is not None and not explicit_indices:
            key = KernelKey.make(kind="selection_topn", **{**common, "v_head_dim": 0}, **cmp_params, sel_block=s.block, top_n=s.top_n,
                                 initial=s.initial, local=s.local)
            # (the op builds the kernel's tile table itself, from the pack's cu_seqlens and its tile size)
            calls.append(KernelCall("selection_topn", key, ("q", "k_cmp", "lse_cmp", "seq_start", "cmp_start"),
                                    ("block_indices", "block_counts")))
    if s is not None:
        key = KernelKey.make(kind="selection_fwd", **common, sel_block=s.block, top_n=s.top_n)
        calls.append(KernelCall("selection_fwd", key, ("q", "k", "v", "block_indices", "seq_start"),
                                ("o_slc", "lse_slc")))
        combine.append(("g_slc", "o_slc"))
    if spec.window is not None:
        key = KernelKey.make(kind="window_fwd", **common, window=spec.window.size)
        calls.append(KernelCall("window_fwd", key, ("q", "k_win", "v_win", "seq_start"), ("o_win", "lse_win")))
        combine.append(("g_win", "o_win"))
    # One pass sums the gated branch outputs (fp32 math, one rounding).
    branches = ".".join(o.split("_")[1] for _, o in combine)
    key = KernelKey.make(kind="gate_combine", **{**common, "head_dim": 0, "scale": None}, branches=branches)
    calls.append(KernelCall("gate_combine", key, tuple(x for pair in combine for x in (pair[1], pair[0])), ("o",)))
    decode = ()
    if c is not None and s is not None and spec.window is not None:
        paged = tuple(x for x in lower_decode(spec, arch, page_size=DECODE_PAGE_SIZE) if x.kind.endswith("_paged"))
        decode = lower_decode(spec, arch) + paged
    return KernelPlan(spec, arch, tuple(calls), tuple(combine), _lower_backward(calls), decode)


DECODE_MIN_SEQLEN = 1 << 17


DECODE_PAGE_SIZE = 64   # PagedNSAKVCache's default page: the one the plan (and the AOT build) includes


def decode_seqlen_bucket(capacity: int) -> int:
    """The max_seqlen a decode kernel is built for, given a cache capacity: one bucket for every cache
    up to 128k tokens, then powers of two (it only sizes the top-n candidate merge)."""
    return max(DECODE_MIN_SEQLEN, 1 << (max(1, int(capacity)) - 1).bit_length())


def lower_decode(spec: NSASpec, arch: str = "sm90", q_len: int = 1, separate_window: bool = False,
                 capacity: int = DECODE_MIN_SEQLEN, page_size: int = 0) -> tuple[KernelCall, ...]:
    """The kernels of one decode step (q_len new queries per sequence) against an `NSAKVCache` of up to
    `capacity` tokens: split-KV compression attention (+ scores for top-n), chunked top-n, split-KV
    selection + window, and the combine with the gates. Needs all three branches. page_size > 0: a
    `PagedNSAKVCache` of such pages (its cmp and sparse kernels read the pools through block tables)."""
    arch = normalize_arch(arch)
    check_kernel_support(spec)
    c, s, w = spec.compression, spec.selection, spec.window
    if c is None or s is None or w is None:
        raise ValueError("decode needs all three branches (compression, selection, window) on")
    if not 1 <= int(q_len) <= 8:
        raise ValueError(f"q_len must be in 1..8, got {q_len}")
    problem = KernelKey.make(
        kind="decode_cmp", **_key_fields(spec, arch), cmp_block=c.block, stride=c.stride,
        first_block=c.first_block, sel_block=s.block, top_n=s.top_n, initial=s.initial, local=s.local,
        window=w.size, q_len=int(q_len), separate_window=int(bool(separate_window)),
        max_seqlen=decode_seqlen_bucket(capacity))
    paged = dict(problem.param, page_size=int(page_size))

    def call(kind):   # arguments as the registry lists them; the paged kinds add the page size
        key = (KernelKey.make(kind=kind, **_key_fields(spec, arch), **paged) if kind.endswith("_paged")
               else replace(problem, kind=kind))
        return KernelCall(kind, key, KINDS[kind].inputs, KINDS[kind].outputs)
    pg = "_paged" if page_size else ""
    return tuple(call(k) for k in (f"decode_cmp{pg}", "decode_topn", f"decode_sparse{pg}", "decode_combine"))


def _lower_backward(calls: list[KernelCall]) -> tuple[KernelCall, ...]:
    """Backward kernels for the forward `calls`, as the registry lists them per forward kind: the gate
    backward first, then per attention branch a query-major dq kernel (which also writes Delta) and a
    key-major dk/dv kernel; selection's dk/dv runs over a transposed block map and a deterministic
    reduction. A backward kernel's key is its forward's with another kind (the same problem parameters)."""
    first, rest = [], []
    for c in calls:
        entry = KINDS[c.kind]
        for b in entry.backward:
            inputs = b.inputs if b.inputs is not None else ("do",) + c.inputs
            outputs = b.outputs if b.outputs is not None else tuple(f"d{x}" for x in c.inputs)
            (first if entry.backward_first else rest).append(
                KernelCall(b.kind, replace(c.key, kind=b.kind), inputs, outputs))
    return tuple(first + rest)
