"""benchmarks/probe_matrix.py: cells outside the support matrix lower once the checks are lifted."""
import pytest

from nsa_codegen import spec as spec_mod
from nsa_codegen.lowering import lower_to_plan
from nsa_codegen.resources import template_module


def test_lifted_checks_lower_cells_the_matrix_refuses(monkeypatch, load_script):
    probe = load_script("benchmarks/probe_matrix.py")
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


def test_candidate_cells_plan_every_kind_with_a_schedule(monkeypatch, load_script):
    """The kernels prebuild.py builds for `probe_matrix.py --run`: every forward and backward kind of
    each candidate cell, each with a schedule its template accepts."""
    probe = load_script("benchmarks/probe_matrix.py")
    problem = template_module("_problem")
    for mod, names in ((spec_mod, ("SUPPORTED_HEAD_DIMS", "SUPPORTED_V_HEAD_DIMS", "SUPPORTED_GROUPS")),
                       (problem, ("HEAD_DIMS", "V_HEAD_DIMS", "GROUPS"))):
        for name in names:
            monkeypatch.setattr(mod, name, getattr(mod, name))
    probe.lift_support()
    from nsa_codegen.codegen import check_schedule
    for cell in probe.CANDIDATE_CELLS:
        plan = lower_to_plan(probe.cell_spec(cell), "sm90")
        keys = probe.cell_keys(cell, plan, backward=True)
        assert len(keys) == len(plan.calls) + len(plan.backward)
        assert {"selection_bwd_dq", "selection_bwd_dkdv", "gate_combine_bwd"} <= {k.kind for k in keys}
        for k in keys:
            assert check_schedule(k, dict(k.schedule)) is None, k


@pytest.mark.gpu
def test_run_cell_passes_a_cell_of_the_matrix(load_script):
    """The --run check itself: a cell inside the support matrix (GPU-tested by tests/test_ops*.py)
    passes it."""
    res = load_script("benchmarks/probe_matrix.py").run_cell("Dk=128,Dv=128", T=200)
    assert res["ok"], res
