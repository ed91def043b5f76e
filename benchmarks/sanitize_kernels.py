"""Every kernel kind once, on small ragged shapes: the program `compute-sanitizer` runs over.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitize_kernels.py
    bash benchmarks/gpu_pass.sh sanitize        # memcheck, racecheck and synccheck, logs in $OUT

Launches (paper config, fp16, the kernels benchmarks/prebuild.py builds, so nothing compiles here):
  - nsa_attention forward + backward over a pack of three sequences (37, 163 and 64 tokens: shorter
    than a compressed block, not multiples of any block) with cu_seqlens: compression forward and
    backward, top-n, selection forward (per token) and backward (dq, dkdv, reduce), window forward and
    backward, gates forward and backward;
  - the same pack under bench_paper's configurations tile (selection forward and dq token tiles),
    topn_sync and cmp_overlap (the top-n without its default async-WGMMA overlap, the compression
    forward with one);
  - the trained_selections.py model's spec (bf16, Dk = Dv = 64) over a pack of four sequences;
  - a decode step (paper config, D = 128, q_len 1) over a cache of ragged lengths 37 / 700 / 2000 / 3001.
Prints one line per part; the sanitizer's report says whether any access was out of bounds, racy or
unsynchronised.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paper import CONFIGS, paper_spec  # noqa: E402

from nsa_codegen import NSASpec, nsa_attention  # noqa: E402
from nsa_codegen.cache import kernel_with_knobs, use_kernel  # noqa: E402
from nsa_codegen.decode import nsa_decode  # noqa: E402
from nsa_codegen.kv_cache import NSAKVCache  # noqa: E402
from nsa_codegen.lowering import arch_of_capability, lower_to_plan  # noqa: E402


def pack_step(spec, lens, config=None):
    """nsa_attention forward + backward over a pack of `lens`, with the kernels of bench_paper's
    CONFIGS[config] (their schedule knobs over the resolved ones) where config is given."""
    dev, dt = "cuda", getattr(torch, spec.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    T = sum(lens)
    rn = lambda *s: torch.randn(*s, generator=g, device=dev).to(dt).requires_grad_()  # noqa: E731
    q, k, v = rn(1, T, spec.heads, spec.head_dim), rn(1, T, spec.kv_heads, spec.head_dim), \
        rn(1, T, spec.kv_heads, spec.v_head_dim)
    gates = [torch.sigmoid(torch.randn(1, T, spec.heads, generator=g, device=dev)).to(dt).requires_grad_()
             for _ in range(3)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    forced = []
    if config:
        plan = lower_to_plan(spec, arch_of_capability(*torch.cuda.get_device_capability()))
        for call in plan.calls + plan.backward:
            if call.kind in CONFIGS[config]:
                forced.append(use_kernel(call.key, kernel_with_knobs(call.key, CONFIGS[config][call.kind])))
        for f in forced:
            f.__enter__()
    try:
        o = nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu)
        o.backward(torch.randn_like(o))
        torch.cuda.synchronize()
    finally:
        for f in reversed(forced):
            f.__exit__(None, None, None)
    bad = [n for n, x in zip("q k v g_cmp g_slc g_win".split(), (q, k, v, *gates)) if not torch.isfinite(x.grad).all()]
    what = f"{spec.dtype} Dk {spec.head_dim}" + (f", {config}" if config else "")
    print(f"pack {lens} ({what}): forward + backward ran; non-finite grads: {bad or 'none'}", flush=True)


def decode_step():
    spec = NSASpec(head_dim=128, v_head_dim=128, dtype="float16")
    lens = [37, 700, 2000, 3001]
    dev, dt = "cuda", torch.float16
    g = torch.Generator(device=dev).manual_seed(1)
    B, Tm = len(lens), max(lens) + 5 * 1     # the decode test's capacity: its kernels are prebuilt
    cache = NSAKVCache(spec, B, Tm + 5, device=dev, dtype=dt)
    k = torch.randn(B, max(lens), spec.kv_heads, 128, generator=g, device=dev).to(dt)
    v = torch.randn(B, max(lens), spec.kv_heads, 128, generator=g, device=dev).to(dt)
    cache.prefill(k, v, seqlens=lens)
    q = torch.randn(B, 1, spec.heads, 128, generator=g, device=dev).to(dt)
    gates = [torch.rand(B, 1, spec.heads, generator=g, device=dev).to(dt) for _ in range(3)]
    o = nsa_decode(q, cache, *gates)
    torch.cuda.synchronize()
    print(f"decode {lens}: ran; finite: {bool(torch.isfinite(o).all())}", flush=True)


def main():
    spec = paper_spec("float16")
    pack_step(spec, [37, 163, 64])
    for config in ("tile", "topn_sync", "cmp_overlap"):
        pack_step(spec, [37, 163, 64], config)
    # the byte-level model of trained_selections.py (bf16, D = 64), whose training once stalled
    from trained_selections import spec_for
    pack_step(spec_for(64, 64, "bfloat16"), [37, 163, 64, 300])
    decode_step()


if __name__ == "__main__":
    main()
