"""Kernels built ahead of time (`nsa-codegen build`): where generated/ folders are, the fingerprint
that says a build is current, whether its artifact is intact, and opening it without a compiler.

Runtime lookup only: the build (build.py) writes these folders, the kernel cache (cache.py) reads
them through find_prebuilt / load; neither imports the other for it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .codegen import TARGETS, template_source_hash
from .kernel_key import KernelKey

_SOURCE_GENERATED = Path(__file__).resolve().parent.parent / "generated"


def version_tag() -> str:
    """nsa-codegen and TileLang versions: they name the disk cache and enter every fingerprint, so
    a build of another version is never reused."""
    from . import __version__
    import importlib.metadata
    try:  # the distribution's version: no import of TileLang itself (seconds) just to name the cache
        tl = importlib.metadata.version("tilelang")
    except importlib.metadata.PackageNotFoundError:
        tl = "none"
    return f"v{__version__}-tl{tl}"


def generated_dirs() -> list[Path]:
    """Where prebuilt kernels are looked up: $NSA_CODEGEN_GENERATED_DIR (':'-separated), ./generated in
    the working directory (where `nsa-codegen build` writes by default), and a source checkout's."""
    env = os.environ.get("NSA_CODEGEN_GENERATED_DIR")
    dirs = [Path(p) for p in env.split(os.pathsep) if p] if env else []
    return list(dict.fromkeys(dirs + [Path.cwd() / "generated", _SOURCE_GENERATED]))


def fingerprint(key: KernelKey) -> str:
    text = json.dumps([str(key), template_source_hash(key.kind), version_tag(), TARGETS[key.arch]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifact_ok(arch_dir: Path, key: KernelKey) -> bool:
    """meta.json matches the current fingerprint and the compiled artifact's bytes are intact."""
    meta_path = arch_dir / key.dirname / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("fingerprint") != fingerprint(key):
        return False
    lib = arch_dir / meta.get("artifact", "")
    return lib.is_file() and file_hash(lib) == meta.get("artifact_sha256")


def find_prebuilt(key: KernelKey) -> Path | None:
    """The generated/<arch> folder holding an up-to-date, intact build of `key` (with schedule), if any."""
    for root in generated_dirs():
        arch_dir = root / key.arch
        if artifact_ok(arch_dir, key):
            return arch_dir
    return None


def load(arch_dir: Path, key: KernelKey):
    """Open a prebuilt kernel with TVM-FFI alone: no TileLang import, no prim_func, no compiler.

    The artifact's host entry (its prim_func's name, recorded by the build) takes torch tensors as
    they are. TileLang's runtime libraries provide the helpers it calls (TMA descriptors, ...).
    Returns None when this fast path is unavailable; the caller then goes through TileLang.
    """
    import ctypes
    import importlib.util
    try:
        meta = json.loads((arch_dir / key.dirname / "meta.json").read_text())
        entry = meta["entry_function"]
        spec = importlib.util.find_spec("tilelang")  # locates the package without importing it
        libdir = Path(next(iter(spec.submodule_search_locations))) / "lib"
        for lib in ("libtvm_runtime.so", "libtilelang.so"):
            ctypes.CDLL(str(libdir / lib), mode=ctypes.RTLD_GLOBAL)
        import tvm_ffi
        return tvm_ffi.load_module(str(arch_dir / meta["artifact"]))[entry]
    except Exception:
        return None
