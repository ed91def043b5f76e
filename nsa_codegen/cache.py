"""Where compiled kernels live, and loading them once per process.

Layout: $NSA_CODEGEN_CACHE_DIR (default ~/.cache/nsa_codegen) / <version tag> /
  tilelang/                 TileLang's own kernel cache (CUDA source, kernel .so, params); its entries
                            are keyed by the prim_func text, target and TileLang/CUDA build, written by
                            atomic directory rename and verified by a content manifest on load, so a
                            corrupt or half-written entry is recompiled, never launched.
  kernels/<key>/meta.json   our index: kernel key, schedule and its source, template hash, versions.
The version tag changes with nsa-codegen and TileLang versions, so stale builds are never reused.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kernel_key import KernelKey
from .prebuilt import find_prebuilt, load as _load_prebuilt, version_tag

_LOCK = threading.Lock()
_LOADED: dict[KernelKey, "CompiledKernel"] = {}


def cache_root() -> Path:
    root = os.environ.get("NSA_CODEGEN_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nsa_codegen"


def versioned_dir() -> Path:
    return cache_root() / version_tag()


@contextlib.contextmanager
def tilelang_cache_dir(path: Path):
    """Point TileLang's kernel cache at ours for the duration of a compile."""
    from tilelang.env import env
    path.mkdir(parents=True, exist_ok=True)
    old = env.TILELANG_CACHE_DIR
    env.TILELANG_CACHE_DIR = str(path)
    try:
        yield
    finally:
        env.TILELANG_CACHE_DIR = old


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".meta-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one


@dataclass
class CompiledKernel:
    key: KernelKey
    kernel: Any  # tilelang JITKernel
    schedule_source: str  # tuned | default | fallback
    compile_seconds: float  # compile, or load when prebuilt / cached on disk
    prebuilt: Path | None = None  # the generated/<arch> folder it was loaded from

    def __call__(self, *tensors):
        return self.kernel(*tensors)

    def source(self) -> str:
        if self.prebuilt is not None:
            return (self.prebuilt / self.key.dirname / "kernel.cu").read_text()
        return self.kernel.get_kernel_source()


def get_kernel(problem: KernelKey) -> CompiledKernel:
    """The compiled kernel for a problem key (schedule resolved here), compiled at most once per process."""
    from .codegen import check_schedule, template_source_hash
    from .schedules import resolve_schedule

    with _LOCK:
        hit = _LOADED.get(problem.problem)
        if hit is not None:
            return hit
        from .schedules import default_schedule, tuned_best
        t0 = time.perf_counter()
        # A prebuilt kernel of the tuned (else default) schedule was checked by its build: open it
        # without touching the template, which would import TileLang (seconds).
        default, tuned = default_schedule(problem), tuned_best(problem)
        schedule = default if tuned is None else tuned
        source = "default" if schedule == default else "tuned"
        key = problem.with_schedule(schedule)
        prebuilt = find_prebuilt(key)
        if prebuilt is None:
            schedule, source = resolve_schedule(problem, lambda s: check_schedule(problem, s))
            key = problem.with_schedule(schedule)
        ck = CompiledKernel(key, _open(key, prebuilt), source, time.perf_counter() - t0, prebuilt)
        meta = versioned_dir() / "kernels" / key.dirname / "meta.json"
        if prebuilt is None and not meta.exists():
            write_json_atomic(meta, {"key": str(key), "problem": key.problem_id, "schedule": schedule,
                                      "schedule_source": source, "template_hash": template_source_hash(key.kind),
                                      "version_tag": version_tag()})
        _LOADED[problem.problem] = ck
        return ck


def load_scheduled(key: KernelKey) -> CompiledKernel:
    """The kernel of a key that carries its own schedule (a variant a benchmark or test runs, not
    necessarily the one get_kernel resolves): prebuilt in generated/ if built there (`nsa-codegen
    build --variant`), else compiled into the disk cache. Not remembered in the process."""
    if key.schedule is None:
        raise ValueError(f"{key}: load_scheduled needs a key with a schedule (KernelKey.with_schedule)")
    t0 = time.perf_counter()
    prebuilt = find_prebuilt(key)
    return CompiledKernel(key, _open(key, prebuilt), "explicit", time.perf_counter() - t0, prebuilt)


def kernel_with_knobs(problem: KernelKey, knobs: dict[str, Any]) -> CompiledKernel:
    """The kernel get_kernel resolves for `problem`, with the schedule knobs in `knobs` changed: the
    resolved kernel itself where they change nothing, else load_scheduled of that schedule."""
    resolved = get_kernel(problem)
    sched = {**dict(resolved.key.schedule), **knobs}
    return resolved if sched == dict(resolved.key.schedule) else load_scheduled(problem.with_schedule(sched))


def _open(key: KernelKey, prebuilt: Path | None):
    """key's kernel: its prebuilt artifact through TVM-FFI (no compiler), else through TileLang from
    the prebuilt folder's TileLang cache (no compile either) or compiled into the disk cache."""
    from .codegen import compile_kernel
    jit = _load_prebuilt(prebuilt, key) if prebuilt else None
    if jit is None:
        with tilelang_cache_dir(prebuilt / "tilelang" if prebuilt else versioned_dir() / "tilelang"):
            jit = compile_kernel(key)
    return jit


@contextlib.contextmanager
def use_kernel(problem: KernelKey, kernel: CompiledKernel):
    """Inside this block, get_kernel(problem) (every op launching that problem) returns `kernel`:
    how tuning checks a candidate and benchmarks time a schedule other than the resolved one."""
    problem = problem.problem
    with _LOCK:
        old = _LOADED.get(problem)
        _LOADED[problem] = kernel
    try:
        yield kernel
    finally:
        with _LOCK:
            if old is None:
                _LOADED.pop(problem, None)
            else:
                _LOADED[problem] = old


def clear_loaded() -> None:
    """Forget kernels loaded in this process (the disk cache stays)."""
    with _LOCK:
        _LOADED.clear()


def run_in_workers(fn, calls, jobs: int | None = None, on_result=None, deadline: float | None = None,
                   initializer=None) -> list:
    """fn(*args) for each args tuple in calls, in spawned worker processes; results in call order.

    spawn, not fork: the parent may hold CUDA state. on_result(done, total, result) runs in the
    parent as each call finishes (progress bars). Once time.time() passes `deadline`, calls not yet
    started are cancelled (their results stay None); running ones finish. initializer() runs once in
    each worker first (a module-level function: it is pickled by name).
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    calls = list(calls)
    results: list = [None] * len(calls)
    if not calls:
        return results
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(calls)))
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=initializer) as pool:
        futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if on_result:
                on_result(done, len(calls), results[futures[fut]])
            if deadline is not None and time.time() > deadline:
                for f in futures:
                    f.cancel()
                break
    return results


def _precompile_one(problem: KernelKey) -> tuple[str, str | None, float]:
    try:
        k = get_kernel(problem)
        return str(k.key), None, k.compile_seconds
    except Exception as e:  # reported per kernel by the caller
        return str(problem), f"{type(e).__name__}: {e}", 0.0


def precompile(problems, jobs: int | None = None, progress=None) -> list[tuple[str, str | None, float]]:
    """Compile many problem keys in parallel worker processes into the disk cache.

    Returns (key, error or None, seconds) per distinct problem, in order. Later get_kernel calls in
    this process then load from disk instead of compiling.
    """
    problems = list(dict.fromkeys(p.problem for p in problems))
    return run_in_workers(_precompile_one, [(p,) for p in problems], jobs, progress)


def _compile_scheduled(key: KernelKey) -> str | None:
    from .codegen import compile_kernel
    try:
        with tilelang_cache_dir(versioned_dir() / "tilelang"):
            compile_kernel(key)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def precompile_scheduled(keys, jobs: int | None = None, progress=None,
                         deadline: float | None = None) -> list[str | None]:
    """Compile keys that already carry a schedule (tuning candidates) into the disk cache, in parallel.
    Per key: None when compiled, the error text, or None as well when cancelled at the deadline."""
    return run_in_workers(_compile_scheduled, [(k,) for k in keys], jobs, progress, deadline)
