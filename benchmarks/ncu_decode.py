"""Decode kernels at one size, for Nsight Compute and for timing cmp schedule variants alone.

    python benchmarks/ncu_decode.py B [--variants]      (paper config, fp16, q_len 1, 64k context)
Without --variants: 10 decode steps (ncu -k regex:nsa_decode --launch-skip 8 ... picks the last ones).
--variants: the compression and sparse kernels alone (CUDA-graph replay of a captured launch) under
several schedules and split counts; prints us per launch.
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import PAPER, _time, paper_step_inputs, random_paper_cache  # noqa: E402
from nsa_codegen import decode  # noqa: E402
from nsa_codegen.cache import tilelang_cache_dir, get_kernel, precompile, precompile_scheduled, versioned_dir  # noqa: E402,E501
from nsa_codegen.codegen import compile_kernel  # noqa: E402
from nsa_codegen.decode import nsa_decode  # noqa: E402
from nsa_codegen.lowering import lower_decode  # noqa: E402

VARIANTS = {  # part -> (schedule updates, split counts to time it at)
    "cmp": (({}, {"cmp_block_N": 32}, {"cmp_block_N": 128}, {"cmp_load": "tma", "cmp_stages": 1},
             {"cmp_load": "tma", "cmp_stages": 2}, {"cmp_load": "tma", "cmp_stages": 3}),
            ((4, 4, 2), (8, 4, 2), (12, 4, 2))),
    "sparse": (({}, {"sparse_threads": 64}, {"sparse_threads": 256}),
               ((4, 4, 2), (4, 8, 3), (4, 8, 5))),
}


def main():
    B, L = int(sys.argv[1]), 65536
    spec = PAPER
    calls = {x.kind: x for x in lower_decode(spec, "sm90", 1, False, 128 * 1024)}
    precompile([x.key for x in calls.values()])
    c = random_paper_cache(B, L)
    c.set_lengths([L] * B)
    q, gs = paper_step_inputs(B)
    if "--variants" not in sys.argv:
        for _ in range(10):
            nsa_decode(q, c, *gs)
        torch.cuda.synchronize()
        return
    todo = []
    for part, (updates, _) in VARIANTS.items():
        base = get_kernel(calls["decode_" + part].key)
        todo += [(part, u, base.key.with_schedule({**dict(base.key.schedule), **u})) for u in updates]
    precompile_scheduled([k for _, _, k in todo])
    for part, upd, key in todo:
        try:
            with tilelang_cache_dir(versioned_dir() / "tilelang"):
                jit = compile_kernel(key)
        except Exception as e:
            print(f"{part} {upd}: compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        args = []
        kern = dict(decode.decode_kernels(spec, 1, capacity=c.capacity))
        real_kernel = kern[part]
        kern[part] = type("Cap", (), {"__call__": lambda self, *a: (args.append(a), real_kernel(*a)),
                                      "key": key})()
        real = decode._decode_kernels
        decode._decode_kernels = lambda *a, **k: kern
        try:
            for splits in VARIANTS[part][1]:
                args.clear()
                nsa_decode(q, c, *gs, num_splits=splits)
                a = args[-1]
                t, _ = _time(lambda: jit(*a), iters=100)
                print(f"{part:7s} {str(upd):60s} splits {str(splits):11s}: {t * 1e3:7.1f} us", flush=True)
        finally:
            decode._decode_kernels = real


if __name__ == "__main__":
    main()
