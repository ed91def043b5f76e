"""The kernel registry: every kind is complete and agrees with its template and with lowering."""
import dataclasses

import pytest

from nsa_codegen import NSASpec
from nsa_codegen.build import plan_keys
from nsa_codegen.codegen import build_prim_func, template_config
from nsa_codegen.kernel_key import KernelKey
from nsa_codegen.kinds import KINDS, forward_of, kind
from nsa_codegen.lowering import lower_to_plan
from nsa_codegen.resources import template_module


def _keys_of_every_kind():
    """One scheduled key per kind, from the paper spec's forward, backward and decode plans."""
    keys = {}
    for key, _ in plan_keys({"paper": NSASpec()}, "sm90"):
        keys.setdefault(key.kind, key)
    return keys


def test_the_paper_plans_use_every_kind():
    assert set(_keys_of_every_kind()) == set(KINDS)


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="unknown kernel kind 'selection_bwd'.*known"):
        kind("selection_bwd")


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_matches_its_template(name):
    entry = KINDS[name]
    mod = template_module(entry.template)
    cls = getattr(mod, entry.config)
    fields = {f.name for f in dataclasses.fields(cls)}
    # Every problem parameter reaches the config (the selection block under its template name).
    for p in entry.param_names:
        assert p in fields or (p == "sel_block" and "block" in fields), (name, p)
    if entry.part is not None:
        assert "part" in fields, name
    # The registry's launch signature is the prim_func's, argument for argument.
    key = _keys_of_every_kind()[name]
    func, _ = build_prim_func(key)
    assert len(func.params) == len(entry.args), (name, [str(p) for p in func.params], entry.args)
    if entry.part is not None:
        assert template_config(key).part == entry.part


def test_backward_kinds_share_their_forward_problem():
    for entry in KINDS.values():
        for b in entry.backward:
            assert forward_of(b.kind) == entry.name
            assert KINDS[b.kind].params == entry.params
            assert KINDS[b.kind].tuned_by == "op"
    assert forward_of("selection_fwd") is None and forward_of("decode_cmp") is None


def test_keys_zero_the_dims_a_kind_never_reads():
    common = dict(arch="sm90", dtype="bfloat16", head_dim=192, v_head_dim=128, kv_heads=4, group=16, scale=0.1)
    gate = KernelKey.make(kind="gate_combine", branches="cmp.slc.win", **common)
    assert (gate.head_dim, gate.v_head_dim, gate.scale) == (0, 128, None)
    topn = KernelKey.make(kind="selection_topn", cmp_block=32, stride=16, first_block=0, sel_block=64, top_n=16,
                          initial=1, local=2, **common)
    assert (topn.head_dim, topn.v_head_dim, topn.scale) == (192, 0, 0.1)


def test_backward_plan_binds_the_registry_names():
    plan = lower_to_plan(NSASpec())
    produced = {"q", "k", "v", "k_cmp", "v_cmp", "k_win", "v_win", "g_cmp", "g_slc", "g_win", "do", "block_units",
                "seq_start", "cmp_start",   # the inputs of a forward: tensors, and the pack's token maps
                "row_first", "row_end"}     # (block_units and the row spans: derived by their ops)
    for c in plan.calls:
        produced |= set(c.outputs)
    produced |= {f"d{x}" for x in ("lse_cmp", "lse_slc", "lse_win")}
    for c in plan.backward:  # every tensor a backward kernel reads exists before it runs
        assert set(c.inputs) <= produced, c
        produced |= set(c.outputs)
    gate = plan.backward[0]
    assert gate.kind == "gate_combine_bwd" and gate.inputs == ("do",) + plan.calls[-1].inputs
    assert gate.outputs == tuple(f"d{x}" for x in plan.calls[-1].inputs)
    assert all(c.key == c.key.problem and c.key.kind == c.kind for c in plan.backward)
