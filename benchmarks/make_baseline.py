"""Pack an older commit's source and prebuilt kernels for an A/B run on the device.

    python benchmarks/make_baseline.py REV [--config examples/paper_fp16.yaml ...] [--out .ab]

writes <out>/baseline.tar.xz holding src/ (git archive REV), gen/ (its kernels built by its own
`nsa-codegen build`, with the selection variants bench_paper.py times) and REV. Carry it to the device
and run `bash benchmarks/gpu_pass.sh ab "<bench_paper args>"`: bench_paper.py of REV and of the
working tree run one after the other on the same machine and inputs, each writing its own md / json
(the REV one under $OUT/baseline/). Timings from different machines or sessions are not comparable;
this is how a regression is told from a slower card.

REV is built with its own templates: the source checkout is put first on sys.path and any editable
install of nsa_codegen is kept out of the import system, so nothing resolves to this tree's files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ['selection_fwd:{"tile_tokens": 0}', 'selection_fwd:{"tile_tokens": 1}',
            'selection_bwd_dq:{"tile_tokens": 0}', 'selection_bwd_dq:{"tile_tokens": 1}']

# Runs `nsa_codegen build` from SRC with SRC's own package data, whatever is installed here.
_BUILD = """
import runpy, sys
src = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__name__.lower()
                    and 'editable' not in getattr(f, '__name__', '').lower()]
sys.path.insert(0, src)
for name in [m for m in sys.modules if m == 'nsa_codegen' or m.startswith('nsa_codegen.')]:
    del sys.modules[name]
import nsa_codegen.resources as r
assert str(r.templates_dir()).startswith(src), f'templates resolve to {r.templates_dir()}, not {src}'
sys.argv[0] = 'nsa-codegen'
runpy.run_module('nsa_codegen', run_name='__main__', alter_sys=True)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev")
    ap.add_argument("--config", nargs="+", default=["examples/paper_fp16.yaml"])
    ap.add_argument("--out", default=str(ROOT / ".ab"))
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args()
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        src, gen = Path(tmp) / "src", Path(tmp) / "gen"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        cmd = [sys.executable, "-c", _BUILD, str(src), "build", "--arch", "sm90", "--out", str(gen),
               "-j", str(args.jobs), "--no-decode", "--config", *args.config]
        for v in VARIANTS:
            cmd += ["--variant", v]
        print(f"building {sha}'s kernels ({', '.join(args.config)}) ...", flush=True)
        done = subprocess.run(cmd, cwd=src, env={**os.environ,
                                                 "NSA_CODEGEN_CACHE_DIR": str(Path(tmp) / "cache")})
        if done.returncode:
            sys.exit(f"building {sha}'s kernels failed (exit {done.returncode})")
        (Path(tmp) / "REV").write_text(sha + "\n")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "baseline.tar.xz", "w:xz") as tar:
            for name in ("src", "gen", "REV"):
                tar.add(Path(tmp) / name, arcname=name)
    size = (out / "baseline.tar.xz").stat().st_size / 1e6
    print(f"{out / 'baseline.tar.xz'}: {sha}, {size:.1f} MB (add {out.name}/ to carry)")


if __name__ == "__main__":
    main()
