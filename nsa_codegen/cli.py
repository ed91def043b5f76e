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


def _spec_validate(args) -> int:
    status = 0
    for path in args.files:
        try:
            spec = NSASpec.from_yaml(os.fspath(path)) if os.path.exists(path) else None
            if spec is None:
                print(f"{path}: no such file", file=sys.stderr)
                status = 1
                continue
        except SpecError as e:
            print(f"{path}: invalid: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok (HQ={spec.heads} H={spec.kv_heads} G={spec.group} Dk={spec.head_dim} "
              f"Dv={spec.v_head_dim} {spec.dtype})")
    return status


def _not_yet(name):
    def run(args) -> int:
        print(f"nsa-codegen {name}: not implemented yet", file=sys.stderr)
        return 2
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nsa-codegen", description="Native Sparse Attention kernel compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check torch, tilelang, nvcc and the GPU")
    p.set_defaults(fn=_doctor)
    p = sub.add_parser("spec", help="work with spec files")
    spec_sub = p.add_subparsers(dest="spec_command", required=True)
    pv = spec_sub.add_parser("validate", help="validate NSA spec YAML files")
    pv.add_argument("files", nargs="+")
    pv.set_defaults(fn=_spec_validate)
    for name, text in (("build", "ahead-of-time build of kernels into generated/"),
                       ("tune", "autotune schedules on a GPU into tuning_logs/")):
        p = sub.add_parser(name, help=f"{text} (not implemented yet)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=_not_yet(name))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
