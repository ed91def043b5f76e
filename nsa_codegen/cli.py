"""`nsa-codegen`: the compiler driver's command line."""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys

from .spec import NSASpec, SpecError


def _doctor(args) -> int:
    """Report what the toolchain has: torch, TileLang, nvcc, a GPU and its arch."""
    ok = True

    def line(name, status, detail=""):
        print(f"  {name:<10} {status:<8} {detail}")

    print("nsa-codegen doctor")
    try:
        import torch
        line("torch", "found", torch.__version__)
    except ImportError:
        line("torch", "MISSING", "pip install torch")
        return 1
    try:
        tl = importlib.import_module("tilelang")
        line("tilelang", "found", getattr(tl, "__version__", "?"))
    except Exception as e:  # an import of TileLang can fail for reasons other than absence
        ok = False
        line("tilelang", "MISSING", f"{type(e).__name__}: {e}".splitlines()[0][:100])
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if nvcc and os.path.exists(nvcc):
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        line("nvcc", "found", f"{nvcc} ({out[-1] if out else '?'})")
    else:
        line("nvcc", "missing", "kernels can't be compiled here (prebuilt ones in generated/ still load)")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        line("gpu", "found", f"{torch.cuda.get_device_name()} (sm_{major}{minor}, CUDA {torch.version.cuda})")
    else:
        line("gpu", "none", "kernels can be compiled (with nvcc) but not run; the reference runs on CPU")
    return 0 if ok else 1


def _positive(kind):
    """argparse type: a number of `kind` (int / float) above zero, named in the error otherwise."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _spec_validate(args) -> int:
    status = 0
    if args.arch:
        from .lowering import normalize_arch
        try:
            normalize_arch(args.arch)
        except ValueError as e:
            print(f"nsa-codegen spec validate: {e}", file=sys.stderr)
            return 2
    for path in args.files:
        try:
            spec = NSASpec.from_yaml(os.fspath(path)) if os.path.isfile(path) else None
            if spec is None:
                print(f"{path}: {'a folder, not a spec file' if os.path.isdir(path) else 'no such file'}",
                      file=sys.stderr)
                status = 1
                continue
        except (SpecError, OSError, UnicodeDecodeError) as e:
            print(f"{path}: invalid: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok (HQ={spec.heads} H={spec.kv_heads} G={spec.group} Dk={spec.head_dim} "
              f"Dv={spec.v_head_dim} {spec.dtype})")
        if args.arch:
            from .lowering import normalize_arch
            from .spec import kernel_support
            problems = kernel_support(spec)
            if not problems:
                print(f"  {normalize_arch(args.arch)} kernels: cover it")
            for name, why in problems:
                print(f"  {normalize_arch(args.arch)} kernels: {name}: {why}")
            if problems:
                print("  (the reference, nsa_codegen.reference / backend='reference', runs it)")
                status = 1
    return status


def _load_specs(paths) -> dict:
    """{file stem: spec}; SpecError for a bad file, or two files of one stem (one would hide the other)."""
    specs, where = {}, {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in where:
            raise SpecError("--config", f"two spec files are both named {name!r} ({where[name]} and {path}): "
                                        f"kernels and logs name specs by file stem; rename one")
        if os.path.isdir(path):
            raise SpecError("--config", f"{path}: a folder, not a spec file")
        try:
            specs[name] = NSASpec.from_yaml(os.fspath(path))
        except UnicodeDecodeError as e:
            raise SpecError("--config", f"{path}: not a text file ({e})") from None
        where[name] = path
    return specs


def _build(args) -> int:
    from .build import build, default_build_set, summary_table
    from .lowering import normalize_arch
    try:
        arch = normalize_arch(args.arch)
    except ValueError as e:
        print(f"nsa-codegen build: {e}", file=sys.stderr)
        return 2
    try:
        import tilelang  # noqa: F401
    except Exception as e:
        print(f"nsa-codegen build: tilelang is not importable ({e}); pip install tilelang==0.1.15", file=sys.stderr)
        return 2
    try:
        specs = _load_specs(args.config) if args.config else default_build_set()
    except (SpecError, OSError) as e:
        print(f"nsa-codegen build: {e}", file=sys.stderr)
        return 2
    try:
        variants = _parse_variants(args.variant or [])
    except ValueError as e:
        print(f"nsa-codegen build: {e}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"nsa-codegen build: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    print(f"building {len(specs)} spec(s) for {arch} into {os.path.join(args.out, arch)}")
    try:
        results = build(specs, arch, args.out, jobs=args.jobs, force=args.force, backward=not args.forward_only,
                        decode=not (args.forward_only or args.no_decode), variants=variants, verbose=args.verbose)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"nsa-codegen build: {e}", file=sys.stderr)
        return 2
    print()
    print(summary_table(results))
    if not args.verbose and any(r.status != "up-to-date" for r in results):
        print(f"compiler output: {os.path.join(args.out, arch, 'build.log')}")
    return 1 if any(r.status == "failed" for r in results) else 0


def _parse_variants(texts: list[str]) -> dict[str, list[dict]]:
    """--variant 'KIND:{"knob": value, ...}' (repeatable) -> {kind: [knobs, ...]}."""
    import json
    from .kinds import KINDS
    out: dict[str, list[dict]] = {}
    for text in texts:
        kind, sep, knobs = text.partition(":")
        if not sep or kind not in KINDS:
            raise ValueError(f"--variant {text!r}: expected KIND:JSON with KIND one of {', '.join(KINDS)}")
        try:
            value = json.loads(knobs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--variant {text!r}: the knobs are not JSON ({e})") from None
        if not isinstance(value, dict) or not value:
            raise ValueError(f"--variant {text!r}: the knobs must be a non-empty JSON object")
        out.setdefault(kind, []).append(value)
    return out


def _list(args) -> int:
    from .prebuilt import generated_dirs
    from .cache import versioned_dir
    rows = []
    metas = [(p, "generated") for root in generated_dirs() for p in sorted(root.glob("*/*/meta.json"))]
    metas += [(p, "cache") for p in sorted((versioned_dir() / "kernels").glob("*/meta.json"))]
    for meta_path, where in metas:
        meta = _read_meta(meta_path)
        if meta is None:  # cut short or edited: the next build / load rebuilds it
            rows.append(("?", where, "corrupt", meta_path.parent.name, str(meta_path.parent)))
            continue
        rows.append((meta["key"].split("/")[0], where, meta.get("schedule_source", "?"), meta["key"],
                     str(meta_path.parent)))
    if not rows:
        print("no kernels built or cached yet (nsa-codegen build --arch sm90)")
        return 0
    print(f"{'arch':<6}{'where':<11}{'schedule':<10}key")
    for arch, where, src, key, _ in rows:
        print(f"{arch:<6}{where:<11}{src:<10}{key}")
    return 0


def _read_meta(path):
    """A kernel folder's meta.json, or None when it is unreadable or not a kernel's record."""
    import json
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("key"), str) else None


def _show(args) -> int:
    import json
    from .prebuilt import generated_dirs
    from .cache import versioned_dir
    key = args.key.strip("/")
    name = key.replace("/", "__")
    folders = [root / key.split("/")[0] for root in generated_dirs()] + [versioned_dir() / "kernels"]
    candidates = [f / name for f in folders]
    if "/s-" not in key:  # a problem id (no schedule segment): whichever schedule was built for it
        candidates += [d for f in folders for d in sorted(f.glob(name + "__s-*"))]
    for d in candidates:
        if (d / "meta.json").exists():
            meta = _read_meta(d / "meta.json")
            if meta is None:
                print(f"nsa-codegen show: {d / 'meta.json'} is corrupt (cut short or edited); the next build "
                      f"or load rebuilds that kernel", file=sys.stderr)
                return 1
            print(json.dumps(meta, indent=1))
            if (d / "kernel.cu").exists():
                print(f"generated source: {d / 'kernel.cu'}")
            return 0
    print(f"nsa-codegen show: no built or cached kernel with key {args.key} (see nsa-codegen list)", file=sys.stderr)
    return 1


def _cache_clear(args) -> int:
    import shutil
    from .cache import cache_root
    root = cache_root()
    if root.exists():
        shutil.rmtree(root)
        print(f"removed {root}")
    else:
        print(f"nothing to clear at {root}")
    return 0


def _tune_report(arch: str) -> int:
    from .tuning import speedups
    rows = speedups(arch)
    if not rows:
        print(f"no tuning records for {arch} under tuning_logs/{arch}/")
        return 0
    print(f"{'default ms':>11} {'tuned ms':>10} {'speedup':>8} {'tried':>6}  problem")
    for r in rows:
        d = f"{r['default_ms']:.4f}" if r["default_ms"] is not None else "-"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        b = f"{r['best_ms']:.4f}" if r["best_ms"] is not None else "-"
        print(f"{d:>11} {b:>10} {sp:>8} {r['candidates']:>6}  {r['problem']}")
    return 0


def _tune(args) -> int:
    from .build import default_build_set
    from .lowering import lower_to_plan, normalize_arch
    try:
        arch = normalize_arch(args.arch)
        specs = _load_specs(args.config) if args.config else default_build_set()
    except (ValueError, OSError) as e:
        print(f"nsa-codegen tune: {e}", file=sys.stderr)
        return 2
    if args.report:
        return _tune_report(arch)
    try:
        import torch
        if not torch.cuda.is_available():
            print("nsa-codegen tune: no CUDA GPU found; tuning times kernels, so it needs one", file=sys.stderr)
            return 2
        from .tuning import tune
    except ImportError as e:
        print(f"nsa-codegen tune: {e}", file=sys.stderr)
        return 2
    plans = [lower_to_plan(s, arch) for s in specs.values()]
    # Forward kernels first, then backward, then decode: an interrupted tune has covered the most used.
    problems = list(dict.fromkeys(c.key for stage in ("calls", "backward", "decode") for p in plans
                                  for c in getattr(p, stage)))
    if args.kernel:
        problems = [p for p in problems if p.problem_id == args.kernel.split("/s-")[0]]
    if args.kind:
        from .kinds import KINDS
        unknown = [k for k in args.kind if k not in KINDS]
        if unknown:
            print(f"nsa-codegen tune: unknown kind(s) {unknown}; known: {', '.join(KINDS)}", file=sys.stderr)
            return 2
        problems = [p for p in problems if p.kind in args.kind]
    if not problems:
        print("nsa-codegen tune: no kernel of the given specs matches --kernel / --kind", file=sys.stderr)
        return 2
    tune(problems, T=args.seq_len, budget_minutes=args.budget_minutes, jobs=args.jobs, exhaustive=args.exhaustive,
         max_candidates=args.max_candidates)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nsa-codegen", description="Native Sparse Attention kernel compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check torch, tilelang, nvcc and the GPU")
    p.set_defaults(fn=_doctor)
    p = sub.add_parser("spec", help="work with spec files")
    spec_sub = p.add_subparsers(dest="spec_command", required=True)
    pv = spec_sub.add_parser("validate", help="validate NSA spec YAML files (and, with --arch, kernel support)")
    pv.add_argument("files", nargs="+")
    pv.add_argument("--arch", help="also say whether this arch's kernels cover each spec (exit 1 if not)")
    pv.set_defaults(fn=_spec_validate)
    p = sub.add_parser("build", help="ahead-of-time build of kernels into generated/<arch>/")
    p.add_argument("--arch", required=True, help="sm80 or sm90 (sm90 builds sm_90a kernels)")
    p.add_argument("--config", nargs="+", help="spec YAML files (default: the repo's default build set)")
    p.add_argument("--out", default="generated", help="output folder (default: generated)")
    p.add_argument("-j", "--jobs", type=_positive(int), default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--force", action="store_true", help="rebuild kernels that are up to date")
    p.add_argument("--forward-only", action="store_true",
                   help="only the forward kernels (skip the backward / training and decode kernels)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode (KV cache) kernels")
    p.add_argument("--verbose", action="store_true",
                   help="show TileLang's and nvcc's output (default: into <out>/<arch>/build.log)")
    p.add_argument("--variant", action="append", metavar="KIND:JSON",
                   help='also build each KIND kernel with these schedule knobs changed, e.g. '
                        '\'selection_fwd:{"tile_tokens": 1}\' (repeatable; for benchmarks of other schedules)')
    p.set_defaults(fn=_build)
    p = sub.add_parser("list", help="kernels built into generated/ and cached")
    p.set_defaults(fn=_list)
    p = sub.add_parser("show", help="spec, schedule and source path of one kernel key")
    p.add_argument("key", help="kernel key, or its problem id (the key without /s-<schedule>)")
    p.set_defaults(fn=_show)
    p = sub.add_parser("cache", help="the compiled-kernel cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    pc = cache_sub.add_parser("clear", help="delete the cache folder")
    pc.set_defaults(fn=_cache_clear)
    p = sub.add_parser("tune", help="autotune schedules on a GPU; records go to tuning_logs/<arch>/<gpu>.jsonl")
    p.add_argument("--arch", required=True)
    p.add_argument("--config", nargs="+", help="spec YAML files (default: the default build set)")
    p.add_argument("--kernel", help="tune only this kernel key (problem id)")
    p.add_argument("--kind", nargs="+", help="tune only these kernel kinds (e.g. selection_fwd window_fwd)")
    p.add_argument("--budget-minutes", type=_positive(float), default=None)
    p.add_argument("--seq-len", type=_positive(int), default=16384,
                   help="T of the timed problem (default 16384; decode kernels: 16 caches of 64k tokens)")
    p.add_argument("--exhaustive", action="store_true",
                   help="try the whole search space (default: greedy, one knob at a time, then the best of each)")
    p.add_argument("--max-candidates", type=_positive(int), default=None, help="cap per kernel and search round")
    p.add_argument("--report", action="store_true", help="print tuned-vs-default speedups from the logs and exit")
    p.add_argument("-j", "--jobs", type=_positive(int), default=None)
    p.set_defaults(fn=_tune)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
