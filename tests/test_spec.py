import dataclasses
import re

import pytest

from nsa_codegen import CompressionBranch, KernelSupportError, NSASpec, SelectionBranch, SpecError, WindowBranch
from nsa_codegen.lowering import lower_to_plan
from nsa_codegen.spec import kernel_support

PAPER_YAML = """
heads: 64            # query heads HQ
kv_heads: 4
head_dim: 192
v_head_dim: 128
dtype: bfloat16
causal: true
scale: null
compression: {block: 32, stride: 16, pool: mlp}
selection:   {block: 64, top_n: 16, initial: 1, local: 2}
window:      {size: 512}
"""


def test_paper_yaml_parses():
    s = NSASpec.from_yaml(PAPER_YAML)
    assert (s.heads, s.kv_heads, s.group, s.head_dim, s.v_head_dim) == (64, 4, 16, 192, 128)
    assert s.compression == CompressionBranch(32, 16, "mlp", 0)
    assert s.selection == SelectionBranch(64, 16, 1, 2)
    assert s.window == WindowBranch(512)
    assert s.softmax_scale == pytest.approx(192 ** -0.5)


def test_yaml_round_trip_and_file(tmp_path):
    s = NSASpec(heads=8, kv_heads=8, head_dim=64, dtype="float16", scale=0.1,
                compression=CompressionBranch(16, 16, "mean", 1), selection=SelectionBranch(32, 8, 0, 1),
                window=None)
    assert NSASpec.from_yaml(s.to_yaml()) == s
    path = tmp_path / "spec.yaml"
    path.write_text(s.to_yaml())
    assert NSASpec.from_yaml(path) == s
    assert NSASpec.from_yaml(str(path)) == s
    assert NSASpec.from_dict(s.to_dict()) == s


def test_branches_switch_off():
    s = NSASpec.from_yaml("heads: 4\nkv_heads: 4\nhead_dim: 64\ncompression: null\nwindow: {size: 0}\n")
    assert s.compression is None and s.window is None and s.window_size == 0
    assert s.selection is not None
    assert s.v_head_dim == 64


# (field named in the error, overrides): invalid NSA, whatever the kernels cover
BAD = [
    ("kv_heads", dict(heads=64, kv_heads=5)),
    ("heads", dict(heads=0)),
    ("head_dim", dict(head_dim=0)),
    ("v_head_dim", dict(v_head_dim=-1)),
    ("dtype", dict(dtype="int8")),
    ("causal", dict(causal=False)),
    ("scale", dict(scale=-1.0)),
    ("compression.stride", dict(compression=dict(block=32, stride=12))),
    ("compression.stride", dict(compression=dict(block=32, stride=0))),
    ("compression.pool", dict(compression=dict(pool="max"))),
    ("compression.first_block", dict(compression=dict(first_block=-1))),
    ("selection.block", dict(compression=dict(block=64, stride=64), selection=dict(block=32))),
    ("selection.top_n", dict(selection=dict(top_n=2, initial=1, local=2))),
    ("selection.top_n", dict(selection=dict(top_n=0))),
    ("selection.initial", dict(selection=dict(initial=-1))),
    ("selection.local", dict(selection=dict(local=-2))),
    ("window.size", dict(window=dict(size=-5))),
    ("spec", dict(compression=None, selection=None, window=None)),
    ("unknown_field", dict(unknown_field=1)),
    ("selection.topn", dict(selection=dict(topn=3))),
]

# (field named in the kernel-support error, overrides): valid NSA the kernels do not cover
BEYOND_KERNELS = [
    ("group", dict(heads=40, kv_heads=8)),
    ("head_dim", dict(head_dim=96)),
    ("v_head_dim", dict(v_head_dim=256)),
    ("dtype", dict(dtype="float32")),
    ("compression.block", dict(compression=dict(block=48, stride=16))),
    ("selection.block", dict(selection=dict(block=48))),
    ("selection.top_n", dict(selection=dict(top_n=33))),
    ("window.size", dict(window=dict(size=5000))),
    ("window.size", dict(window=dict(size=8192))),
]


def _spec_dict(overrides):
    base = NSASpec().to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("field,overrides", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_validation_errors_name_the_field(field, overrides):
    with pytest.raises(SpecError) as e:
        NSASpec.from_dict(_spec_dict(overrides))
    assert str(e.value).startswith(field), str(e.value)
    assert e.value.field == field or e.value.field.startswith(field)


@pytest.mark.parametrize("field,overrides", BEYOND_KERNELS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BEYOND_KERNELS)])
def test_kernel_support_is_lowering_s_question_not_validity(field, overrides):
    """A valid spec outside the kernels' matrix constructs, the reference runs it, and lowering
    (hence nsa_attention and the layer's kernel path) raises naming the field and what is supported."""
    spec = NSASpec.from_dict(_spec_dict(overrides))
    (name, why), *_ = kernel_support(spec)
    assert name.startswith(field) and "supported:" in why
    with pytest.raises(KernelSupportError, match=f"^{re.escape(name)}: .*supported: .*reference"):
        lower_to_plan(spec, "sm90")


def test_error_says_what_is_supported():
    with pytest.raises(KernelSupportError, match=r"supported: \[64, 128, 192, 256\]"):
        lower_to_plan(NSASpec(head_dim=100), "sm90")


@pytest.mark.parametrize("spec", [
    # the seed article's long-context compression (l = 256, d = 128; stride / block 0.5), an odd group
    NSASpec(heads=48, kv_heads=8, head_dim=96, compression=dict(block=256, stride=128, pool="mean"),
            selection=dict(block=256, top_n=3, initial=1, local=1), window=dict(size=32), dtype="float32"),
    NSASpec(heads=6, kv_heads=2, head_dim=80, v_head_dim=48, compression=dict(block=16, stride=8, pool="mlp"),
            selection=dict(block=24, top_n=40, initial=2, local=2), window=dict(size=5)),
], ids=["seed_l256_g6_f32", "d80_dv48_n40"])
def test_reference_and_layer_run_specs_beyond_the_kernels(spec):
    import torch
    from nsa_codegen import NativeSparseAttention
    layer = NativeSparseAttention(32, spec)
    y = layer(torch.randn(1, 300, 32))
    assert y.shape == (1, 300, 32) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert layer.q_proj.weight.grad is not None


def test_bad_yaml_and_non_mapping():
    with pytest.raises(SpecError, match="not valid YAML"):
        NSASpec.from_yaml("heads: [1,\n")
    with pytest.raises(SpecError, match="mapping"):
        NSASpec.from_yaml("- 1\n- 2\n")
    with pytest.raises(SpecError, match="integer"):
        NSASpec(heads="64")


def test_spec_is_frozen_and_hashable():
    s = NSASpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.heads = 8
    assert hash(s) == hash(NSASpec.from_yaml(s.to_yaml()))
