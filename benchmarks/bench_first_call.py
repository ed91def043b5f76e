"""First-call latency of an op whose kernels were built ahead of time, in a fresh process with no
nvcc on PATH (so nothing can be compiled): build, then time import + first launch.

    python benchmarks/bench_first_call.py [--out DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import shutil, time, json, sys
t0 = time.perf_counter()
assert shutil.which("nvcc") is None, "nvcc must not be reachable"
import torch
from nsa_codegen import NSASpec, nsa_attention
from nsa_codegen.cache import get_kernel
from nsa_codegen.lowering import lower_to_plan
spec = NSASpec.from_yaml(sys.argv[1])
t_import = time.perf_counter() - t0
B, T = 1, 4096
q = torch.randn(B, T, spec.heads, spec.head_dim, device="cuda", dtype=torch.float16)
k = torch.randn(B, T, spec.kv_heads, spec.head_dim, device="cuda", dtype=torch.float16)
v = torch.randn(B, T, spec.kv_heads, spec.v_head_dim, device="cuda", dtype=torch.float16)
g = torch.rand(B, T, spec.heads, device="cuda", dtype=torch.float16)
torch.cuda.synchronize()
t1 = time.perf_counter()
o = nsa_attention(q, k, v, g, g, g, spec)
torch.cuda.synchronize()
t_first = time.perf_counter() - t1
t2 = time.perf_counter()
nsa_attention(q, k, v, g, g, g, spec)
torch.cuda.synchronize()
t_second = time.perf_counter() - t2
kernels = [get_kernel(c.key) for c in lower_to_plan(spec, "sm90").calls]
print(json.dumps(dict(import_s=t_import, first_call_s=t_first, second_call_s=t_second,
                      prebuilt=[str(k.prebuilt) for k in kernels], loader=[type(k.kernel).__name__ for k in kernels],
                      load_s=[round(k.compile_seconds, 4) for k in kernels],
                      tilelang_imported="tilelang" in sys.modules, finite=bool(torch.isfinite(o).all()))))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--config", default=str(ROOT / "examples" / "paper_fp16.yaml"))
    args = ap.parse_args()
    from nsa_codegen import NSASpec
    from nsa_codegen.build import build, summary_table
    gen = Path(tempfile.mkdtemp()) / "generated"
    t = time.perf_counter()
    results = build({"cfg": NSASpec.from_yaml(args.config)}, "sm90", gen)
    print(summary_table(results))
    build_s = time.perf_counter() - t
    env = dict(os.environ, PATH="/usr/bin:/bin", NSA_CODEGEN_GENERATED_DIR=str(gen),
               NSA_CODEGEN_CACHE_DIR=tempfile.mkdtemp())  # an empty user cache: only generated/ can serve
    env.pop("CUDA_HOME", None)
    r = subprocess.run([sys.executable, "-c", CHILD, args.config], env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        print(r.stderr[-3000:])
        sys.exit(1)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(build_s=build_s, config=args.config)
    print(json.dumps(res, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "first_call.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
