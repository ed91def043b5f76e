"""benchmarks/probe_matrix.py: cells outside the support matrix lower once the checks are lifted."""
import importlib.util
from pathlib import Path

import pytest

from nsa_codegen import spec as spec_mod
from nsa_codegen.lowering import lower_to_plan
from nsa_codegen.resources import template_module


def _probe():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "probe_matrix.py"
    mod_spec = importlib.util.spec_from_file_location("probe_matrix", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_lifted_checks_lower_cells_the_matrix_refuses(monkeypatch):
    probe = _probe()
    problem = template_module("_problem")
    for mod, names in ((spec_mod, ("SUPPORTED_HEAD_DIMS", "SUPPORTED_V_HEAD_DIMS", "SUPPORTED_GROUPS")),
                       (problem, ("HEAD_DIMS", "V_HEAD_DIMS", "GROUPS"))):
        for name in names:   # restored after the test
            monkeypatch.setattr(mod, name, getattr(mod, name))
    cell = probe.cell_spec("G=5,Dk=80,Dv=96")
    assert (cell.group, cell.head_dim, cell.v_head_dim) == (5, 80, 96)
    with pytest.raises(spec_mod.KernelSupportError, match="group"):
        lower_to_plan(cell, "sm90")
    probe.lift_support()
    kinds = {c.key.kind for c in lower_to_plan(cell, "sm90").calls}
    assert {"compression_fwd", "selection_topn", "selection_fwd", "window_fwd", "gate_combine"} <= kinds
