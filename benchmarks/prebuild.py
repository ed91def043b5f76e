"""Build, on this machine (nvcc, no GPU needed), the kernels a GPU pass will load, and pack them.

    python benchmarks/prebuild.py [--out .gen] [--jobs N] [--forward-only]

A lent GPU's minutes are few and kernels compiled there cost them, and TileLang's own disk cache
does not carry over (its key holds the parsed target, which differs on a machine with a GPU). So
this builds with `nsa_codegen.build` (the artifacts `nsa-codegen build` writes, opened through
TVM-FFI with no compiler) every forward kernel of the GPU test matrix (tests/test_ops.py) and of the
benchmarks' configs, with the selection, top-n and compression schedules the tests,
bench_selection.py and bench_paper.py run as variants,
the backward kernels of the backward tests, of bench_paper.py (both dq schedules) and of
trained_selections.py's model, the kernels of probe_matrix.py's candidate cells, and the
decode kernels of tests/test_decode.py, into <out>/generated/, and packs those kernels (not older
builds left there) as <out>/generated.tar.xz. benchmarks/gpu_pass.sh unpacks it and points
NSA_CODEGEN_GENERATED_DIR at it. Keep <out> out of git and carry it to the device.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # test modules import each other by name, as under pytest

# Selection forward schedules the GPU tests and bench_selection.py run besides the resolved one.
SELECTION_VARIANTS = [{"tile_tokens": 0}, {"tile_tokens": 1}, {"tile_tokens": 8, "threads": 256},
                      # warp_skip (tests/test_ops.py skip64 / skip128: 128 rows = 128 // G tokens)
                      {"tile_tokens": 0, "threads": 128, "warp_skip": True},
                      {"tile_tokens": 4, "threads": 128, "warp_skip": True, "min_blocks_per_sm": 1},
                      {"tile_tokens": 4, "threads": 256, "warp_skip": True},
                      {"tile_tokens": 8, "threads": 256, "warp_skip": True},
                      {"tile_tokens": 16, "threads": 256, "warp_skip": True},
                      {"min_blocks_per_sm": 1}, {"num_stages": 3}]
# Top-n schedules the GPU tests (tests/test_ops.py TOPN_SCHEDULES) and bench_paper.py run besides the resolved one.
TOPN_VARIANTS = [{"overlap": False}, {"ring_halo": True}, {"ring_halo": True, "overlap": False},
                 {"threads": 512, "block_M": 256, "overlap": False},
                 {"threads": 512, "block_M": 256, "overlap": False, "ring_halo": True}]
# Compression forward schedules the GPU tests (tests/test_ops.py CMP_FWD_SCHEDULES) and bench_paper.py run.
CMP_FWD_VARIANTS = [{"overlap": True, "block_N": 64, "num_stages": 2}]
FORWARD_VARIANTS = ([("selection_fwd", v) for v in SELECTION_VARIANTS] + [("selection_topn", v) for v in TOPN_VARIANTS]
                    + [("compression_fwd", v) for v in CMP_FWD_VARIANTS])
# Selection dq schedules the backward GPU tests and bench_paper.py --backward run.
DQ_VARIANTS = [{"tile_tokens": 0}, {"tile_tokens": 1}, {"tile_tokens": 0, "threads": 128, "warp_skip": True}]


def dkdv_variants():
    """{kind: [schedule overrides]}: the compression / window / selection dk/dv schedules the backward GPU tests
    and bench_paper.py --backward run besides the resolved ones."""
    from bench_paper import CONFIGS
    from tests.test_ops_backward import CMP_DKDV_SCHEDULES, SEL_DKDV_SCHEDULES, WIN_DKDV_SCHEDULES
    out = {}
    for kind, tests in (("compression_bwd_dkdv", CMP_DKDV_SCHEDULES), ("window_bwd_dkdv", WIN_DKDV_SCHEDULES),
                        ("selection_bwd_dkdv", SEL_DKDV_SCHEDULES)):
        vs = [v for v in tests.values() if v] + [c[kind] for c in CONFIGS.values() if kind in c]
        out[kind] = [dict(t) for t in dict.fromkeys(tuple(sorted(v.items())) for v in vs)]
    return out


def backward_specs():
    """Specs whose backward kernels a GPU pass runs: the backward tests' (tests/test_ops_backward.py:
    its matrix and layer specs, whose fixture compiles them all) and the paper config of
    bench_paper.py, in both dtypes."""
    from bench_paper import paper_spec
    from tests.test_ops_backward import BF16_LAYER_SPEC, BWD_MATRIX, LAYER_SPECS
    out = {f"bwd_{name}": spec for name, spec, _, _ in BWD_MATRIX}
    out.update({f"layer_{name}": spec for name, spec in LAYER_SPECS})
    out["layer_bf16"] = BF16_LAYER_SPEC
    out.update({f"paper_{dt}": paper_spec(dt) for dt in ("bfloat16", "float16")})
    out["trained_lm"] = trained_lm_spec()
    return out


def trained_lm_spec():
    """The byte-level model benchmarks/trained_selections.py trains on the GPU (bf16 autocast)."""
    from trained_selections import spec_for
    return spec_for(64, 64, "bfloat16")


def specs():
    from bench_forward import bench_specs
    from bench_selection import CONFIGS
    from nsa_codegen import CompressionBranch, NSASpec
    from tests.test_ops import MATRIX, WINDOW_SIZES, window_size_spec
    out = {name: spec for name, spec, _, _ in MATRIX}
    out.update({f"window{w}": window_size_spec(w) for w in WINDOW_SIZES})
    for dt in ("bfloat16", "float16"):
        for name, (dk, dv) in CONFIGS.items():
            out[f"sel_{name}_{dt}"] = NSASpec(head_dim=dk, v_head_dim=dv, dtype=dt,
                                              compression=CompressionBranch(32, 16, "mean"))
        for i, spec in enumerate(bench_specs(dt)):
            out[f"bench{i}_{dt}"] = spec
    out["trained_lm"] = trained_lm_spec()
    return out


def candidate_keys():
    """The forward and backward kernels of probe_matrix.py's candidate cells (outside the support
    matrix, which this process lifts; `probe_matrix.py --run` tests them on the GPU)."""
    from probe_matrix import CANDIDATE_CELLS, cell_keys, cell_spec, lift_support
    from nsa_codegen.lowering import lower_to_plan
    lift_support()
    keys = [k for c in CANDIDATE_CELLS for k in cell_keys(c, lower_to_plan(cell_spec(c), "sm90"), backward=True)]
    return [(k, "probe") for k in dict.fromkeys(keys)]


def decode_keys():
    """The decode kernels of the decode GPU tests (tests/test_decode.py DECODE_CASES: q_len 1, 2 and 8,
    a separate window; PAGED_CASES: paged caches), each with the schedule the step will resolve."""
    from nsa_codegen.codegen import check_schedule
    from nsa_codegen.lowering import lower_decode
    from nsa_codegen.schedules import resolve_schedule
    from test_decode import DECODE_CASES, PAGED_CASES
    cases = [(case, 0) for case in DECODE_CASES] + PAGED_CASES
    out = []
    for (_, spec, ql, lens0, steps, sep), page in cases:
        for c in lower_decode(spec, "sm90", ql, sep, max(lens0) + steps * ql + 5, page_size=page):
            sched, source = resolve_schedule(c.key, lambda sc, p=c.key: check_schedule(p, sc))
            out.append((c.key.with_schedule(sched), source))
    return list(dict.fromkeys(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".gen")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--forward-only", action="store_true", help="skip the backward kernels")
    args = ap.parse_args()
    from nsa_codegen.build import build, build_keys
    out = Path(args.out)
    all_specs = specs()
    # Variants the template rejects for a problem (a token tile where G < 8 ...) are skipped per spec.
    from nsa_codegen.build import plan_keys
    ok = {}
    for name, spec in all_specs.items():
        good = []
        for kind, var in FORWARD_VARIANTS:
            try:
                plan_keys({name: spec}, "sm90", backward=False, decode=False, variants={kind: [var]})
                good.append((kind, var))
            except ValueError:
                pass
        ok[name] = good
    results = []
    for kind, var in FORWARD_VARIANTS:   # one build per variant: each applies to the specs that accept it
        names = {n: s for n, s in all_specs.items() if (kind, var) in ok[n]}
        results += build(names, "sm90", out / "generated", jobs=args.jobs, backward=False, decode=False,
                         variants={kind: [var]})
    if not args.forward_only:
        results += build_keys(decode_keys(), out / "generated", jobs=args.jobs)
        variants = [("selection_bwd_dq", var) for var in DQ_VARIANTS]
        variants += [(kind, var) for kind, vs in dkdv_variants().items() for var in vs]
        for kind, var in variants:   # for the specs whose problem takes it (warp_skip: G >= 8; registers: not at Dk = 256)
            names = {}
            for name, spec in backward_specs().items():
                try:
                    plan_keys({name: spec}, "sm90", backward=True, decode=False, variants={kind: [var]})
                    names[name] = spec
                except ValueError:
                    pass
            results += build(names, "sm90", out / "generated", jobs=args.jobs, backward=True,
                             decode=False, variants={kind: [var]})
        from probe_matrix import lift_support
        results += build_keys(candidate_keys(), out / "generated", jobs=args.jobs, worker_init=lift_support)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"FAILED {r.key}: {r.error[:300]}")
    # Pack this run's kernels only: the folder keeps every earlier build (stale schedules, their
    # TileLang cache entries) and the device takes at most 64 MiB with the TileLang bundle.
    gen = out / "generated"
    wanted = {r.key for r in results if r.status != "failed"}
    members = []
    for meta_path in sorted(gen.glob("*/*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta["key"] in wanted:
            arch_dir = meta_path.parent.parent
            members += [meta_path.parent.relative_to(gen), (arch_dir / meta["artifact"]).relative_to(gen)]
    listing = out / "generated.files"
    listing.write_text("".join(f"./{m}\n" for m in members))
    subprocess.run(["tar", "-C", str(gen), "-cJf", str(out / "generated.tar.xz"), "-T", str(listing)], check=True)
    print(f"{len(results)} kernel builds ({len(failed)} failed); packed {out / 'generated.tar.xz'} "
          f"({(out / 'generated.tar.xz').stat().st_size / 1e6:.1f} MB)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
