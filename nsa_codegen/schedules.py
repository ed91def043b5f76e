"""Schedules: per arch and kernel kind, a default and a search space (schedules/<arch>.yaml).

A schedule is a flat dict of template knobs (tile sizes, threads, pipeline stages, ...). The one a
kernel uses is, in order: the best correct record for its problem in tuning_logs/<arch>/*.jsonl,
else the arch default, else the first candidate of the search space the template accepts.
"""
from __future__ import annotations

import itertools
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .kernel_key import KernelKey
from .kinds import KINDS
from .resources import schedules_dir, tuning_logs_dir


@lru_cache(maxsize=None)
def load_arch(arch: str) -> dict[str, Any]:
    path = schedules_dir() / f"{arch}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no schedules for arch {arch!r} (looked for {path})")
    data = yaml.safe_load(path.read_text())
    kernels = data.get("kernels", {})
    for kind in KINDS:
        if kind not in kernels or "default" not in kernels[kind]:
            raise ValueError(f"{path}: kernels.{kind}.default is missing")
    return data


def default_schedule(key: KernelKey) -> dict[str, Any]:
    return dict(load_arch(key.arch)["kernels"][key.kind]["default"])


def search_space(key: KernelKey) -> Iterator[dict[str, Any]]:
    """Every schedule of the kind's space (cartesian product), the default first, then by how many
    knobs differ from it (so a problem the default cannot run falls back to its nearest variant)."""
    entry = load_arch(key.arch)["kernels"][key.kind]
    default = dict(entry["default"])
    yield default
    space = entry.get("space", {})
    names = sorted(space)
    cands = [{**default, **dict(zip(names, values))} for values in itertools.product(*(space[n] for n in names))]
    yield from sorted((c for c in cands if c != default), key=lambda c: sum(c[k] != default[k] for k in c))


def in_search_space(arch: str, kind: str, schedule: dict[str, Any]) -> bool:
    """Whether every knob of `schedule` takes the kind's default value or one its space lists (the
    candidates the tuner generates: single-knob changes, greedy and exhaustive combinations)."""
    entry = load_arch(arch)["kernels"][kind]
    default, space = dict(entry["default"]), entry.get("space", {})
    return set(schedule) == set(default) and all(
        v == default[k] or v in space.get(k, ()) for k, v in schedule.items())


def tuning_dir(arch: str) -> Path:
    """Where `tune` appends records: $NSA_CODEGEN_TUNING_DIR, else ./tuning_logs."""
    root = os.environ.get("NSA_CODEGEN_TUNING_DIR")
    return (Path(root) if root else Path.cwd() / "tuning_logs") / arch


def tuning_dirs(arch: str) -> list[Path]:
    """Where records are read: the tune folder above, then the records shipped with nsa-codegen."""
    dirs = [tuning_dir(arch)]
    shipped = tuning_logs_dir()
    if shipped is not None:
        dirs.append(shipped / arch)
    return [d for d in dict.fromkeys(p.resolve() for p in dirs) if d.is_dir()]


def record_is_current(rec: dict[str, Any], kind: str) -> bool:
    """A tuning record counts only for the template text it measured (its `template` hash): after a
    template changes, its kernels fall back to the default until they are tuned again."""
    from .codegen import template_source_hash
    return rec.get("template") == template_source_hash(kind)


# A tuned schedule replaces the default only when its median beats the default's (same log, same
# template) by this fraction: the 10-30 us kernels time to about +-3% run to run, and a "win" inside
# that noise has picked schedules that were slower at other sizes (decode sparse at B = 1).
MIN_GAIN = 0.03


def pick_best(records: list[dict[str, Any]], default: dict[str, Any]) -> dict[str, Any] | None:
    """Of one problem's records, the one to use: the fastest correct timed one, unless the default's
    own record is within MIN_GAIN of it (then the default's). None when there is none, and when the
    default was never measured: a tuned schedule must be shown to beat the default, not assumed to
    (a default that was measured and failed its check does not block the fastest correct one)."""
    ok = [r for r in records if r.get("correct") and r.get("median_ms") is not None]
    if not ok or not any(dict(r.get("schedule", {})) == dict(default) for r in records):
        return None
    best = min(ok, key=lambda r: r["median_ms"])
    dflt = [r for r in ok if dict(r["schedule"]) == dict(default)]
    if dflt:
        d = min(dflt, key=lambda r: r["median_ms"])
        if best["median_ms"] > d["median_ms"] * (1 - MIN_GAIN):
            return d
    return best


def tuned_best(key: KernelKey) -> dict[str, Any] | None:
    """The schedule of `pick_best` over key's problem's correct records for its current template in
    tuning_logs/<arch>/*.jsonl, if any. Records of schedules no longer in the kind's search space
    (schedules/<arch>.yaml: the space was narrowed after they were measured) do not count."""
    pid = key.problem_id
    recs = []
    for path in sorted(p for d in tuning_dirs(key.arch) for p in d.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted tune
            if (rec.get("problem") == pid and record_is_current(rec, key.kind)
                    and in_search_space(key.arch, key.kind, dict(rec.get("schedule", {})))):
                recs.append(rec)
    best = pick_best(recs, default_schedule(key))
    return dict(best["schedule"]) if best else None


def resolve_schedule(key: KernelKey, feasible: Callable[[dict], str | None]) -> tuple[dict[str, Any], str]:
    """(schedule, source) for key's problem; source is 'tuned', 'default' or 'fallback'.

    feasible(schedule) returns None when the template accepts it, else the reason it does not.
    """
    tuned = tuned_best(key)
    if tuned is not None and tuned != default_schedule(key) and feasible(tuned) is None:
        return tuned, "tuned"
    reasons = []
    for i, cand in enumerate(search_space(key)):
        why = feasible(cand)
        if why is None:
            return cand, ("default" if i == 0 else "fallback")
        reasons.append(why)
    raise ValueError(f"{key.problem_id}: no schedule in schedules/{key.arch}.yaml fits this problem; "
                     f"first reason: {reasons[0] if reasons else 'empty search space'}")
