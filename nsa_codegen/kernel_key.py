"""`KernelKey`: one readable, stable name per specialized kernel.

    sm90/selection_fwd/bf16/dk192_dv128/h4_g16/bs64_n16/s-3f2a9c

arch / kind / dtype / head dims / KV heads and group / the kind's own problem parameters /
schedule hash. The cache, `generated/`, the tuning logs, the CLI and error messages all use it.
Its parameters per kind come from the registry (`nsa_codegen.kinds`), nothing else of ours.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .kinds import KINDS, kind as _kind_entry

ARCHS = ("sm80", "sm90")
# Shared memory per arch, bytes: (the most one program may use, opt-in; what one SM holds). sm80 is
# the A100's (163 / 164 KiB): sm80 kernels are sized for it (sm86 / sm89 parts have 99 KiB).
SHARED_MEMORY = {"sm80": (163 * 1024, 164 * 1024), "sm90": (227 * 1024, 228 * 1024)}
DTYPE_TAGS = {"bfloat16": "bf16", "float16": "fp16"}


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
    params: tuple[tuple[str, Any], ...]  # the kind's problem parameters, in registry order
    scale: float | None = None  # None: 1/sqrt(head_dim)
    schedule: tuple[tuple[str, Any], ...] | None = field(default=None, compare=True)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; supported: {list(ARCHS)}")
        entry = _kind_entry(self.kind)
        if self.dtype not in DTYPE_TAGS:
            raise ValueError(f"unsupported dtype {self.dtype!r}; supported: {list(DTYPE_TAGS)}")
        names = list(entry.param_names)
        if [n for n, _ in self.params] != names:
            raise ValueError(f"{self.kind} needs parameters {names}, got {[n for n, _ in self.params]}")

    @classmethod
    def make(cls, arch, kind, dtype, head_dim, v_head_dim, kv_heads, group, scale=None, schedule=None,
             **params) -> "KernelKey":
        """The key of `kind`'s problem. Dims a kind never reads are zeroed here, from the registry
        (head_dim and scale where it reads no Q/K, v_head_dim where it reads no V), so every caller
        (lowering, the ops, tuning) derives the same key from the same sizes."""
        entry = _kind_entry(kind)
        names = list(entry.param_names)
        if not entry.reads_qk:
            head_dim, scale = 0, None
        if not entry.reads_v:
            v_head_dim = 0
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
        tags = dict(KINDS[self.kind].params)
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
