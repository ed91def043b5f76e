import pytest

from nsa_codegen.kernel_key import KernelKey, schedule_hash


def sel_key(**kw):
    args = dict(arch="sm90", kind="selection_fwd", dtype="bfloat16", head_dim=192, v_head_dim=128, kv_heads=4,
                group=16, sel_block=64, top_n=16)
    args.update(kw)
    return KernelKey.make(**args)


def test_key_string_is_readable_and_stable():
    k = sel_key()
    assert str(k) == "sm90/selection_fwd/bf16/dk192_dv128/h4_g16/bs64_n16"
    ks = k.with_schedule({"threads": 128, "num_stages": 2})
    assert str(ks) == f"sm90/selection_fwd/bf16/dk192_dv128/h4_g16/bs64_n16/s-{schedule_hash({'num_stages': 2, 'threads': 128})}"
    assert ks.problem == k and ks.problem_id == str(k)
    assert "/" not in ks.dirname


def test_schedule_hash_ignores_key_order_but_not_values():
    assert schedule_hash({"a": 1, "b": 2}) == schedule_hash({"b": 2, "a": 1})
    assert schedule_hash({"a": 1, "b": 2}) != schedule_hash({"a": 1, "b": 3})
    assert len(schedule_hash({})) == 6


def test_keys_differ_by_every_field():
    base = sel_key()
    variants = [sel_key(arch="sm80"), sel_key(dtype="float16"), sel_key(head_dim=128), sel_key(v_head_dim=64),
                sel_key(kv_heads=8), sel_key(group=1), sel_key(sel_block=32), sel_key(top_n=8),
                sel_key(scale=0.125)]
    strings = {str(base)} | {str(v) for v in variants}
    assert len(strings) == len(variants) + 1
    assert "sc0.125" in str(sel_key(scale=0.125))


def test_topn_key_has_no_value_dim_and_all_params():
    k = KernelKey.make(arch="sm90", kind="selection_topn", dtype="float16", head_dim=128, v_head_dim=0,
                       kv_heads=4, group=16, cmp_block=32, stride=16, first_block=1, sel_block=64, top_n=16,
                       initial=1, local=2)
    assert str(k) == "sm90/selection_topn/fp16/dk128/h4_g16/l32_d16_f1_bs64_n16_i1_loc2"


@pytest.mark.parametrize("bad,match", [
    (dict(arch="sm70"), "arch"), (dict(kind="decode"), "kind"), (dict(dtype="float32"), "dtype"),
])
def test_bad_keys_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        sel_key(**bad)


def test_missing_or_extra_params_are_named():
    with pytest.raises(ValueError, match="missing \\['top_n'\\]"):
        KernelKey.make(arch="sm90", kind="selection_fwd", dtype="bfloat16", head_dim=64, v_head_dim=64,
                       kv_heads=1, group=1, sel_block=64)
    with pytest.raises(ValueError, match="unexpected \\['window'\\]"):
        sel_key(window=3)
