"""`KernelKey`: one readable, stable name per specialized kernel.

    sm90/selection_fwd/bf16/dk192_dv128/h4_g16/bs64_n16/s-3f2a9c

arch / kind / dtype / head dims / KV heads and group / the kind's own problem parameters /
schedule hash. The cache, `generated/`, the tuning logs, the CLI and error messages all use it.
Imports nothing of ours.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

ARCHS = ("sm80", "sm90")
KINDS = ("compression_fwd", "selection_topn", "selection_fwd", "window_fwd", "gate_combine",
         "compression_bwd_dq", "compression_bwd_dkdv", "selection_bwd_dq", "selection_bwd_dkdv",
         "selection_bwd_reduce", "window_bwd_dq", "window_bwd_dkdv", "gate_combine_bwd",
         "decode_cmp", "decode_topn", "decode_sparse", "decode_combine")
DTYPE_TAGS = {"bfloat16": "bf16", "float16": "fp16"}

# The problem parameters each kind depends on, in key order, with their short tags.
KIND_PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "compression_fwd": (("cmp_block", "l"), ("stride", "d"), ("first_block", "f")),
    "selection_topn": (("cmp_block", "l"), ("stride", "d"), ("first_block", "f"), ("sel_block", "bs"),
                       ("top_n", "n"), ("initial", "i"), ("local", "loc")),
    "selection_fwd": (("sel_block", "bs"), ("top_n", "n")),
    "window_fwd": (("window", "w"),),
    "gate_combine": (("branches", "b-"),),
}
# A backward kernel depends on the same problem parameters as its forward.
_CMP = KIND_PARAMS["compression_fwd"]
KIND_PARAMS.update({
    "compression_bwd_dq": _CMP, "compression_bwd_dkdv": _CMP,
    "selection_bwd_dq": KIND_PARAMS["selection_fwd"], "selection_bwd_dkdv": KIND_PARAMS["selection_fwd"],
    "selection_bwd_reduce": KIND_PARAMS["selection_fwd"],
    "window_bwd_dq": KIND_PARAMS["window_fwd"], "window_bwd_dkdv": KIND_PARAMS["window_fwd"],
    "gate_combine_bwd": KIND_PARAMS["gate_combine"],
})
# The four decode kernels (one step against a KV cache) share one problem: every branch's
# parameters, the new queries per sequence, whether the window has its own K/V, and the bound on
# the cache length they are built for (it sizes the top-n candidate merge).
_DECODE = (KIND_PARAMS["selection_topn"] + (("window", "w"), ("q_len", "q"), ("separate_window", "sw"),
                                            ("max_seqlen", "ms")))
KIND_PARAMS.update({k: _DECODE for k in ("decode_cmp", "decode_topn", "decode_sparse", "decode_combine")})


def schedule_hash(schedule: Mapping[str, Any]) -> str:
    """Six hex digits of the canonical JSON of a schedule (order of keys does not matter)."""
    text = json.dumps(dict(schedule), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:6]


@dataclass(frozen=True)
class KernelKey:
    """What one compiled kernel is specialized for. `schedule` is None for the bare problem."""

    arch: str
    kind: str
    dtype: str  # "bfloat16" | "float16"
    head_dim: int  # 0 for kinds that never read Q/K (gate_combine)
    v_head_dim: int  # 0 for kinds that never read V (selection_topn)
    kv_heads: int
    group: int
    params: tuple[tuple[str, Any], ...]  # the kind's problem parameters, in KIND_PARAMS order
    scale: float | None = None  # None: 1/sqrt(head_dim)
    schedule: tuple[tuple[str, Any], ...] | None = field(default=None, compare=True)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; supported: {list(ARCHS)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kernel kind {self.kind!r}; known: {list(KINDS)}")
        if self.dtype not in DTYPE_TAGS:
            raise ValueError(f"unsupported dtype {self.dtype!r}; supported: {list(DTYPE_TAGS)}")
        names = [n for n, _ in KIND_PARAMS[self.kind]]
        if [n for n, _ in self.params] != names:
            raise ValueError(f"{self.kind} needs parameters {names}, got {[n for n, _ in self.params]}")

    @classmethod
    def make(cls, arch, kind, dtype, head_dim, v_head_dim, kv_heads, group, scale=None, schedule=None,
             **params) -> "KernelKey":
        if kind not in KIND_PARAMS:
            raise ValueError(f"unknown kernel kind {kind!r}; known: {list(KINDS)}")
        names = [n for n, _ in KIND_PARAMS[kind]]
        missing = [n for n in names if n not in params]
        extra = sorted(set(params) - set(names))
        if missing or extra:
            raise ValueError(f"{kind} takes parameters {names}; missing {missing}, unexpected {extra}")
        sched = None if schedule is None else tuple(sorted(dict(schedule).items()))
        return cls(arch, kind, dtype, head_dim, v_head_dim, kv_heads, group,
                   tuple((n, params[n]) for n in names), scale, sched)

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group

    @property
    def param(self) -> dict[str, Any]:
        return dict(self.params)

    def with_schedule(self, schedule: Mapping[str, Any]) -> "KernelKey":
        return replace(self, schedule=tuple(sorted(dict(schedule).items())))

    @property
    def problem(self) -> "KernelKey":
        """The same key without its schedule: what tuning searches over."""
        return replace(self, schedule=None)

    def _segments(self) -> list[str]:
        tags = dict(KIND_PARAMS[self.kind])
        p = "_".join(f"{tags[n]}{v}" for n, v in self.params)
        if self.scale is not None:
            p += f"_sc{self.scale:.6g}"
        dims = "_".join(f"{tag}{d}" for tag, d in (("dk", self.head_dim), ("dv", self.v_head_dim)) if d)
        return [self.arch, self.kind, DTYPE_TAGS[self.dtype], dims,
                f"h{self.kv_heads}_g{self.group}", p]

    @property
    def problem_id(self) -> str:
        """The key string without the schedule segment."""
        return "/".join(self._segments())

    def __str__(self) -> str:
        s = self.problem_id
        if self.schedule is not None:
            s += f"/s-{schedule_hash(dict(self.schedule))}"
        return s

    @property
    def dirname(self) -> str:
        """The key as one path component (for cache and generated/ folders)."""
        return str(self).replace("/", "__")
