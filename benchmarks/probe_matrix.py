"""Which cells outside the kernels' support matrix already compile (issue 18, groundwork; CPU only).

    python benchmarks/probe_matrix.py [--cells "G=6" "Dk=80,Dv=80" ...] [--backward] [--decode] [--variants] [--out DIR]

For each cell (fields of the paper config changed: G = heads / kv_heads with kv_heads 4, Dk, Dv),
lifts the support checks (nsa_codegen.spec's SUPPORTED_* and templates/_problem's lists), lowers the
spec and TileLang-compiles every kernel of its plan for sm_90a with the schedule a build would take (the
default, else the nearest one the template accepts). Writes
<out>/<date>-matrix-probe.{md,json}: per cell and kernel, compiled or the first line of the error.
Compiling says nothing about correctness: a cell joins the support matrix only when its GPU tests
against the reference pass. --run (on a GPU) runs each cell against the reference instead (run_cell:
top-n, output, every gradient; writes <out>/<date>-matrix-run.{md,json}); benchmarks/prebuild.py
builds the kernels of the candidate cells (CANDIDATE_CELLS) so that this compiles nothing there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nsa_codegen import spec as spec_mod  # noqa: E402
from nsa_codegen.codegen import compile_kernel  # noqa: E402
from nsa_codegen.lowering import lower_decode, lower_to_plan  # noqa: E402
from nsa_codegen.resources import template_module  # noqa: E402
from nsa_codegen.codegen import check_schedule  # noqa: E402
from nsa_codegen.schedules import default_schedule, resolve_schedule  # noqa: E402

CELLS = ["G=5", "G=10", "Dk=32,Dv=32", "Dk=80,Dv=80", "Dk=96,Dv=96", "Dk=160,Dv=96", "Dk=128,Dv=32"]
# Cells whose every kernel (forward, backward, decode) compiles: the next to run on a GPU (--run).
CANDIDATE_CELLS = ["Dk=96,Dv=96", "Dk=160,Dv=96", "Dk=32,Dv=32"]


def lift_support():
    wide = tuple(range(16, 257, 16))
    spec_mod.SUPPORTED_HEAD_DIMS = wide
    spec_mod.SUPPORTED_V_HEAD_DIMS = wide
    spec_mod.SUPPORTED_GROUPS = tuple(range(1, 65))
    problem = template_module("_problem")
    problem.HEAD_DIMS, problem.V_HEAD_DIMS, problem.GROUPS = wide, wide, tuple(range(1, 65))


def cell_spec(cell: str) -> spec_mod.NSASpec:
    fields = dict(kv.split("=") for kv in cell.split(","))
    kw = {"dtype": "float16"}
    if "G" in fields:
        kw.update(heads=4 * int(fields["G"]), kv_heads=4)
    if "Dk" in fields:
        kw["head_dim"] = int(fields["Dk"])
    if "Dv" in fields:
        kw["v_head_dim"] = int(fields["Dv"])
    return spec_mod.NSASpec(compression=spec_mod.CompressionBranch(32, 16, "mean"), **kw)


def cell_keys(cell: str, plan, backward: bool, decode: bool = False, variants: bool = False) -> list:
    """The kernel keys of a cell's plan (and its backward / decode kernels), each with the schedule a
    build would take (the default, else the nearest one the template accepts; the default where none
    fits, so that compiling gives the template's own error); with variants, the token-tile
    selection forward / dq too where the cell allows it."""
    keys = []
    for call in plan.calls + (plan.backward if backward else ()) + (
            tuple(lower_decode(cell_spec(cell), "sm90", 1, False, 8192)) if decode else ()):
        try:
            key = call.key.with_schedule(resolve_schedule(call.key, lambda sc, p=call.key: check_schedule(p, sc))[0])
        except ValueError:
            key = call.key.with_schedule(default_schedule(call.key))
        keys.append(key)
        if variants and key.kind in ("selection_fwd", "selection_bwd_dq"):
            tile = key.with_schedule({**dict(key.schedule), "tile_tokens": 0})
            if tile != key and check_schedule(tile, dict(tile.schedule)) is None:
                keys.append(tile)
    return keys


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_cell(cell: str, B: int = 2, T: int = 333, seed: int = 0) -> dict:
    """The cell's kernels on the GPU (support lifted) against the fp32 reference: the top-n lists
    (up to near ties), the output and every input's gradient on the kernels' own lists (relative
    error, beside the reference's own error in the dtype; the tests' rule: < 1e-2 and <= 2x that),
    twice bit-identical, outputs checked for NaN (run_cells sets NSA_CODEGEN_POISON_OUTPUTS=1: the ops
    allocate their outputs NaN-filled, so elements a kernel leaves unwritten read as NaN). Returns the
    errors and `ok`."""
    import torch
    from nsa_codegen import ops
    from nsa_codegen import reference as ref
    spec = cell_spec(cell)
    dt = getattr(torch, spec.dtype)
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dt)

    HQ, H, Dk, Dv = spec.heads, spec.kv_heads, spec.head_dim, spec.v_head_dim
    xs = [rn(B, T, HQ, Dk), rn(B, T, H, Dk), rn(B, T, H, Dv)]
    xs += [torch.rand(B, T, HQ, generator=g, device="cuda").to(dt) for _ in range(3)]
    do = rn(B, T, HQ, Dv)
    _, idx = ops.nsa_attention(*xs, spec, return_indices=True)
    c = spec.compression
    q32, k32, v32 = (x.float() for x in xs[:3])
    keys = ref.block_keys(q32, ref.compress(k32, c.block, c.stride), ref.compress(v32, c.block, c.stride), spec, T)
    _, want = ref.nsa_reference(*(x.float() for x in xs), spec, return_indices=True)
    topn_ok, ties, why = ref.compare_block_indices(idx, want, keys)

    def run(fn, inputs):
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = fn(*leaves)
        return [out.detach()] + list(torch.autograd.grad((out.float() * do.float()).sum(), leaves))

    got = run(lambda *a: ops.nsa_attention(*a, spec, block_indices=idx), xs)
    again = run(lambda *a: ops.nsa_attention(*a, spec, block_indices=idx), xs)
    hi = run(lambda *a: ref.nsa_reference(*a, spec, block_indices=idx), [x.float() for x in xs])
    lo = run(lambda *a: ref.nsa_reference(*a, spec, block_indices=idx), xs)
    res = {"cell": cell, "topn_ok": topn_ok, "topn_near_ties": ties, "topn_why": why,
           "bit_identical": all(torch.equal(a, b) for a, b in zip(got, again))}
    ok = topn_ok and res["bit_identical"]
    for name, a, h, l in zip(("o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), got, hi, lo):
        err, own = _rel(a, h), _rel(l, h)
        nan = bool(torch.isnan(a).any())
        res[name] = {"rel_err": err, "ref_own_err": own, "nan": nan}
        ok = ok and not nan and err < 1e-2 and err <= 2 * own + 1e-6
    res["ok"] = ok
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=None, help="default: CELLS (compile), CANDIDATE_CELLS (--run)")
    ap.add_argument("--backward", action="store_true", help="the backward kernels too")
    ap.add_argument("--decode", action="store_true", help="the decode kernels too (q_len 1, contiguous cache)")
    ap.add_argument("--variants", action="store_true",
                    help="the token-tile selection forward / dq too (tile_tokens 0), where the cell allows it")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--run", action="store_true",
                    help="on a GPU: run each cell's forward, backward and top-n against the reference "
                         "(run_cell) instead of compiling")
    args = ap.parse_args()
    args.cells = args.cells or (CANDIDATE_CELLS if args.run else CELLS)
    lift_support()
    if args.run:
        return run_cells(args)
    rows = []
    for cell in args.cells:
        try:
            plan = lower_to_plan(cell_spec(cell), "sm90")
        except Exception as e:  # the spec itself (not the kernels) refuses the cell
            rows.append({"cell": cell, "kernel": "-", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        for key in cell_keys(cell, plan, args.backward, args.decode, args.variants):
            t = time.time()
            try:
                compile_kernel(key)
                rows.append({"cell": cell, "kernel": str(key), "ok": True, "seconds": round(time.time() - t, 1)})
            except Exception as e:
                msg = str(e).strip().splitlines()
                first = next((m for m in msg if "Error" in m or "error" in m), msg[0] if msg else "")
                rows.append({"cell": cell, "kernel": str(key), "ok": False, "error": first[:300]})
            print(f"{cell:>14}  {'ok ' if rows[-1]['ok'] else 'ERR'}  {rows[-1]['kernel']}"
                  + ("" if rows[-1]["ok"] else f"  {rows[-1]['error'][:120]}"), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today()}-matrix-probe"
    stem.with_suffix(".json").write_text(json.dumps({"cells": args.cells, "backward": args.backward,
                                                      "rows": rows}, indent=1))
    lines = [f"# Kernel matrix probe (compile only, sm_90a, CPU), {datetime.date.today()}", "",
             "Paper config with the named fields changed (G: heads / 4 KV heads); the support checks lifted; "
             "each kernel of the plan compiled with the schedule a build would take (the default, else the nearest "
             "one the template accepts). Compiling is not correctness.", "",
             "| cell | kernel | compiles | error |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['kernel']} | {'yes' if r['ok'] else 'no'} | "
                     f"{r.get('error', '').replace('|', '/')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md / .json")


def run_cells(args):
    os.environ["NSA_CODEGEN_POISON_OUTPUTS"] = "1"   # op outputs NaN-filled before launch: unwritten fails
    rows = []
    for cell in args.cells:
        try:
            rows.append(run_cell(cell))
        except Exception as e:
            rows.append({"cell": cell, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        r = rows[-1]
        print(f"{cell:>16}  {'PASS' if r['ok'] else 'FAIL'}  " + (r.get("error") or " ".join(
            f"{n} {r[n]['rel_err']:.1e}/{r[n]['ref_own_err']:.1e}" for n in ("o", "dq", "dk", "dv"))
            + f" topn {'ok' if r['topn_ok'] else r['topn_why']}"), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today()}-matrix-run"
    stem.with_suffix(".json").write_text(json.dumps({"cells": args.cells, "rows": rows}, indent=1))
    lines = [f"# Kernel matrix run (GPU, support lifted), {datetime.date.today()}", "",
             "Each cell's kernels against the fp32 reference (B=2, T=333): top-n lists up to near ties, then the "
             "output and the gradients on the kernels' own lists, relative error / the reference's own in the "
             "dtype; a cell passes at < 1e-2 and <= 2x the reference's own, bit-identical twice, no NaN.", "",
             "| cell | pass | o | dq | dk | dv | top-n | error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = " | ".join(f"{r[n]['rel_err']:.1e} / {r[n]['ref_own_err']:.1e}" if n in r else ""
                          for n in ("o", "dq", "dk", "dv"))
        topn = ("ok" if r["topn_ok"] else "differs") if "topn_ok" in r else ""
        lines.append(f"| {r['cell']} | {'yes' if r['ok'] else 'no'} | {errs} | {topn} | "
                     f"{r.get('error', '').replace('|', '/')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md / .json")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
