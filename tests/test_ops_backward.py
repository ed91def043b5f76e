"""Backward: every branch's gradients, the whole NSA forward + backward and the layer against the
reference's autograd, over the config matrix (GPU), plus the transposed selection map (CPU).

Gradient buffers are NaN-poisoned before launch (see conftest). Tolerance as for the forward:
relative error below 1e-2 and at most 2x the error of the same reference run in the kernel's dtype.
"""

import pytest
import torch

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen import reference as ref
from nsa_codegen.ops import selection_block_units

from test_ops import MATRIX, f32, make_inputs, rel_err

gpu = pytest.mark.gpu
# The forward matrix, with two changes: the paper config at T=2000 (the fp32 reference's autograd
# at T=4099 is slow), and Dk=256 with selection block 64: Dk=256 with block 128 has no backward
# (its dk/dv accumulators do not fit in registers; test_unsupported_backward_fails_clearly).
BWD_MATRIX = [m for m in MATRIX if m[0] not in ("paper_bf16", "g2_d256")] + [
    ("paper_bf16_T2000", MATRIX[0][1], 1, 2000),
    ("g2_d256_bs64", NSASpec(heads=8, kv_heads=4, head_dim=256, v_head_dim=128,
                             compression=CompressionBranch(64, 32, "mean"), selection=SelectionBranch(64, 4, 1, 1),
                             window=WindowBranch(1024)), 1, 2500),
]
BWD_IDS = [m[0] for m in BWD_MATRIX]


@pytest.fixture(scope="module")
def precompiled():
    """Compile every forward and backward kernel these tests use, in parallel, once."""
    from nsa_codegen.cache import precompile
    from nsa_codegen.lowering import arch_of_capability, lower_to_plan
    arch = arch_of_capability(*torch.cuda.get_device_capability())
    specs = [m[1] for m in BWD_MATRIX] + [s for _, s in LAYER_SPECS] + [BF16_LAYER_SPEC]
    problems = list(dict.fromkeys(c.key for spec in specs for c in lower_to_plan(spec, arch).all_calls))
    failed = [(k, e) for k, e, _ in precompile(problems) if e]
    assert not failed, failed


def assert_grad_close(name, got, hi, lo):
    assert got is not None, f"{name}: no gradient"
    assert not torch.isnan(got).any(), f"{name}: NaN in gradient (unwritten elements?)"
    err, err_lo = rel_err(got, hi), rel_err(lo, hi)
    assert err < 1e-2, f"{name}: relative error {err:.2e} >= 1e-2 (reference in dtype: {err_lo:.2e})"
    assert err <= 2 * err_lo + 1e-6, f"{name}: relative error {err:.2e} > 2x the reference's own {err_lo:.2e}"


def _grads(fn, inputs, do, dlse):
    """Gradients of (o . do) + (lse . dlse) w.r.t. inputs (lse's -inf rows carry no gradient)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    o, lse = fn(*leaves)
    fin = torch.isfinite(lse)
    loss = (o.float() * do.float()).sum() + (torch.where(fin, lse, torch.zeros_like(lse)).float() * dlse).sum()
    return torch.autograd.grad(loss, leaves)


def _assert_schedule_grads(problem, kernel, kern, oracle, inputs, do, dlse, names, label):
    """The op's gradients with `kernel` swapped in for `problem`: twice bit-identical, and each (names)
    against the fp32 oracle's autograd (assert_grad_close, labelled label/<name>)."""
    from nsa_codegen.cache import use_kernel
    with use_kernel(problem, kernel):
        got = _grads(kern, inputs, do, dlse)
        again = _grads(kern, inputs, do, dlse)
    assert all(torch.equal(a, b) for a, b in zip(got, again)), f"{kernel.key}: gradients changed between runs"
    hi = _grads(oracle, f32(*inputs), do.float(), dlse)
    lo = _grads(oracle, inputs, do, dlse)
    for what, a, h, l in zip(names, got, hi, lo):
        assert_grad_close(f"{label}/{what}", a, h, l)


def _branch_cases():
    for name, spec, B, T in BWD_MATRIX:
        for branch in ("cmp", "slc", "win"):
            if branch == "win" and spec.window is None:
                continue
            yield pytest.param(name, spec, B, T, branch, id=f"{name}-{branch}")


@gpu
@pytest.mark.parametrize("name,spec,B,T,branch", list(_branch_cases()))
def test_branch_gradients(name, spec, B, T, branch, precompiled):
    from nsa_codegen import nsa_attention, ops
    q, k, v, gates = make_inputs(spec, B, T, seed=21)
    scale = spec.softmax_scale
    c, s = spec.compression, spec.selection
    if branch == "cmp":
        kc, vc = ref.compress(k, c.block, c.stride, c.first_block), ref.compress(v, c.block, c.stride, c.first_block)
        inputs = (q, kc, vc)
        kern = lambda q_, k_, v_: ops.compression_attention(q_, k_, v_, c.block, c.stride, c.first_block, -1.0)
        oracle = lambda q_, k_, v_: ref.compression_attention(q_, k_, v_, c.block, c.stride, c.first_block, scale)
    elif branch == "slc":
        _, idx = nsa_attention(q, k, v, *gates, spec, return_indices=True)
        inputs = (q, k, v)
        kern = lambda q_, k_, v_: ops.selection_attention(q_, k_, v_, idx, s.block, -1.0)
        oracle = lambda q_, k_, v_: ref.selection_attention(q_, k_, v_, idx, s.block, scale)
    else:
        inputs = (q, k, v)
        kern = lambda q_, k_, v_: ops.window_attention(q_, k_, v_, spec.window.size, -1.0)
        oracle = lambda q_, k_, v_: ref.window_attention(q_, k_, v_, spec.window.size, scale)
    g = torch.Generator(device="cuda").manual_seed(22)
    do = torch.randn(B, T, spec.heads, spec.v_head_dim, generator=g, device="cuda").to(q.dtype)
    dlse = torch.randn(B, T, spec.heads, generator=g, device="cuda")
    got = _grads(kern, inputs, do, dlse)
    hi = _grads(oracle, f32(*inputs), do.float(), dlse)
    lo = _grads(oracle, inputs, do, dlse)
    for what, a, h, l in zip(("dq", "dk", "dv"), got, hi, lo):
        assert_grad_close(f"{name}/{branch}/{what}", a, h, l)


@gpu
@pytest.mark.parametrize("name,spec,B,T", BWD_MATRIX, ids=BWD_IDS)
def test_nsa_attention_gradients(name, spec, B, T, precompiled):
    """q, k, v (through mean-pooled k_cmp / v_cmp too) and the three gates."""
    from nsa_codegen import nsa_attention
    q, k, v, gates = make_inputs(spec, B, T, seed=23)
    _, idx = nsa_attention(q, k, v, *gates, spec, return_indices=True)
    do = torch.randn(B, T, spec.heads, spec.v_head_dim, device="cuda").to(q.dtype)

    def grads(fn, xs, **kw):
        leaves = [x.detach().requires_grad_() for x in xs]
        out = fn(*leaves, spec, **kw)
        return torch.autograd.grad((out.float() * do.float()).sum(), leaves, allow_unused=True)

    got = grads(nsa_attention, (q, k, v, *gates))
    hi = grads(ref.nsa_reference, f32(q, k, v, *gates), block_indices=idx)
    lo = grads(ref.nsa_reference, (q, k, v, *gates), block_indices=idx)
    for what, a, h, l in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), got, hi, lo):
        if h is None:  # a gate whose branch is off
            assert a is None or not a.any(), f"{name}/{what}: gradient for an off branch"
            continue
        assert_grad_close(f"{name}/{what}", a, h, l)


# k_phi.fc2.bias adds one vector to every compressed key: each query's compression softmax is
# invariant to it, so its exact gradient is 0 and a relative error on it is rounding noise / ~0.
SHIFT_INVARIANT = {"k_phi.fc2.bias"}


def _layer_grads(layer, x, dy, cu_seqlens=None):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x, cu_seqlens=cu_seqlens)
    (y.float() * dy.float()).sum().backward()
    named = {n: p.grad for n, p in layer.named_parameters()}
    named["x"] = x.grad
    return named


# n * l' covers every block at T = 700, so the top-n picks every visible block and the kernel and the
# reference (in different precisions) cannot pick different near-tied blocks; selection is checked on
# real top-n choices in test_branch_gradients.
# fp16 here: with bf16 the phi MLP's position-encoding gradient is already ~1.4e-2 off in the
# reference itself (a sum over every block of bf16 products), above the 1e-2 bound for any path.
LAYER_SPECS = [
    ("mlp_phi_all_branches", NSASpec(heads=16, kv_heads=4, head_dim=64, v_head_dim=64, dtype="float16",
                                     compression=CompressionBranch(32, 16, "mlp"), selection=SelectionBranch(64, 16, 1, 2),
                                     window=WindowBranch(64))),
    ("mean_phi_no_window", NSASpec(heads=8, kv_heads=1, head_dim=128, v_head_dim=128, dtype="float16",
                                   compression=CompressionBranch(32, 32, "mean"), selection=SelectionBranch(64, 16, 1, 1),
                                   window=None)),
]


@gpu
@pytest.mark.parametrize("name,spec", LAYER_SPECS, ids=[n for n, _ in LAYER_SPECS])
def test_layer_parameter_gradients(name, spec, precompiled):
    """Every parameter (projections, phi MLPs, gate MLP) and the input, kernel path vs reference path."""
    from nsa_codegen import NativeSparseAttention
    torch.manual_seed(24)
    hidden, T = 96, 700
    dt = getattr(torch, spec.dtype)
    layer = NativeSparseAttention(hidden, spec).cuda()
    x = torch.randn(2, T, hidden, device="cuda")
    dy = torch.randn(2, T, hidden, device="cuda")
    hi_layer = NativeSparseAttention(hidden, spec, backend="reference").cuda()
    hi_layer.load_state_dict(layer.state_dict())
    lo_layer = NativeSparseAttention(hidden, spec, backend="reference").cuda().to(dt)
    lo_layer.load_state_dict(layer.state_dict())
    got = _layer_grads(layer.to(dt), x.to(dt), dy.to(dt))
    hi = _layer_grads(hi_layer, x, dy)
    lo = _layer_grads(lo_layer, x.to(dt), dy.to(dt))
    assert set(got) == set(hi)
    for n in got:
        if n in SHIFT_INVARIANT:
            continue
        assert_grad_close(f"{name}/{n}", got[n], hi[n], lo[n])


# The training-step tests run the layer in bf16 (autocast), the usual training dtype.
BF16_LAYER_SPEC = NSASpec(heads=16, kv_heads=4, head_dim=64, v_head_dim=64, dtype="bfloat16",
                          compression=CompressionBranch(32, 16, "mlp"), selection=SelectionBranch(64, 16, 1, 2),
                          window=WindowBranch(64))


def _pack_case(lens, seed, case=3):
    """MATRIX[case]'s spec and inputs on a pack of sequences of `lens`: (name, spec, (q, k, v, *gates),
    cu_seqlens, do, the block lists the kernels' forward chose)."""
    from nsa_codegen import nsa_attention
    name, spec, _, _ = MATRIX[case]
    q, k, v, gates = make_inputs(spec, 1, sum(lens), seed=seed)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], device="cuda", dtype=torch.int32)
    do = torch.randn_like(q[..., :spec.v_head_dim])
    with torch.no_grad():
        _, idx = nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu, return_indices=True)
    return name, spec, (q, k, v, *gates), cu, do, idx


def _pack_grads(fn, xs, do):
    leaves = [x.detach().requires_grad_() for x in xs]
    return torch.autograd.grad((fn(*leaves) * do).float().sum(), leaves)


def _assert_pack_grads_match_the_reference(label, spec, xs, cu, do, idx, got):
    """got (the gradients of q, k, v and the gates) against the reference's autograd per sequence."""
    oracle = lambda *ys: ref.nsa_reference(*ys, spec, block_indices=idx, cu_seqlens=cu)  # noqa: E731
    hi = _pack_grads(oracle, f32(*xs), do.float())
    lo = _pack_grads(oracle, xs, do)
    for what, p, h, l in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), got, hi, lo):
        assert_grad_close(f"{label}/pack/{what}", p, h, l)


@gpu
def test_cu_seqlens_gradients_match_the_reference_per_sequence(precompiled):
    """A pack trains in one launch per kernel: the gradients of q, k, v and the gates match the
    reference's autograd on each sequence alone (on the kernels' own selection), twice bit-identical."""
    from nsa_codegen import nsa_attention
    name, spec, xs, cu, do, idx = _pack_case([300, 1, 517, 64], seed=25)
    kern = lambda *ys: nsa_attention(*ys, spec, cu_seqlens=cu)  # noqa: E731
    packed = _pack_grads(kern, xs, do)
    assert all(torch.equal(a, b) for a, b in zip(packed, _pack_grads(kern, xs, do)))
    _assert_pack_grads_match_the_reference(name, spec, xs, cu, do, idx, packed)


# Selection dq schedules: 1 = per token, 0 = auto (a token tile where G >= 8).
DQ_SPECS = [m for m in BWD_MATRIX if m[0] in ("paper_bf16_T2000", "fla_cfg", "g8_d64", "g32", "tiny_T")]


def _selection_bwd_kernel(kind, q, k, v, s, schedule):
    """(kind's problem key, its kernel under the default schedule updated by `schedule`)."""
    from nsa_codegen.cache import load_scheduled
    from nsa_codegen.schedules import default_schedule
    from nsa_codegen.launch import kernel_key
    problem = kernel_key(kind, q, k, v.shape[3], -1.0, sel_block=s.block, top_n=s.top_n)
    return problem, load_scheduled(problem.with_schedule({**default_schedule(problem), **schedule}))


def _assert_selection_schedule_grads(spec, B, T, lists, kind, schedule):
    """The selection op's gradients with kind's kernel under `schedule`, on `lists` block lists
    (test_ops.selection_lists), against the reference's autograd; twice, bit-identical."""
    from nsa_codegen import ops
    from test_ops import selection_lists
    s = spec.selection
    q, k, v, _ = make_inputs(spec, B, T, seed=31)
    idx = selection_lists(lists, spec, B, T, seed=32)
    g = torch.Generator(device="cuda").manual_seed(33)
    do = torch.randn(B, T, spec.heads, spec.v_head_dim, generator=g, device="cuda").to(q.dtype)
    dlse = torch.randn(B, T, spec.heads, generator=g, device="cuda")
    problem, kernel = _selection_bwd_kernel(kind, q, k, v, s, schedule)
    kern = lambda q_, k_, v_: ops.selection_attention(q_, k_, v_, idx, s.block, -1.0)  # noqa: E731
    oracle = lambda q_, k_, v_: ref.selection_attention(q_, k_, v_, idx, s.block, spec.softmax_scale)  # noqa: E731
    _assert_schedule_grads(problem, kernel, kern, oracle, (q, k, v), do, dlse, ("dq", "dk", "dv"),
                           f"{kernel.key}/{lists}")


# Selection dq schedules: per token, the token tile (auto: 64 rows, WGMMA on sm90), and the token tile
# on mma.sync with per-warp block skip (warp_skip, 64 rows).
DQ_SCHEDULES = {"token": {"tile_tokens": 1}, "tile": {"tile_tokens": 0},
                "skip64": {"tile_tokens": 0, "threads": 128, "warp_skip": True}}


@gpu
@pytest.mark.parametrize("schedule", list(DQ_SCHEDULES))
@pytest.mark.parametrize("kind", ["uniform", "drift", "hostile"])
@pytest.mark.parametrize("name,spec,B,T", DQ_SPECS, ids=[m[0] for m in DQ_SPECS])
def test_selection_dq_schedules(name, spec, B, T, kind, schedule):
    """Each selection dq schedule, through the op's backward, against the reference's autograd on
    lists with and without locality and on hostile ones (repeats, pads, future blocks, tokens with
    nothing usable); NaN-poisoned gradients; twice, bit-identical."""
    _assert_selection_schedule_grads(spec, B, T, kind, "selection_bwd_dq", DQ_SCHEDULES[schedule])


# Selection dk/dv schedules: the default (cp.async gathers of chunk_rows rows, synchronous MMA) and
# async_mma (sm90: a token's Q | dO rows by TMA, async WGMMA, P^T / dS^T as register operands; needs
# 16 | G and 64 or 128 block rows, so the specs with G = 16, 32).
SEL_DKDV_SCHEDULES = {"sync": {}, "async": {"async_mma": True}}
SEL_DKDV_SPECS = [m for m in BWD_MATRIX if m[0] in ("paper_bf16_T2000", "fla_cfg", "g32", "tiny_T")]


@gpu
@pytest.mark.parametrize("sched", list(SEL_DKDV_SCHEDULES))
@pytest.mark.parametrize("kind", ["uniform", "drift", "hostile"])
@pytest.mark.parametrize("name,spec,B,T", SEL_DKDV_SPECS, ids=[m[0] for m in SEL_DKDV_SPECS])
def test_selection_dkdv_schedules(name, spec, B, T, kind, sched):
    """Each selection dk/dv schedule, through the op's backward, against the reference's autograd on
    lists with and without locality and on hostile ones (interior and masked steps: tokens inside and
    after their block); NaN-poisoned gradients; twice, bit-identical."""
    _assert_selection_schedule_grads(spec, B, T, kind, "selection_bwd_dkdv", SEL_DKDV_SCHEDULES[sched])


@gpu
@pytest.mark.parametrize("sched", list(SEL_DKDV_SCHEDULES))
def test_selection_dkdv_schedules_on_a_pack(sched, precompiled):
    """Each selection dk/dv schedule on a pack (a block that a sequence end cuts holds the next
    sequence's keys, which its tokens must not see): the gradients of the whole NSA equal the
    reference's per sequence."""
    from nsa_codegen import nsa_attention
    from nsa_codegen.cache import use_kernel
    name, spec, xs, cu, do, idx = _pack_case([700, 1, 1333, 64], seed=47, case=0)
    problem, kernel = _selection_bwd_kernel("selection_bwd_dkdv", *xs[:3], spec.selection,
                                            SEL_DKDV_SCHEDULES[sched])
    with use_kernel(problem, kernel):
        got = _pack_grads(lambda *ys: nsa_attention(*ys, spec, cu_seqlens=cu), xs, do)
    _assert_pack_grads_match_the_reference(f"{kernel.key}/{name}", spec, xs, cu, do, idx, got)


# Compression dk/dv schedules: the default (P^T / dS^T as register operands, 64 rows per warpgroup, async
# WGMMA, 16 token splits), the same without async WGMMA, and the earlier default (P^T / dS^T through
# shared memory, 64 rows, 128 tokens a step, 4 splits).
CMP_DKDV_SCHEDULES = {
    "default": {},
    "regs": {"kv_block_N": 128, "kv_block_M": 32, "kv_threads": 256, "kv_num_stages": 2, "kv_regs": True,
             "kv_async": False, "kv_splits": 4},
    "smem": {"kv_block_N": 64, "kv_block_M": 128, "kv_threads": 256, "kv_num_stages": 1, "kv_regs": False,
             "kv_async": False, "kv_splits": 4},
}
# Long enough that 128-row tiles have interior steps (tokens that see every row of the tile).
_CMP_T = {"paper_bf16_T2000": 4500, "fla_cfg": 9000, "g8_d64": 2600, "g12_paper": 4500, "tiny_T": 17}
CMP_SPECS = [(n, s, B, _CMP_T[n]) for n, s, B, _ in BWD_MATRIX if n in _CMP_T]


def _compression_dkdv_kernel(q, kc, v_dim, c, schedule):
    """(dkdv problem key, the dkdv kernel of that schedule)."""
    from nsa_codegen.cache import load_scheduled
    from nsa_codegen.launch import kernel_key
    from nsa_codegen.schedules import default_schedule
    problem = kernel_key("compression_bwd_dkdv", q, kc, v_dim, -1.0, cmp_block=c.block, stride=c.stride,
                         first_block=c.first_block)
    return problem, load_scheduled(problem.with_schedule({**default_schedule(problem), **schedule}))


@gpu
@pytest.mark.parametrize("sched", list(CMP_DKDV_SCHEDULES))
@pytest.mark.parametrize("name,spec,B,T", CMP_SPECS, ids=[m[0] for m in CMP_SPECS])
def test_compression_dkdv_schedules(name, spec, B, T, sched):
    """Each compression dk/dv schedule, through the op's backward, against the reference's autograd
    (interior steps unmasked, edge steps masked: T spans many row tiles); twice, bit-identical."""
    from nsa_codegen import ops
    c = spec.compression
    q, k, v, _ = make_inputs(spec, B, T, seed=41)
    kc, vc = ref.compress(k, c.block, c.stride, c.first_block), ref.compress(v, c.block, c.stride, c.first_block)
    g = torch.Generator(device="cuda").manual_seed(42)
    do = torch.randn(B, T, spec.heads, spec.v_head_dim, generator=g, device="cuda").to(q.dtype)
    dlse = torch.randn(B, T, spec.heads, generator=g, device="cuda")
    problem, kernel = _compression_dkdv_kernel(q, kc, spec.v_head_dim, c, CMP_DKDV_SCHEDULES[sched])
    kern = lambda q_, k_, v_: ops.compression_attention(q_, k_, v_, c.block, c.stride, c.first_block, -1.0)  # noqa: E731
    oracle = lambda q_, k_, v_: ref.compression_attention(q_, k_, v_, c.block, c.stride, c.first_block,  # noqa: E731
                                                          spec.softmax_scale)
    _assert_schedule_grads(problem, kernel, kern, oracle, (q, kc, vc), do, dlse, ("dq", "dk_cmp", "dv_cmp"),
                           str(kernel.key))


@gpu
@pytest.mark.parametrize("sched", list(CMP_DKDV_SCHEDULES))
def test_compression_dkdv_schedules_on_a_pack(sched, precompiled):
    """Each compression dk/dv schedule on a pack (row tiles straddle sequences, so no step of theirs
    is interior): the gradients of the whole NSA equal the reference's per sequence."""
    from nsa_codegen import nsa_attention
    from nsa_codegen.cache import use_kernel
    name, spec, xs, cu, do, idx = _pack_case([700, 1, 1333, 64], seed=43)
    c = spec.compression
    kc = ref.compress(xs[1], c.block, c.stride, c.first_block)
    problem, kernel = _compression_dkdv_kernel(xs[0], kc, spec.v_head_dim, c, CMP_DKDV_SCHEDULES[sched])
    with use_kernel(problem, kernel):
        got = _pack_grads(lambda *ys: nsa_attention(*ys, spec, cu_seqlens=cu), xs, do)
    _assert_pack_grads_match_the_reference(f"{kernel.key}/{name}", spec, xs, cu, do, idx, got)


# Window dk/dv schedules: synchronous WGMMA (default) and async (S^T with dP^T, dV with dS^T).
WIN_DKDV_SCHEDULES = {"sync": {}, "async": {"async_mma": True}}
WIN_SPECS = [m for m in BWD_MATRIX if m[0] in ("paper_bf16_T2000", "g1_small", "g8_d64", "g32", "tiny_T")]


@gpu
@pytest.mark.parametrize("sched", list(WIN_DKDV_SCHEDULES))
@pytest.mark.parametrize("name,spec,B,T", WIN_SPECS, ids=[m[0] for m in WIN_SPECS])
def test_window_dkdv_schedules(name, spec, B, T, sched):
    """Each window dk/dv schedule, through the op's backward, against the reference's autograd;
    twice, bit-identical."""
    from nsa_codegen import ops
    from nsa_codegen.cache import load_scheduled
    from nsa_codegen.launch import kernel_key
    from nsa_codegen.schedules import default_schedule
    w = spec.window.size
    q, k, v, _ = make_inputs(spec, B, T, seed=44)
    g = torch.Generator(device="cuda").manual_seed(45)
    do = torch.randn(B, T, spec.heads, spec.v_head_dim, generator=g, device="cuda").to(q.dtype)
    dlse = torch.randn(B, T, spec.heads, generator=g, device="cuda")
    problem = kernel_key("window_bwd_dkdv", q, k, spec.v_head_dim, -1.0, window=w)
    kernel = load_scheduled(problem.with_schedule({**default_schedule(problem), **WIN_DKDV_SCHEDULES[sched]}))
    kern = lambda q_, k_, v_: ops.window_attention(q_, k_, v_, w, -1.0)  # noqa: E731
    oracle = lambda q_, k_, v_: ref.window_attention(q_, k_, v_, w, spec.softmax_scale)  # noqa: E731
    _assert_schedule_grads(problem, kernel, kern, oracle, (q, k, v), do, dlse, ("dq", "dk", "dv"), str(kernel.key))


def _own_block_lists(T, seed):
    """The paper config's inputs at length T and block lists in which every token chose only its
    own block: (spec, q, k, v, idx [1, T, H, n], t = arange(T))."""
    spec = BWD_MATRIX[-2][1]   # the paper config
    s = spec.selection
    q, k, v, _ = make_inputs(spec, 1, T, seed=seed)
    idx = torch.full((1, T, spec.kv_heads, s.top_n), -1, dtype=torch.int32, device="cuda")
    t = torch.arange(T, device="cuda")
    idx[..., 0] = (t // s.block)[None, :, None]
    return spec, q, k, v, idx, t


@gpu
@pytest.mark.parametrize("schedule", list(DQ_SCHEDULES))
def test_selection_nan_key_after_a_token_stays_out_of_its_output_and_dq(schedule):
    """A NaN key after token t in t's own block (a later token's) reaches neither t's output nor its
    dq, under either selection schedule (forward and dq); the token that owns the key gets NaN."""
    from nsa_codegen import ops
    from nsa_codegen.cache import load_scheduled, use_kernel
    from nsa_codegen.launch import kernel_key
    from nsa_codegen.schedules import default_schedule
    spec, q, k, v, idx, t = _own_block_lists(512, seed=35)   # every token: its own block only
    s = spec.selection
    poisoned = k.clone()
    last = t[t % s.block == s.block - 1]
    poisoned[:, last] = float("nan")                       # the last key of every block
    fwd = kernel_key("selection_fwd", q, k, v.shape[3], -1.0, sel_block=s.block, top_n=s.top_n)
    fwd_kernel = load_scheduled(fwd.with_schedule({**default_schedule(fwd), **DQ_SCHEDULES[schedule]}))
    dq_problem, dq_kernel = _selection_bwd_kernel("selection_bwd_dq", q, k, v, s, DQ_SCHEDULES[schedule])
    do = torch.randn(*q.shape[:3], spec.v_head_dim, device="cuda").to(q.dtype)
    leaf = q.detach().requires_grad_()
    with use_kernel(fwd, fwd_kernel), use_kernel(dq_problem, dq_kernel):
        o, _ = ops.selection_attention(leaf, poisoned, v, idx, s.block, -1.0)
        (dq,) = torch.autograd.grad((o.float() * do.float()).sum(), leaf)
    before = t % s.block != s.block - 1
    assert not torch.isnan(o[:, before]).any(), f"{fwd_kernel.key}: a later token's NaN key reached an output"
    assert not torch.isnan(dq[:, before]).any(), f"{dq_kernel.key}: a later token's NaN key reached dq"
    assert torch.isnan(o[:, ~before]).all(), "the token that owns the NaN key should see it"
    o_hi, _ = ref.selection_attention(*(x.float() for x in (q, k, v)), idx, s.block, spec.softmax_scale)
    err = rel_err(o[:, before], o_hi[:, before])
    assert err < 1e-2, f"{fwd_kernel.key}: relative error {err:.2e} before the NaN keys"


@gpu
def test_selection_dq_token_tile_masks_what_a_token_did_not_choose():
    """dq: a NaN key in a block only the tile's other tokens chose never reaches a token's dq."""
    from nsa_codegen import ops
    from nsa_codegen.cache import use_kernel
    spec, q, k, v, idx, t = _own_block_lists(1024, seed=34)  # every token: its own block
    s = spec.selection
    idx[:, 1::2, :, 1] = 3                                  # odd tokens also block 3
    poisoned = k.clone()
    poisoned[:, 3 * s.block:4 * s.block] = float("nan")    # ... whose keys are NaN
    problem, kernel = _selection_bwd_kernel("selection_bwd_dq", q, k, v, s, {"tile_tokens": 0})
    do = torch.randn(*q.shape[:3], spec.v_head_dim, device="cuda").to(q.dtype)
    leaf = q.detach().requires_grad_()
    with use_kernel(problem, kernel):
        o, _ = ops.selection_attention(leaf, poisoned, v, idx, s.block, -1.0)
        (dq,) = torch.autograd.grad((o.float() * do.float()).sum(), leaf)
    even = (t % 2 == 0) & ((t // s.block) != 3)
    assert not torch.isnan(dq[:, even]).any(), f"{kernel.key}: a NaN only other tokens chose reached dq"
    leaf_hi = q.detach().float().requires_grad_()
    o_hi, _ = ref.selection_attention(leaf_hi, k.float(), v.float(), idx, s.block, spec.softmax_scale)
    (dq_hi,) = torch.autograd.grad((o_hi * do.float()).sum(), leaf_hi)
    err = rel_err(dq[:, even], dq_hi[:, even])
    assert err < 1e-2, f"{kernel.key}: dq relative error {err:.2e} on tokens that did not choose the NaN block"


def _assert_dk_of_keys_stays_clean(label, problem, kernel, k, do, keys, kern, oracle):
    """With `kernel` swapped in for `problem`: the dK of `keys` through kern(k) -> (o, lse) is finite and
    within 1e-2 of the fp32 oracle's, whose own dK there must be finite (its masked softmax gives those
    keys exactly 0 from the tokens that cannot see them)."""
    from nsa_codegen.cache import use_kernel
    dlse = torch.zeros(do.shape[:3], device=do.device)
    with use_kernel(problem, kernel):
        (dk,) = _grads(kern, (k,), do, dlse)
    (dk_hi,) = _grads(oracle, f32(k), do.float(), dlse)
    assert torch.isfinite(dk_hi[:, keys]).all(), "the reference itself should keep these keys finite"
    assert torch.isfinite(dk[:, keys]).all(), f"{label}: a NaN Delta reached the dK of keys its token cannot see"
    err = rel_err(dk[:, keys], dk_hi[:, keys])
    assert err < 1e-2, f"{label}: dK relative error {err:.2e} on those keys"


@gpu
@pytest.mark.parametrize("sched", ["sync", "async"])
def test_selection_nan_delta_stays_out_of_later_keys_dk(sched):
    """Token t sees a NaN key (so its O and Delta are NaN) in a block no later token chose; the keys
    after t in t's own block, which only later (clean) tokens see, keep the reference's finite dK.
    A NaN key, not a value: the forward replaces masked logits, so the NaN reaches only the tokens
    that see it, while a NaN value row also reaches the token tile's neighbours through P V (0 * NaN,
    README: the forward's known limit), whose own Delta would then be NaN (H100, 2026-12-08: the
    value-poisoned version of this test and the window one failed at exactly those keys)."""
    from nsa_codegen import ops
    spec, q, k, v, idx, t = _own_block_lists(256, seed=36)   # every token: its own block
    s = spec.selection
    tok = s.block + 6                                        # token 70: block 1, also block 0
    idx[:, tok, :, 1] = 0
    poisoned = k.clone()
    poisoned[:, 5] = float("nan")          # a key of block 0: seen by `tok` and block 0's own tokens
    problem, kernel = _selection_bwd_kernel("selection_bwd_dkdv", q, k, v, s, SEL_DKDV_SCHEDULES[sched])
    do = torch.randn(*q.shape[:3], spec.v_head_dim, device="cuda").to(q.dtype)
    later = (t > tok) & (t // s.block == 1)                  # keys after tok in its block
    _assert_dk_of_keys_stays_clean(
        f"{kernel.key}/token {tok}", problem, kernel, poisoned, do, later,
        lambda k_: ops.selection_attention(q, k_, v, idx, s.block, -1.0),
        lambda k_: ref.selection_attention(q.float(), k_, v.float(), idx, s.block, spec.softmax_scale))


@gpu
@pytest.mark.parametrize("sched", list(WIN_DKDV_SCHEDULES))
def test_window_nan_delta_stays_out_of_later_keys_dk(sched):
    """A NaN key s gives the tokens s .. s+w-1 a NaN Delta; the keys after them that only later tokens
    (which no longer see s) see keep the reference's finite dK. (A NaN key, not a value: a value row
    also reaches the later tokens of its query tile through P V, 0 * NaN, the forward's known limit.)"""
    from nsa_codegen import ops
    from nsa_codegen.cache import load_scheduled
    from nsa_codegen.launch import kernel_key
    from nsa_codegen.schedules import default_schedule
    name, spec, B, T = next(m for m in BWD_MATRIX if m[0] == "win16")
    w = spec.window.size
    q, k, v, _ = make_inputs(spec, 1, 512, seed=37)
    s_nan = 300
    poisoned = k.clone()
    poisoned[:, s_nan] = float("nan")
    problem = kernel_key("window_bwd_dkdv", q, k, v.shape[3], -1.0, window=w)
    kernel = load_scheduled(problem.with_schedule({**default_schedule(problem), **WIN_DKDV_SCHEDULES[sched]}))
    do = torch.randn(*q.shape[:3], spec.v_head_dim, device="cuda").to(q.dtype)
    t = torch.arange(512, device="cuda")
    clean = t >= s_nan + w                                   # keys only tokens past s + w - 1 see
    _assert_dk_of_keys_stays_clean(
        str(kernel.key), problem, kernel, poisoned, do, clean,
        lambda k_: ops.window_attention(q, k_, v, w, -1.0),
        lambda k_: ref.window_attention(q.float(), k_, v.float(), w, spec.softmax_scale))


@gpu
def test_gradients_are_bit_identical_run_to_run(precompiled):
    from nsa_codegen import NativeSparseAttention
    spec = BF16_LAYER_SPEC
    torch.manual_seed(26)
    layer = NativeSparseAttention(96, spec, deterministic=True).cuda().bfloat16()
    x = torch.randn(1, 1500, 96, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    first = _layer_grads(layer, x, dy)
    for _ in range(2):
        again = _layer_grads(layer, x, dy)
        for n in first:
            assert torch.equal(first[n], again[n]), f"{n}: gradient changed between runs"
    with pytest.raises(RuntimeError, match="deterministic"):
        NativeSparseAttention(96, spec, backend="reference", deterministic=True).cuda().bfloat16()(x)


@gpu
def test_unsupported_backward_fails_clearly():
    from nsa_codegen import ops
    spec = NSASpec(heads=8, kv_heads=4, head_dim=256, v_head_dim=128, compression=CompressionBranch(64, 32, "mean"),
                   selection=SelectionBranch(128, 4, 1, 1), window=WindowBranch(1024))
    q, k, v, gates = make_inputs(spec, 1, 300, seed=30)
    idx = torch.zeros(1, 300, 4, 4, dtype=torch.int32, device="cuda")
    idx[..., 1:] = -1
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, _ = ops.selection_attention(*leaves, idx, 128, -1.0)  # the forward runs
    with pytest.raises(ValueError, match="selection_bwd_dkdv.*no schedule.*registers"):
        o.float().sum().backward()


@gpu
def test_opcheck_with_autograd(precompiled):
    from nsa_codegen import ops
    spec = MATRIX[3][1]
    q, k, v, gates = make_inputs(spec, 1, 200, seed=27)
    kc, vc = ref.compress(k, 16, 16, 1), ref.compress(v, 16, 16, 1)
    _, idx = ops.nsa_attention(q, k, v, *gates, spec, return_indices=True)
    rg = lambda *xs: [x.detach().requires_grad_() for x in xs]
    cases = [
        (ops.window_attention, (*rg(q, k, v), 64, -1.0)),
        (ops.compression_attention, (*rg(q, kc, vc), 16, 16, 1, -1.0)),
        (ops.selection_attention, (*rg(q, k, v), idx, 32, -1.0)),
        (ops.gate_combine, (*rg(q[..., :64], gates[0]), None, None, *rg(q[..., :64], gates[2]), spec.kv_heads)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@gpu
def test_compiled_training_step_matches_eager(precompiled):
    from nsa_codegen import NativeSparseAttention
    spec = BF16_LAYER_SPEC
    torch.manual_seed(28)
    layer = NativeSparseAttention(96, spec).cuda()
    x = torch.randn(1, 600, 96, device="cuda")
    dy = torch.randn_like(x)

    def step(mod):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mod(x)
        (y.float() * dy).sum().backward()
        return y

    eager = _grad_snapshot(layer, lambda: step(layer))
    compiled = torch.compile(layer, fullgraph=True)  # forward and (AOT-autograd) backward graphs
    got = _grad_snapshot(layer, lambda: step(compiled))
    for n in eager:
        if n in SHIFT_INVARIANT:
            continue
        # Inductor fuses the bf16 elementwise ops around the kernels differently: a few elements
        # differ by a bf16 ulp, so compare as relative error norms.
        assert not torch.isnan(got[n]).any(), n
        # 3e-2: k_phi.pos sums bf16 products over every block (its bf16 noise alone is ~1.4e-2).
        assert rel_err(got[n], eager[n]) < 3e-2, f"{n}: compiled vs eager relative error {rel_err(got[n], eager[n]):.2e}"


@gpu
def test_compiled_packed_training_step_matches_eager(precompiled):
    """torch.compile(fullgraph) of a packed step (cu_seqlens a tensor): no host sync, so no graph
    break; the compiled graph pads the compressed rows to a bound no token sees; gradients as eager;
    a second pack of as many tokens and sequences runs without recompiling."""
    from nsa_codegen import NativeSparseAttention
    spec = BF16_LAYER_SPEC
    torch.manual_seed(29)
    layer = NativeSparseAttention(96, spec).cuda()
    x = torch.randn(1, 600, 96, device="cuda")
    dy = torch.randn_like(x)

    def step(mod, cu):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mod(x, cu_seqlens=cu)
        (y.float() * dy).sum().backward()
        return y

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    try:
        for i, lengths in enumerate(([250, 37, 313], [5, 400, 195])):
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
            eager = _grad_snapshot(layer, lambda: step(layer, cu))
            got = _grad_snapshot(layer, lambda: step(compiled, cu))
            for n in eager:
                if n in SHIFT_INVARIANT:
                    continue
                assert not torch.isnan(got[n]).any(), n
                assert rel_err(got[n], eager[n]) < 3e-2, \
                    f"{lengths} {n}: compiled vs eager relative error {rel_err(got[n], eager[n]):.2e}"
            if i == 0:
                torch.compiler.set_stance("fail_on_recompile")
    finally:
        torch.compiler.set_stance("default")


def _grad_snapshot(layer, fn):
    layer.zero_grad(set_to_none=True)
    y = fn()
    out = {n: p.grad.clone() for n, p in layer.named_parameters()}
    out["y"] = y.detach().float()
    return out


# ------------------------------------------------------------------------------------------------
# CPU: the transposed selection map
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit_tokens", [1, 3, 256])
def test_selection_block_units_is_the_exact_transpose(unit_tokens):
    g = torch.Generator().manual_seed(29)
    B, T, H, n, bs = 2, 301, 3, 5, 32
    NB = -(-T // bs)
    idx = torch.full((B, T, H, n), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                vis = t // bs + 1
                pick = torch.randperm(vis, generator=g)[:n]
                idx[b, t, h, :len(pick)] = pick.sort().values.int()
    idx[0, 5, 0, 1] = idx[0, 5, 0, 0]  # a repeated block counts twice
    tok, ublk, ustart, uend, bstart, row0, row_end = selection_block_units(idx, T, bs, unit_tokens)
    assert tok.dtype == ublk.dtype == ustart.dtype == uend.dtype == bstart.dtype == torch.int32
    assert bstart.shape == (B * H * NB + 1,) and int(bstart[-1]) == len(ublk)
    assert row0.tolist() == list(range(0, T, bs)) and row_end.tolist() == [min(r + bs, T) for r in range(0, T, bs)]
    seen = {}
    for u in range(len(ublk)):
        assert 0 < int(uend[u]) - int(ustart[u]) <= unit_tokens
        assert int(bstart[ublk[u]]) <= u < int(bstart[ublk[u] + 1])
        toks = tok[ustart[u]:uend[u]].tolist()
        assert toks == sorted(toks)
        seen.setdefault(int(ublk[u]), []).extend(toks)
    expect = {}
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for j in idx[b, t, h].tolist():
                    if j >= 0:
                        expect.setdefault((b * H + h) * NB + j, []).append(t)
    assert seen == {k: sorted(v) for k, v in expect.items()}
    # Units cover every entry exactly once, in order.
    assert int(ustart[0]) == 0 and int(uend[-1]) == len(tok)
    assert torch.equal(ustart[1:], uend[:-1])


# Pack gradient tests run on specs whose backward kernels benchmarks/prebuild.py builds (DQ_SPECS').
PACK_SPECS = [m for m in BWD_MATRIX if m[0] in ("paper_bf16_T2000", "g8_d64", "g32")]


@gpu
@pytest.mark.parametrize("name,spec,B,T", PACK_SPECS, ids=[m[0] for m in PACK_SPECS])
def test_window_gradients_of_a_pack(name, spec, B, T, precompiled):
    """The window backward takes a pack's seq_start (one launch per kernel): every sequence's
    gradients match the reference's autograd on that sequence alone, twice bit-identical."""
    from nsa_codegen import ops, packing
    lengths = [1, 130, 17, 700, 64, 5]
    q, k, v, _ = make_inputs(spec, 1, sum(lengths), seed=51)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    seq_start = packing.packed_maps(cu, q.shape[1])["seq_start"]
    g = torch.Generator(device="cuda").manual_seed(52)
    do = torch.randn(*q.shape[:3], spec.v_head_dim, generator=g, device="cuda").to(q.dtype)
    dlse = torch.randn(*q.shape[:3], generator=g, device="cuda")
    w = spec.window.size
    kern = lambda q_, k_, v_: ops.window_attention(q_, k_, v_, w, -1.0, seq_start)  # noqa: E731
    got = _grads(kern, (q, k, v), do, dlse)
    assert all(torch.equal(a, b) for a, b in zip(got, _grads(kern, (q, k, v), do, dlse))), \
        f"{name}: pack gradients changed between runs"
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = [x[:, a:b] for x in (q, k, v)]
        oracle = lambda q_, k_, v_: ref.window_attention(q_, k_, v_, w, spec.softmax_scale)  # noqa: E731
        hi = _grads(oracle, f32(*one), do[:, a:b].float(), dlse[:, a:b])
        lo = _grads(oracle, one, do[:, a:b], dlse[:, a:b])
        for what, x, h, l in zip(("dq", "dk", "dv"), got, hi, lo):
            if b - a > 16:
                assert_grad_close(f"{name}/pack[{a}:{b}]/{what}", x[:, a:b], h, l)
            else:
                torch.testing.assert_close(x[:, a:b].float(), h, rtol=3e-2, atol=3e-2)


@gpu
@pytest.mark.parametrize("name,spec,B,T", PACK_SPECS, ids=[m[0] for m in PACK_SPECS])
def test_compression_gradients_of_a_pack(name, spec, B, T, precompiled):
    """The compression backward takes a pack's token maps: every sequence's gradients (q and its
    compressed rows) match the reference's autograd on that sequence alone, twice bit-identical."""
    from nsa_codegen import ops, packing
    c = spec.compression
    lengths = [1, 130, 17, 700, 64, 5, 300]
    q, k, v, _ = make_inputs(spec, 1, sum(lengths), seed=53)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    maps = packing.packed_maps(cu, q.shape[1], c)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    kc = torch.cat([ref.compress(k[:, a:b], c.block, c.stride, c.first_block) for a, b in bounds], 1)
    vc = torch.cat([ref.compress(v[:, a:b], c.block, c.stride, c.first_block) for a, b in bounds], 1)
    rows = packing.compressed_offsets(cu, c.block, c.stride, c.first_block).tolist()
    g = torch.Generator(device="cuda").manual_seed(54)
    do = torch.randn(*q.shape[:3], spec.v_head_dim, generator=g, device="cuda").to(q.dtype)
    dlse = torch.randn(*q.shape[:3], generator=g, device="cuda")
    kern = lambda q_, k_, v_: ops.compression_attention(q_, k_, v_, c.block, c.stride, c.first_block, -1.0,  # noqa: E731
                                                        **maps)
    got = _grads(kern, (q, kc, vc), do, dlse)
    assert all(torch.equal(a, b) for a, b in zip(got, _grads(kern, (q, kc, vc), do, dlse))), \
        f"{name}: pack gradients changed between runs"
    for (a, b), ra, rb in zip(bounds, rows, rows[1:]):
        if rb == ra:
            assert not got[0][:, a:b].any(), f"{name}: dq of [{a}, {b}) (no compressed row) is not 0"
            continue
        one = [q[:, a:b], kc[:, ra:rb], vc[:, ra:rb]]
        oracle = lambda q_, k_, v_: ref.compression_attention(q_, k_, v_, c.block, c.stride, c.first_block,  # noqa: E731
                                                              spec.softmax_scale)
        hi = _grads(oracle, f32(*one), do[:, a:b].float(), dlse[:, a:b])
        lo = _grads(oracle, one, do[:, a:b], dlse[:, a:b])
        for what, x, h, l in zip(("dq", "dk_cmp", "dv_cmp"), (got[0][:, a:b], got[1][:, ra:rb], got[2][:, ra:rb]),
                                 hi, lo):
            assert_grad_close(f"{name}/pack[{a}:{b}]/{what}", x, h, l)


def test_selection_block_units_of_a_pack():
    """A pack's blocks are each sequence's own: token t's block j is its sequence's j-th block
    (rows from the sequence start), blocks past the sequence's end are dropped, and the blocks
    partition the pack's rows."""
    from nsa_codegen import packing
    lengths, bs, n = [70, 5, 0, 130], 32, 3
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = int(cu[-1])
    g = torch.Generator().manual_seed(31)
    idx = torch.randint(-1, 6, (1, T, 2, n), generator=g).int()     # ids up to 5: some past a sequence
    ss = packing.packed_maps(cu, T)["seq_start"]
    tok, ublk, ustart, uend, bstart, row0, row_end = selection_block_units(idx, T, bs, 2, seq_start=ss)
    starts = [(a, b) for a, b in zip(cu.tolist(), cu.tolist()[1:])]
    blocks = [(a + j, min(a + j + bs, b)) for a, b in starts for j in range(0, b - a, bs)]
    assert list(zip(row0.tolist(), row_end.tolist())) == blocks
    NBG = len(blocks)
    first_block = {a: sum(1 for r0, _ in blocks if r0 < a) for a, _ in starts}
    expect = {}
    for t in range(T):
        a, b = next((a, b) for a, b in starts if a <= t < b)
        for h in range(2):
            for j in idx[0, t, h].tolist():
                if j >= 0 and a + j * bs < b:
                    expect.setdefault(h * NBG + first_block[a] + j, []).append(t)
    seen = {}
    for u in range(len(ublk)):
        seen.setdefault(int(ublk[u]), []).extend(tok[ustart[u]:uend[u]].tolist())
    assert seen == {k: sorted(v) for k, v in expect.items()}


def test_selection_dkdv_over_a_packs_block_map_is_the_gradient():
    """CPU, float64: dK / dV summed the way the dk/dv and reduce kernels do it over a pack's block map
    (each unit: its block's keys [block_row0, block_row_end), its tokens' rows, the causal mask; each
    block's rows written once) equal the reference's autograd run on each sequence alone."""
    from nsa_codegen import packing
    g = torch.Generator().manual_seed(33)
    lengths, bs, n, HQ, H, D = [70, 5, 0, 130, 33], 16, 3, 4, 2, 8
    G = HQ // H
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = int(cu[-1])
    q, k, v, do = (torch.randn(1, T, h, D, generator=g, dtype=torch.float64) for h in (HQ, H, H, HQ))
    ss = packing.packed_maps(cu, T)["seq_start"]
    idx = torch.full((1, T, H, n), -1, dtype=torch.int32)
    for t in range(T):
        local = t - int(ss[0, t])
        for h in range(H):
            pick = torch.randperm(local // bs + 1, generator=g)[:n]
            idx[0, t, h, :len(pick)] = pick.int()
    # the forward's lse and Delta = rowsum(dO * O), as the dq kernel writes them
    bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
    o = torch.cat([ref.selection_attention(q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b], bs)[0] for a, b in bounds], 1)
    lse = torch.cat([ref.selection_attention(q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b], bs)[1]
                     for a, b in bounds], 1)
    delta = (do * o).sum(-1)
    tok, ublk, ustart, uend, bstart, row0, row_end = selection_block_units(idx, T, bs, 4, seq_start=ss)
    NBG, sc = len(row0), D ** -0.5
    part_k = torch.zeros(len(ublk), bs, D, dtype=torch.float64)
    part_v = torch.zeros_like(part_k)
    for u in range(len(ublk)):
        bid = int(ublk[u])
        gb, h = bid % NBG, (bid // NBG) % H
        k0, k1 = int(row0[gb]), int(row_end[gb])
        for t in tok[ustart[u]:uend[u]].tolist():
            for hq in range(h * G, (h + 1) * G):
                for i in range(k1 - k0):
                    if k0 + i > t:
                        continue
                    p = torch.exp(sc * q[0, t, hq] @ k[0, k0 + i, h] - lse[0, t, hq])
                    dp = do[0, t, hq] @ v[0, k0 + i, h]
                    part_v[u, i] += p * do[0, t, hq]
                    part_k[u, i] += sc * p * (dp - delta[0, t, hq]) * q[0, t, hq]
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    for bid in range(H * NBG):
        gb, h = bid % NBG, bid // NBG
        k0, k1 = int(row0[gb]), int(row_end[gb])
        units = range(int(bstart[bid]), int(bstart[bid + 1]))
        dk[0, k0:k1, h] = sum((part_k[u, :k1 - k0] for u in units), torch.zeros(k1 - k0, D, dtype=torch.float64))
        dv[0, k0:k1, h] = sum((part_v[u, :k1 - k0] for u in units), torch.zeros(k1 - k0, D, dtype=torch.float64))
    for a, b in (ab for ab in bounds if ab[1] > ab[0]):
        leaves = [x[:, a:b].clone().requires_grad_() for x in (k, v)]
        o_ref, _ = ref.selection_attention(q[:, a:b], *leaves, idx[:, a:b], bs)
        want_k, want_v = torch.autograd.grad((o_ref * do[:, a:b]).sum(), leaves)
        torch.testing.assert_close(dk[:, a:b], want_k, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dv[:, a:b], want_v, rtol=1e-10, atol=1e-10)
