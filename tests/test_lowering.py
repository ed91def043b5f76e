import pytest

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch
from nsa_codegen.lowering import arch_of_capability, lower_to_plan, normalize_arch


def test_paper_plan_order_and_tensors():
    plan = lower_to_plan(NSASpec(), "sm90")
    assert [c.kind for c in plan.calls] == ["compression_fwd", "selection_topn", "selection_fwd", "window_fwd",
                                            "gate_combine"]
    produced = {"q", "k", "v", "k_cmp", "v_cmp", "k_win", "v_win", "g_cmp", "g_slc", "g_win",
                "seq_start", "cmp_start"}   # (a pack's token maps; None for a batch)
    for call in plan.calls:  # every input exists before the call that reads it
        assert set(call.inputs) <= produced, call
        produced |= set(call.outputs)
    assert plan.combine == (("g_cmp", "o_cmp"), ("g_slc", "o_slc"), ("g_win", "o_win"))
    assert str(plan.calls[2].key) == "sm90/selection_fwd/bf16/dk192_dv128/h4_g16/bs64_n16"
    assert str(plan.calls[1].key) == "sm90/selection_topn/bf16/dk192/h4_g16/l32_d16_f0_bs64_n16_i1_loc2"
    assert str(plan.calls[4].key) == "sm90/gate_combine/bf16/dv128/h4_g16/b-cmp.slc.win"
    assert "window_fwd" in plan.describe()


def test_explicit_indices_skip_topn_and_branches_switch_off():
    plan = lower_to_plan(NSASpec(window={"size": 0}), "sm_90a", explicit_indices=True)
    assert [c.kind for c in plan.calls] == ["compression_fwd", "selection_fwd", "gate_combine"]
    assert plan.calls[-1].key.param["branches"] == "cmp.slc"
    spec = NSASpec(compression=None, selection=SelectionBranch(64, 16), window=None)
    assert [c.kind for c in lower_to_plan(spec, "sm80", explicit_indices=True).calls] == ["selection_fwd",
                                                                                           "gate_combine"]
    with pytest.raises(ValueError, match="block_indices"):
        lower_to_plan(spec, "sm90")
    only_cmp = NSASpec(compression=CompressionBranch(), selection=None, window=None)
    assert [c.kind for c in lower_to_plan(only_cmp).calls] == ["compression_fwd", "gate_combine"]


def test_arch_names():
    assert normalize_arch("sm_90a") == "sm90" and normalize_arch("SM80") == "sm80"
    with pytest.raises(ValueError, match="supported: sm80, sm90"):
        normalize_arch("sm75")
    assert arch_of_capability(9, 0) == "sm90" and arch_of_capability(8, 9) == "sm80"
    with pytest.raises(ValueError, match="sm80 or newer"):
        arch_of_capability(7, 5)


def test_arch_override_picks_older_kernels_only(monkeypatch):
    monkeypatch.setenv("NSA_CODEGEN_ARCH", "sm80")
    assert arch_of_capability(9, 0) == "sm80" and arch_of_capability(8, 0) == "sm80"
    monkeypatch.setenv("NSA_CODEGEN_ARCH", "sm90")
    assert arch_of_capability(9, 0) == "sm90"
    with pytest.raises(ValueError, match="need compute capability 9"):
        arch_of_capability(8, 6)
    monkeypatch.setenv("NSA_CODEGEN_ARCH", "sm75")
    with pytest.raises(ValueError, match="supported: sm80, sm90"):
        arch_of_capability(9, 0)


def test_backward_plan_mirrors_the_forward():
    plan = lower_to_plan(NSASpec())
    assert [c.kind for c in plan.backward] == [
        "gate_combine_bwd", "compression_bwd_dq", "compression_bwd_dkdv", "selection_bwd_dq", "selection_bwd_dkdv",
        "selection_bwd_reduce", "window_bwd_dq", "window_bwd_dkdv"]
    fwd = {c.kind: c.key for c in plan.calls}
    for c in plan.backward:
        twin = fwd[c.kind.split("_bwd")[0] + ("_fwd" if not c.kind.startswith("gate") else "")]
        # Same problem parameters, dims and group as the forward kernel it differentiates.
        assert (c.key.params, c.key.head_dim, c.key.v_head_dim, c.key.group) == \
            (twin.params, twin.head_dim, twin.v_head_dim, twin.group)
    assert str(plan.backward[4].key) == "sm90/selection_bwd_dkdv/bf16/dk192_dv128/h4_g16/bs64_n16"
    assert plan.all_calls == plan.calls + plan.backward + plan.decode
    no_window = lower_to_plan(NSASpec(window=None))
    assert not any(c.kind.startswith("window") for c in no_window.backward)
    assert no_window.backward[0].key.param["branches"] == "cmp.slc"


def test_decode_plan_names_its_four_kernels():
    from nsa_codegen.lowering import decode_seqlen_bucket, lower_decode
    spec = NSASpec(head_dim=128, v_head_dim=128, dtype="float16")
    calls = lower_decode(spec, "sm90", q_len=2, separate_window=True, capacity=200_000)
    assert [c.kind for c in calls] == ["decode_cmp", "decode_topn", "decode_sparse", "decode_combine"]
    assert str(calls[0].key) == "sm90/decode_cmp/fp16/dk128_dv128/h4_g16/l32_d16_f0_bs64_n16_i1_loc2_w512_q2_sw1_ms262144"
    assert decode_seqlen_bucket(1) == decode_seqlen_bucket(131072) == 131072
    # the forward plan carries the one-token decode step for 128k caches, and its cmp / sparse
    # kernels over a paged cache of the default pages
    paged = lower_decode(spec, page_size=64)
    assert [c.kind for c in paged] == ["decode_cmp_paged", "decode_topn", "decode_sparse_paged", "decode_combine"]
    assert str(paged[0].key).endswith("_q1_sw0_ms131072_pg64")
    assert paged[1].key == lower_decode(spec)[1].key   # top-n and combine read no cache: shared
    assert lower_to_plan(spec).decode == lower_decode(spec) + (paged[0], paged[2])
    with pytest.raises(ValueError, match="q_len"):
        lower_decode(spec, q_len=9)
    with pytest.raises(ValueError, match="all three branches"):
        lower_decode(NSASpec(window=None))
    assert lower_to_plan(NSASpec(window=None)).decode == ()
