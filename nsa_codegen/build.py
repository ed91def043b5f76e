"""Ahead-of-time build: specs -> kernel keys -> compiled kernels in generated/<arch>/.

Layout of generated/<arch>/:
  tilelang/              a TileLang kernel cache holding the compiled artifacts (kernel .so, CUDA
                         source, params), written by atomic directory rename
  <key>/kernel.cu        the generated CUDA source of one kernel (key with '/' -> '__')
  <key>/meta.json        spec, schedule (and where it came from), versions, source hash, fingerprint
  build.log              TileLang's and nvcc's output of the builds (not `--verbose`)
  manifest.json          problem id -> key and fingerprint, for every kernel built here (schedule
                         variants of `build --variant` listed apart, by key)
A kernel is up to date when its fingerprint (key with schedule, template source hash, nsa-codegen
and TileLang versions, target) matches and its artifact is intact; `build` skips those.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from .cache import tilelang_cache_dir, write_json_atomic, run_in_workers
from .codegen import TARGETS, check_schedule, compile_kernel, template_source_hash
from .kernel_key import KernelKey
from .lowering import lower_to_plan, normalize_arch
from .prebuilt import artifact_ok, file_hash, fingerprint, version_tag
from .resources import schedules_dir
from .schedules import resolve_schedule
from .spec import NSASpec


def default_build_set() -> dict[str, NSASpec]:
    data = yaml.safe_load((schedules_dir() / "build_set.yaml").read_text())
    return {name: NSASpec.from_dict(d) for name, d in data.items()}


@dataclass
class BuildResult:
    key: str
    status: str  # built | up-to-date | failed
    schedule_source: str
    seconds: float
    error: str | None = None


def _plan_calls(spec: NSASpec, arch: str, backward: bool, decode: bool):
    plan = lower_to_plan(spec, arch)
    return plan.calls + (plan.backward if backward else ()) + (plan.decode if decode else ())


def plan_keys(specs: dict[str, NSASpec], arch: str, backward: bool = True, decode: bool = True,
              variants: dict[str, list[dict]] | None = None) -> list[tuple[KernelKey, str]]:
    """Every distinct kernel of the specs' plans (forward; backward and one-token decode unless
    turned off), with its schedule resolved: (key, source). `variants` {kind: [knobs, ...]} adds,
    for every problem of that kind, the resolved schedule with those knobs changed (source
    'variant'; ones the template rejects raise ValueError naming them), for benchmarks and tests
    that run schedules other than the resolved one on a machine without a compiler."""
    problems = {}
    for spec in specs.values():
        for call in _plan_calls(spec, arch, backward, decode):
            problems.setdefault(call.key, None)
    out = []
    for problem in problems:
        sched, source = resolve_schedule(problem, lambda s, p=problem: check_schedule(p, s))
        out.append((problem.with_schedule(sched), source))
        for knobs in (variants or {}).get(problem.kind, []):
            var = {**sched, **knobs}
            why = check_schedule(problem, var)
            if why is not None:
                raise ValueError(f"variant {knobs} of {problem.problem_id}: {why}")
            if var != sched:
                out.append((problem.with_schedule(var), "variant"))
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def _output_to(log: Path | None):
    """Send this process's stdout and stderr, file descriptors included (TileLang's C++ passes and
    nvcc write there directly), to the end of `log` for the duration; None: leave them alone."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _build_one(arch_dir: str, key: KernelKey, source: str, spec_names: list[str],
               verbose: bool = False) -> BuildResult:
    arch_dir = Path(arch_dir)
    t0 = time.perf_counter()
    try:
        # TileLang's logs and compiler warnings go to build.log, not between the progress lines.
        with _output_to(None if verbose else arch_dir / "build.log"), tilelang_cache_dir(arch_dir / "tilelang"):
            print(f"--- {key}", flush=True)
            jit = compile_kernel(key)
        entry = Path(getattr(jit, "_tilelang_cache_path", "") or "")
        # The tvm_ffi backend writes executable.so; other TileLang backends kernel_lib.so.
        lib = next((entry / n for n in ("executable.so", "kernel_lib.so") if (entry / n).is_file()), None)
        if lib is None:
            raise RuntimeError(f"TileLang wrote no compiled artifact for {key} under {entry}")
        kdir = arch_dir / key.dirname
        kdir.mkdir(parents=True, exist_ok=True)
        src = jit.get_kernel_source()
        tmp = kdir / f".kernel.cu.{os.getpid()}"
        tmp.write_text(src)
        os.replace(tmp, kdir / "kernel.cu")
        import tilelang
        from .codegen import build_prim_func
        entry_fn = str(build_prim_func(key)[0].attrs["global_symbol"])
        meta = {"key": str(key), "entry_function": entry_fn, "problem": key.problem_id, "arch": key.arch, "kind": key.kind,
                "schedule": dict(key.schedule), "schedule_source": source, "specs": spec_names,
                "template_hash": template_source_hash(key.kind), "source_sha256": hashlib.sha256(src.encode()).hexdigest(),
                "versions": {"nsa_codegen": version_tag(), "tilelang": tilelang.__version__},
                "target": TARGETS[key.arch], "artifact": str(lib.relative_to(arch_dir)),
                "artifact_sha256": file_hash(lib), "fingerprint": fingerprint(key),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(kdir / "meta.json", meta)
        return BuildResult(str(key), "built", source, time.perf_counter() - t0)
    except Exception as e:
        return BuildResult(str(key), "failed", source, time.perf_counter() - t0, f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def _build_lock(arch_dir: Path):
    """One build per output folder at a time; a second one waits (and says so)."""
    arch_dir.mkdir(parents=True, exist_ok=True)
    with open(arch_dir / ".build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another build holds {arch_dir}; waiting for it...", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _progress(done: int, total: int, r: BuildResult, stream=None):
    width = 24
    bar = "#" * (width * done // total) + "-" * (width - width * done // total)
    extra = f" {r.error.splitlines()[0][:160]}" if r.error else ""
    print(f"[{bar}] {done}/{total} {r.status:<10} {r.seconds:6.1f}s  {r.key} ({r.schedule_source}){extra}",
          file=stream or sys.stdout, flush=True)


def build(specs: dict[str, NSASpec], arch: str, out: Path | str, jobs: int | None = None,
          force: bool = False, progress=_progress, backward: bool = True, decode: bool = True,
          variants: dict[str, list[dict]] | None = None, verbose: bool = False) -> list[BuildResult]:
    """Compile every kernel of `specs` for `arch` (forward; backward and one-token decode unless
    turned off; schedule `variants`, see plan_keys) into out/<arch>/; returns one result per kernel.
    TileLang's and the compiler's own output goes to out/<arch>/build.log unless `verbose`."""
    arch = normalize_arch(arch)
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise RuntimeError("nvcc not found: building kernels needs the CUDA toolkit (set PATH or CUDA_HOME)")
    keys = plan_keys(specs, arch, backward, decode, variants)
    users: dict[str, list[str]] = {}
    for name, spec in specs.items():
        for call in _plan_calls(spec, arch, backward, decode):
            users.setdefault(call.key.problem_id, []).append(name)
    return build_keys(keys, out, jobs, force, progress, verbose, users)


def build_keys(keys: list[tuple[KernelKey, str]], out: Path | str, jobs: int | None = None, force: bool = False,
               progress=_progress, verbose: bool = False,
               users: dict[str, list[str]] | None = None, worker_init=None) -> list[BuildResult]:
    """Compile scheduled keys, each with its schedule source ('default', 'tuned', 'variant', ...),
    into out/<arch>/ (one arch per call); kernels already built and intact are skipped unless
    `force`. users: problem id -> the spec names that need it (recorded in meta.json). worker_init:
    run in each compile worker first (benchmarks/prebuild.py lifts the support checks there)."""
    arches = {k.arch for k, _ in keys}
    if len(arches) > 1:
        raise ValueError(f"build_keys builds one arch per call, got {sorted(arches)}")
    if not keys:
        return []
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise RuntimeError("nvcc not found: building kernels needs the CUDA toolkit (set PATH or CUDA_HOME)")
    arch_dir = Path(out) / keys[0][0].arch
    users = users or {}
    results: list[BuildResult] = []
    with _build_lock(arch_dir):
        todo = []
        for key, source in keys:
            if not force and artifact_ok(arch_dir, key):
                r = BuildResult(str(key), "up-to-date", source, 0.0)
                results.append(r)
                progress(len(results), len(keys), r)
            else:
                todo.append((key, source))
        done_before = len(results)

        def report(done, _total, r):
            progress(done_before + done, len(keys), r)

        results += run_in_workers(_build_one, [(str(arch_dir), k, s, users.get(k.problem_id, []), verbose)
                                               for k, s in todo], jobs, report, initializer=worker_init)
        _write_manifest(arch_dir)
    return results


def _write_manifest(arch_dir: Path):
    entries, variants = {}, {}
    for meta_path in sorted(arch_dir.glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entry = {k: meta[k] for k in ("key", "fingerprint", "schedule_source", "artifact")}
        if meta["schedule_source"] == "variant":   # extra schedules of a problem (build --variant)
            variants[meta["key"]] = entry
        else:
            entries[meta["problem"]] = entry
    write_json_atomic(arch_dir / "manifest.json", {"arch": arch_dir.name, "version": version_tag(),
                                                    "kernels": entries, "variants": variants})


def summary_table(results: Iterable[BuildResult]) -> str:
    results = list(results)
    lines = [f"{'status':<11}{'seconds':>8}  {'schedule':<9} key"]
    for r in sorted(results, key=lambda r: r.key):
        lines.append(f"{r.status:<11}{r.seconds:8.1f}  {r.schedule_source:<9} {r.key}")
    counts = {s: sum(r.status == s for r in results) for s in ("built", "up-to-date", "failed")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)
