"""Which cells outside the kernels' support matrix already compile (issue 18, groundwork; CPU only).

    python benchmarks/probe_matrix.py [--cells "G=6" "Dk=80,Dv=80" ...] [--backward] [--out DIR]

For each cell (fields of the paper config changed: G = heads / kv_heads with kv_heads 4, Dk, Dv),
lifts the support checks (nsa_codegen.spec's SUPPORTED_* and templates/_problem's lists), lowers the
spec and TileLang-compiles every kernel of its plan for sm_90a with the schedule a build would take (the
default, else the nearest one the template accepts). Writes
<out>/<date>-matrix-probe.{md,json}: per cell and kernel, compiled or the first line of the error.
Compiling says nothing about correctness: a cell joins the support matrix only when its GPU tests
against the reference pass.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nsa_codegen import spec as spec_mod  # noqa: E402
from nsa_codegen.codegen import compile_kernel  # noqa: E402
from nsa_codegen.lowering import lower_to_plan  # noqa: E402
from nsa_codegen.resources import template_module  # noqa: E402
from nsa_codegen.codegen import check_schedule  # noqa: E402
from nsa_codegen.schedules import default_schedule, resolve_schedule  # noqa: E402

CELLS = ["G=5", "G=10", "Dk=32,Dv=32", "Dk=80,Dv=80", "Dk=96,Dv=96", "Dk=160,Dv=96", "Dk=128,Dv=32"]


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=CELLS)
    ap.add_argument("--backward", action="store_true", help="the backward kernels too")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    lift_support()
    rows = []
    for cell in args.cells:
        try:
            plan = lower_to_plan(cell_spec(cell), "sm90")
        except Exception as e:  # the spec itself (not the kernels) refuses the cell
            rows.append({"cell": cell, "kernel": "-", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        for call in plan.calls + (plan.backward if args.backward else ()):
            # The schedule a build would take (the default, else the nearest one the template
            # accepts); the default where none fits, so the compile error is the template's own.
            try:
                key = call.key.with_schedule(resolve_schedule(call.key, lambda sc, p=call.key: check_schedule(p, sc))[0])
            except ValueError:
                key = call.key.with_schedule(default_schedule(call.key))
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


if __name__ == "__main__":
    main()
