"""The paper config's forward + backward, one step, for Nsight Compute.

    ncu --profile-from-start off --clock-control none -k regex:'main_kernel|attention|gate' ... \
        python benchmarks/ncu_paper.py [--T 16384] [--config NAME]

Warms up (every kernel loaded) with one step, then runs one more step between cudaProfilerStart /
Stop, so `--profile-from-start off` captures each of our kernels once. fp16, B=1, HQ=64, H=4,
Dk=192, Dv=128, l=32, d=16, l'=64, n=16, w=512; the top-n's own lists from random inputs
(bench_paper.inputs); --config: one of bench_paper.CONFIGS (its kernels swapped in). The four `main_kernel`s launch in this order: compression_fwd,
selection_topn (forward), compression_bwd_dq, compression_bwd_dkdv (backward).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paper import CONFIGS, configurations, inputs, paper_spec  # noqa: E402

from nsa_codegen import nsa_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None)
    args = ap.parse_args()
    spec = paper_spec("float16")
    configs = configurations(spec, True, [args.config] if args.config else [])
    config = configs[-1]   # the named one (or the resolved schedules)
    q, k, v, g = inputs(args.T, torch.float16, seed=0, grad=True)
    do = torch.randn(1, args.T, 64, 128, device="cuda", dtype=torch.float16)

    def step():
        with config.use():
            nsa_attention(q, k, v, *g, spec).backward(do)

    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
