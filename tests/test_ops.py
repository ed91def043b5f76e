"""GPU tests: every kernel and the whole forward against the reference, over the config matrix.

Inputs are fresh random normals; outputs are NaN-poisoned before launch (see conftest). Tolerance:
relative error ||out - ref|| / ||ref|| below 1e-2 and at most 2x the error of the same reference
run in the kernel's dtype (fp32/fp64 reference otherwise).
"""

import pytest
import torch

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen import reference as ref

pytestmark = pytest.mark.gpu

# (name, spec, B, T)
MATRIX = [
    ("paper_bf16", NSASpec(compression=CompressionBranch(32, 16, "mean")), 1, 4099),
    ("paper_fp16_d128", NSASpec(head_dim=128, v_head_dim=128, dtype="float16",
                                compression=CompressionBranch(32, 16, "mean")), 2, 1500),
    ("fla_cfg", NSASpec(head_dim=128, v_head_dim=128, dtype="float16", compression=CompressionBranch(64, 64, "mean"),
                        selection=SelectionBranch(64, 16, 1, 2), window=None), 1, 3000),
    ("g1_small", NSASpec(heads=4, kv_heads=4, head_dim=64, v_head_dim=64, dtype="float16",
                         compression=CompressionBranch(16, 16, "mean", 1), selection=SelectionBranch(32, 8, 1, 2),
                         window=WindowBranch(64)), 2, 1000),
    ("g2_d256", NSASpec(heads=8, kv_heads=4, head_dim=256, v_head_dim=128, compression=CompressionBranch(64, 32, "mean"),
                        selection=SelectionBranch(128, 4, 1, 1), window=WindowBranch(1024)), 1, 2500),
    ("g4_n32", NSASpec(heads=16, kv_heads=4, head_dim=128, v_head_dim=64, compression=CompressionBranch(32, 32, "mean"),
                       selection=SelectionBranch(32, 32, 1, 2), window=WindowBranch(256)), 1, 1500),
    ("g8_d64", NSASpec(heads=16, kv_heads=2, head_dim=64, v_head_dim=64, dtype="float16",
                       compression=CompressionBranch(16, 8, "mean"), selection=SelectionBranch(64, 16, 2, 2),
                       window=WindowBranch(128)), 1, 777),
    ("g32", NSASpec(heads=32, kv_heads=1, head_dim=128, v_head_dim=128, compression=CompressionBranch(32, 16, "mean"),
                    selection=SelectionBranch(64, 16, 1, 2), window=WindowBranch(512)), 1, 2049),
    ("tiny_T", NSASpec(compression=CompressionBranch(32, 16, "mean")), 2, 17),
    # Groups that divide no 64-row MMA tile: compression pads its tile, top-n and compression dq
    # take 192 rows, selection runs per token. The seed's odd group (48 heads over 8 KV heads) and
    # the paper's dims over 4 KV heads.
    ("g6_h48", NSASpec(heads=48, kv_heads=8, head_dim=128, v_head_dim=128, dtype="float16",
                       compression=CompressionBranch(32, 16, "mean")), 1, 1100),
    ("g12_paper", NSASpec(heads=48, kv_heads=4, compression=CompressionBranch(32, 16, "mean")), 1, 1300),
    ("g64", NSASpec(heads=64, kv_heads=1, head_dim=64, v_head_dim=64, dtype="float16",
                    compression=CompressionBranch(32, 16, "mean"), window=WindowBranch(256)), 1, 900),
    # the seed article's long-context compression: block 256, stride 128 (selection blocks of 128)
    ("seed_l256", NSASpec(head_dim=128, v_head_dim=128, compression=CompressionBranch(256, 128, "mean"),
                          selection=SelectionBranch(128, 16, 1, 2)), 1, 3000),
    # a window shorter than a key tile and off the 64-multiples
    ("win16", NSASpec(heads=16, kv_heads=4, head_dim=128, v_head_dim=128, dtype="float16",
                      compression=CompressionBranch(32, 16, "mean"), window=WindowBranch(16)), 2, 700),
]
IDS = [m[0] for m in MATRIX]


def rel_err(out, expect):
    return ((out.double() - expect.double()).norm() / expect.double().norm().clamp_min(1e-30)).item()


def assert_close_to_reference(name, out, ref_hi, ref_lo):
    """out vs the fp32 reference; no worse than 1e-2 and 2x the reference's own low-precision error."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten elements?)"
    err, err_lo = rel_err(out, ref_hi), rel_err(ref_lo, ref_hi)
    assert err < 1e-2, f"{name}: relative error {err:.2e} >= 1e-2"
    assert err <= 2 * err_lo, f"{name}: relative error {err:.2e} > 2x the reference's own {err_lo:.2e}"


def assert_lse_close(name, lse, lse_ref):
    neg = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), neg), f"{name}: lse -inf pattern differs"
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse"
    if (~neg).any():
        diff = (lse[~neg] - lse_ref[~neg]).abs().max().item()
        assert diff < 2e-2, f"{name}: lse max abs diff {diff:.2e}"


def make_inputs(spec, B, T, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, spec.dtype)

    def rn(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dt)

    q = rn(B, T, spec.heads, spec.head_dim)
    k = rn(B, T, spec.kv_heads, spec.head_dim)
    v = rn(B, T, spec.kv_heads, spec.v_head_dim)
    gates = [torch.rand(B, T, spec.heads, generator=g, device="cuda").to(dt) for _ in range(3)]
    return q, k, v, gates


@pytest.fixture(scope="module", autouse=True)
def _precompiled():
    """Compile every kernel of the matrix in parallel before the tests load them."""
    from nsa_codegen.cache import precompile
    from nsa_codegen.lowering import arch_of_capability, lower_to_plan
    arch = arch_of_capability(*torch.cuda.get_device_capability())   # the arch the ops will pick
    problems = [c.key for _, spec, _, _ in MATRIX for c in lower_to_plan(spec, arch).calls]
    failed = [(k, e) for k, e, _ in precompile(problems) if e]
    assert not failed, failed


def f32(*xs):
    return [x.float() for x in xs]


def scheduled(kind, q, k, v_dim, schedule, optional=False, **params):
    """A context in which ops launch `kind`'s kernel for these tensors with the resolved schedule's
    knobs updated by `schedule` ({}: the resolved kernel itself). optional: a schedule that not every
    problem takes (the test skips, naming why, where the template rejects it)."""
    from nsa_codegen.cache import kernel_with_knobs, use_kernel
    from nsa_codegen.launch import kernel_key
    problem = kernel_key(kind, q, k, v_dim, -1.0, **params)
    try:
        kernel = kernel_with_knobs(problem, schedule)
    except ValueError as e:
        if not optional:
            raise
        pytest.skip(f"{problem}: {schedule} does not apply: {e}")
    return use_kernel(problem, kernel)


# Compression forward schedules beside the resolved one: the next tile's QK^T as an async WGMMA
# under a tile's softmax (sm90; 64-key tiles leave it the registers).
CMP_FWD_SCHEDULES = {"resolved": {}, "overlap": {"overlap": True, "block_N": 64, "num_stages": 2}}


@pytest.mark.parametrize("cmp_schedule", list(CMP_FWD_SCHEDULES))
@pytest.mark.parametrize("name,spec,B,T", MATRIX, ids=IDS)
def test_compression_attention(name, spec, B, T, cmp_schedule):
    from nsa_codegen import ops
    c = spec.compression
    q, k, v, _ = make_inputs(spec, B, T, seed=1)
    kc, vc = ref.compress(k, c.block, c.stride), ref.compress(v, c.block, c.stride)
    with scheduled("compression_fwd", q, kc, vc.shape[3], CMP_FWD_SCHEDULES[cmp_schedule], cmp_block=c.block,
                   stride=c.stride, first_block=0):
        o, lse = ops.compression_attention(q, kc, vc, c.block, c.stride, 0, -1.0)
    o_hi, lse_hi = ref.compression_attention(*f32(q, kc, vc), c.block, c.stride)
    o_lo, _ = ref.compression_attention(q, kc, vc, c.block, c.stride)
    if ref.num_compressed_blocks(T, c.block, c.stride) == 0:
        assert torch.all(o == 0) and torch.isneginf(lse).all()
        return
    assert_close_to_reference(name, o, o_hi, o_lo)
    assert_lse_close(name, lse, lse_hi)


# Top-n schedules beside the resolved one (sm90: the next chunk's score gemm as an async WGMMA while a
# chunk is scored): the one without that overlap.
TOPN_SCHEDULES = {"resolved": {}, "no_overlap": {"overlap": False},
                  # the group-summed probabilities in a ring (no halo copy, fewer barriers a chunk)
                  "ring": {"ring_halo": True}, "ring_no_overlap": {"ring_halo": True, "overlap": False},
                  # four consumer warpgroups (block_M 256), without overlap (with it, registers spill)
                  "t512": {"threads": 512, "block_M": 256, "overlap": False},
                  "t512_ring": {"threads": 512, "block_M": 256, "overlap": False, "ring_halo": True}}
TOPN_OPTIONAL = {"t512", "t512_ring"}   # block_M 256 needs G | 256 and the smem for 256 rows of Q


@pytest.mark.parametrize("topn_schedule", list(TOPN_SCHEDULES))
@pytest.mark.parametrize("name,spec,B,T", MATRIX, ids=IDS)
def test_selection_topn_matches_reference_up_to_ties(name, spec, B, T, topn_schedule):
    from nsa_codegen import ops
    c, s = spec.compression, spec.selection
    q, k, v, _ = make_inputs(spec, B, T, seed=2)
    kc = ref.compress(k, c.block, c.stride, c.first_block)
    _, lse = ops.compression_attention(q, kc, ref.compress(v, c.block, c.stride, c.first_block),
                                       c.block, c.stride, c.first_block, -1.0)
    with scheduled("selection_topn", q, kc, 0, TOPN_SCHEDULES[topn_schedule], optional=topn_schedule in TOPN_OPTIONAL,
                   cmp_block=c.block, stride=c.stride,
                   first_block=c.first_block, sel_block=s.block, top_n=s.top_n, initial=s.initial, local=s.local):
        idx, cnt = ops.selection_topn(q, kc, lse, c.block, c.stride, c.first_block, s.block, s.top_n, s.initial,
                                      s.local, -1.0)
    # The reference's scores from the same inputs, in fp32.
    _, _, p = ref.compression_attention(*f32(q, kc, kc[..., :1]), c.block, c.stride, c.first_block,
                                        return_probs=True)
    scores = ref.selection_scores(p, spec.kv_heads, T, c.block, c.stride, s.block, c.first_block)
    idx_ref = ref.select_top_n(scores, s.block, s.top_n, s.initial, s.local)
    assert torch.equal(cnt, (idx_ref >= 0).sum(-1).int()), f"{name}: counts differ"
    assert torch.equal(idx >= 0, idx_ref >= 0), f"{name}: -1 padding differs"
    bad = (idx != idx_ref).any(-1)
    if bad.any():
        # Mismatches are allowed only where the scores tie within rounding: the kernel's choice must
        # score as well as the reference's (sum of the chosen blocks' scores, fp32).
        def chosen(ix):
            return torch.gather(scores, -1, ix.clamp_min(0).long()).masked_fill(ix < 0, 0).sum(-1)
        gap = (chosen(idx_ref) - chosen(idx))[bad]
        tol = 1e-2 * scores.amax(-1)[bad].clamp_min(1e-6)
        assert (gap.abs() <= tol).all(), f"{name}: {int(bad.sum())} rows differ beyond ties (max gap {gap.max():.3e})"
    assert bad.float().mean() < 0.02, f"{name}: {bad.float().mean():.2%} of rows differ (ties should be rare)"


@pytest.mark.parametrize("name,spec,B,T", MATRIX, ids=IDS)
def test_selection_attention(name, spec, B, T):
    from nsa_codegen import ops
    s = spec.selection
    q, k, v, gates = make_inputs(spec, B, T, seed=3)
    _, idx = ref.nsa_reference(q, k, v, *gates, spec, return_indices=True)
    # Shuffle the slots: the kernel must not rely on sorted indices.
    idx = torch.gather(idx, -1, torch.argsort(torch.rand(idx.shape, device="cuda"), -1))
    o, lse = ops.selection_attention(q, k, v, idx, s.block, -1.0)
    o_hi, lse_hi = ref.selection_attention(*f32(q, k, v), idx, s.block)
    o_lo, _ = ref.selection_attention(q, k, v, idx, s.block)
    assert_close_to_reference(name, o, o_hi, o_lo)
    assert_lse_close(name, lse, lse_hi)


def _hostile_indices(B, T, H, n, bs, seed):
    """Block lists no top-n makes but the op accepts: repeats within a token's list (they weigh
    twice, as in the reference), -1 pads anywhere, blocks after the token, any order."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    NS = -(-T // bs)
    t = torch.arange(T, device="cuda")[None, :, None, None]
    idx = (torch.rand(B, T, H, n, generator=g, device="cuda") * (t // bs + 2)).long().clamp_max(NS - 1)
    idx = torch.where(torch.rand(idx.shape, generator=g, device="cuda") < 0.15, -1, idx)
    idx[:, 5:9] = -1   # tokens with nothing usable: o = 0, lse = -inf
    return idx.int()


def selection_lists(kind, spec, B, T, seed):
    """[B, T, H, n] block lists of `kind`: "hostile" (_hostile_indices), else workloads' uniform /
    drift (coherence 16) top-n lists with each list's slots shuffled."""
    from nsa_codegen import workloads
    s = spec.selection
    if kind == "hostile":
        return _hostile_indices(B, T, spec.kv_heads, s.top_n, s.block, seed=seed)
    idx = workloads.block_indices(kind, B, T, spec.kv_heads, s.block, s.top_n, s.initial, s.local,
                                  coherence=16, seed=seed)
    return torch.gather(idx, -1, torch.argsort(torch.rand(idx.shape, device="cuda"), -1))


# Selection forward schedules: id -> knobs for a group of G query heads per KV head. tile0: the token
# tile, auto (64 // G tokens, 64 rows: WGMMA on sm90); skip64 / skip128: the token tile on mma.sync with
# one warp per 16 rows, each skipping the blocks none of its tokens chose (64 or 128 rows).
SELECTION_SCHEDULES = {
    "tile1": lambda G: {"tile_tokens": 1, "threads": 128},
    "tile0": lambda G: {"tile_tokens": 0, "threads": 128},
    "skip64": lambda G: {"tile_tokens": 0, "threads": 128, "warp_skip": True},
    "skip128": lambda G: {"tile_tokens": 128 // G, "threads": 256, "warp_skip": True},
}
SELECTION_SPECS = [m for m in MATRIX if m[0] in ("paper_bf16", "fla_cfg", "g8_d64", "g32", "tiny_T")]


@pytest.mark.parametrize("schedule", list(SELECTION_SCHEDULES))
@pytest.mark.parametrize("kind", ["uniform", "drift", "hostile"])
@pytest.mark.parametrize("name,spec,B,T", SELECTION_SPECS, ids=[m[0] for m in SELECTION_SPECS])
def test_selection_attention_schedules(name, spec, B, T, kind, schedule):
    """Each selection forward schedule (per token, token tile, token tile with per-warp block skip)
    against the reference, on lists with and without locality and on hostile ones, NaN-poisoned
    outputs, twice (bit-identical)."""
    from nsa_codegen.cache import load_scheduled
    from nsa_codegen.schedules import default_schedule
    s = spec.selection
    q, k, v, _ = make_inputs(spec, B, T, seed=11)
    idx = selection_lists(kind, spec, B, T, seed=12)
    from nsa_codegen.launch import kernel_key
    problem = kernel_key("selection_fwd", q, k, v.shape[3], -1.0, sel_block=s.block, top_n=s.top_n)
    key = problem.with_schedule({**default_schedule(problem),
                                 **SELECTION_SCHEDULES[schedule](spec.heads // spec.kv_heads)})
    kernel = load_scheduled(key)   # prebuilt by `nsa-codegen build --variant` where present
    outs = []
    for _ in range(2):
        o = torch.full((B, T, spec.heads, spec.v_head_dim), float("nan"), device="cuda", dtype=q.dtype)
        lse = torch.full((B, T, spec.heads), float("nan"), device="cuda")
        kernel(q, k, v, idx, torch.zeros(B, T, dtype=torch.int32, device="cuda"), o, lse)
        outs.append((o, lse))
    o, lse = outs[0]
    assert torch.equal(o, outs[1][0]) and torch.equal(lse, outs[1][1]), f"{key}: output changed between runs"
    o_hi, lse_hi = ref.selection_attention(*f32(q, k, v), idx, s.block)
    o_lo, _ = ref.selection_attention(q, k, v, idx, s.block)
    assert_close_to_reference(str(key), o, o_hi, o_lo)
    assert_lse_close(str(key), lse, lse_hi)


@pytest.mark.parametrize("schedule", ["tile0", "skip64"])
def test_selection_token_tile_masks_what_a_token_did_not_choose(schedule):
    """A NaN key in a block that only the tile's other tokens chose never reaches a token (token
    tile on WGMMA, and with per-warp block skip)."""
    from nsa_codegen.cache import load_scheduled
    from nsa_codegen.schedules import default_schedule
    name, spec, B, T = MATRIX[0]
    T = 1024
    s = spec.selection
    q, k, v, _ = make_inputs(spec, 1, T, seed=13)
    idx = torch.full((1, T, spec.kv_heads, s.top_n), -1, dtype=torch.int32, device="cuda")
    t = torch.arange(T, device="cuda")
    idx[..., 0] = (t // s.block)[None, :, None]            # every token: its own block
    idx[:, 1::2, :, 1] = 3                                  # odd tokens also block 3
    poisoned = k.clone()
    poisoned[:, 3 * s.block:4 * s.block] = float("nan")    # ... whose keys are NaN (a NaN value row
    # would still reach them: P = 0 times NaN is NaN in the tensor cores, as for any masked-out V row)
    from nsa_codegen.launch import kernel_key
    problem = kernel_key("selection_fwd", q, k, v.shape[3], -1.0, sel_block=s.block, top_n=s.top_n)
    key = problem.with_schedule({**default_schedule(problem),
                                 **SELECTION_SCHEDULES[schedule](spec.heads // spec.kv_heads)})
    o = torch.full((1, T, spec.heads, spec.v_head_dim), float("nan"), device="cuda", dtype=q.dtype)
    lse = torch.full((1, T, spec.heads), float("nan"), device="cuda")
    load_scheduled(key)(q, poisoned, v, idx, torch.zeros(1, T, dtype=torch.int32, device="cuda"), o, lse)
    even = (t % 2 == 0) & ((t // s.block) != 3)
    assert not torch.isnan(o[:, even]).any() and not torch.isnan(lse[:, even]).any(), \
        f"{key}: a NaN in a block only the tile's other tokens chose reached a token"
    o_hi, _ = ref.selection_attention(*f32(q, k, v), idx, s.block)
    err = rel_err(o[:, even], o_hi[:, even])
    assert err < 1e-2, f"{key}: relative error {err:.2e} on the tokens that did not choose the NaN block"


@pytest.mark.parametrize("name,spec,B,T", [m for m in MATRIX if m[1].window], ids=[m[0] for m in MATRIX if m[1].window])
def test_window_attention(name, spec, B, T):
    from nsa_codegen import ops
    w = spec.window.size
    q, k, v, _ = make_inputs(spec, B, T, seed=4)
    o, lse = ops.window_attention(q, k, v, w, -1.0)
    o_hi, lse_hi = ref.window_attention(*f32(q, k, v), w)
    o_lo, _ = ref.window_attention(q, k, v, w)
    assert_close_to_reference(name, o, o_hi, o_lo)
    assert_lse_close(name, lse, lse_hi)


def window_size_spec(w):
    return NSASpec(heads=16, kv_heads=2, head_dim=128, v_head_dim=64, dtype="bfloat16",
                   compression=CompressionBranch(32, 16, "mean"), window=WindowBranch(w))


WINDOW_SIZES = [1, 16, 48, 2048]


@pytest.mark.parametrize("w", WINDOW_SIZES)
def test_window_sizes_match_reference(w):
    """Windows off the 64-multiples and beyond 1024: a token alone (w = 1), shorter than a tile, longer
    than the sequence's tiles."""
    from nsa_codegen import ops
    spec = window_size_spec(w)
    q, k, v, _ = make_inputs(spec, 2, 1500, seed=41)
    o, lse = ops.window_attention(q, k, v, w, -1.0)
    o_hi, lse_hi = ref.window_attention(*f32(q, k, v), w)
    o_lo, _ = ref.window_attention(q, k, v, w)
    assert_close_to_reference(f"w={w}", o, o_hi, o_lo)
    assert_lse_close(f"w={w}", lse, lse_hi)


@pytest.mark.parametrize("name,spec,B,T", MATRIX, ids=IDS)
def test_nsa_attention_matches_reference(name, spec, B, T):
    from nsa_codegen import nsa_attention
    q, k, v, gates = make_inputs(spec, B, T, seed=5)
    out, idx = nsa_attention(q, k, v, *gates, spec, return_indices=True)
    # The reference on the kernel's selection (ties may legitimately pick other blocks).
    hi = ref.nsa_reference(*f32(q, k, v), *f32(*gates), spec, block_indices=idx)
    lo = ref.nsa_reference(q, k, v, *gates, spec, block_indices=idx)
    assert_close_to_reference(name, out, hi, lo)


def test_cu_seqlens_with_autograd_runs_the_same_pack():
    """With autograd a pack runs the same one-launch kernels: the output equals the no-grad one."""
    from nsa_codegen import nsa_attention
    name, spec, _, _ = MATRIX[3]
    lens = [300, 1, 517, 64]
    q, k, v, gates = make_inputs(spec, 1, sum(lens), seed=6)
    cu = torch.tensor([0, 300, 301, 818, 882], device="cuda", dtype=torch.int32)
    with torch.no_grad():
        want = nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu)
    out = nsa_attention(q.detach().requires_grad_(), k, v, *gates, spec, cu_seqlens=cu)
    assert torch.equal(out.detach(), want)


# Packs: lengths 1, below every block, not multiples of any block, and a few long ones.
PACKS = {"paper_bf16": [1, 17, 31, 2000, 5, 700, 64, 1281],
         "g1_small": [3, 400, 16, 1, 250, 90],
         "g8_d64": [129, 1, 63, 300, 7, 256],
         "g32": [1000, 2, 33, 900]}
PACK_SPECS = [m for m in MATRIX if m[0] in PACKS]


def _pack(spec, lengths, seed):
    q, k, v, gates = make_inputs(spec, 1, sum(lengths), seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    return q, k, v, gates, cu


@pytest.mark.parametrize("name,spec,B,T", PACK_SPECS, ids=[m[0] for m in PACK_SPECS])
def test_pack_in_one_launch_matches_the_reference(name, spec, B, T):
    """A pack runs one launch per kernel (seq_start / cmp_start): every sequence's
    rows match the reference run on that sequence alone (on the kernels' own selection), and the
    block lists equal those of the sequence run alone (top-n's tiles never straddle sequences)."""
    from nsa_codegen import nsa_attention
    lengths = PACKS[name]
    q, k, v, gates, cu = _pack(spec, lengths, seed=40)
    with torch.no_grad():
        out, idx = nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu, return_indices=True)
    hi = ref.nsa_reference(*f32(q, k, v), *f32(*gates), spec, block_indices=idx, cu_seqlens=cu)
    lo = ref.nsa_reference(q, k, v, *gates, spec, block_indices=idx, cu_seqlens=cu)
    assert_close_to_reference(f"{name}/pack", out, hi, lo)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert_close_to_reference(f"{name}/pack[{a}:{b}]", out[:, a:b], hi[:, a:b], lo[:, a:b]) if b - a > 16 \
            else torch.testing.assert_close(out[:, a:b].float(), hi[:, a:b].float(), rtol=2e-2, atol=2e-2)
        _, one = nsa_attention(q[:, a:b], k[:, a:b], v[:, a:b], *[g[:, a:b] for g in gates], spec,
                               return_indices=True)
        assert torch.equal(idx[:, a:b], one), f"{name}: the pack's block lists of [{a}, {b}) differ"


@pytest.mark.parametrize("name,spec,B,T", PACK_SPECS, ids=[m[0] for m in PACK_SPECS])
def test_pack_branch_ops_match_each_sequence(name, spec, B, T):
    """Each branch op with the pack's token maps against the reference per sequence; the per-token
    selection (the same blocks in the same order) is bit-identical to the sequence run alone. (The
    token tile's tiles may straddle sequences of a pack, so its union, and the order its online
    softmax folds blocks in, can differ from the sequence alone: equal to rounding, checked above.)"""
    from nsa_codegen import ops, packing
    from nsa_codegen.cache import load_scheduled, use_kernel
    from nsa_codegen.launch import kernel_key
    from nsa_codegen.schedules import default_schedule
    lengths = PACKS[name]
    q, k, v, _, cu = _pack(spec, lengths, seed=41)
    c, s = spec.compression, spec.selection
    maps = packing.packed_maps(cu, q.shape[1], c)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    kc = torch.cat([ref.compress(k[:, a:b], c.block, c.stride, c.first_block) for a, b in bounds], 1)
    vc = torch.cat([ref.compress(v[:, a:b], c.block, c.stride, c.first_block) for a, b in bounds], 1)
    idx = torch.cat([selection_lists("drift", spec, 1, b - a, seed=42 + a) for a, b in bounds], 1)
    rows = packing.compressed_offsets(cu, c.block, c.stride, c.first_block).tolist()
    got = {"cmp": ops.compression_attention(q, kc, vc, c.block, c.stride, c.first_block, -1.0, **maps),
           "slc": ops.selection_attention(q, k, v, idx, s.block, -1.0, maps["seq_start"])}
    if spec.window:
        got["win"] = ops.window_attention(q, k, v, spec.window.size, -1.0, maps["seq_start"])
    for (a, b), ra, rb in zip(bounds, rows, rows[1:]):
        one = (q[:, a:b], k[:, a:b], v[:, a:b])
        want = {"cmp": lambda x, y, z, kk=kc[:, ra:rb], vv=vc[:, ra:rb]: ref.compression_attention(
                    x, kk.to(x.dtype), vv.to(x.dtype), c.block, c.stride, c.first_block, spec.softmax_scale),
                "slc": lambda x, y, z: ref.selection_attention(x, y, z, idx[:, a:b], s.block, spec.softmax_scale),
                "win": lambda x, y, z: ref.window_attention(x, y, z, spec.window.size, spec.softmax_scale)}
        for br, (o, lse) in got.items():
            o_hi, lse_hi = want[br](*f32(*one))
            o_lo, _ = want[br](*one)
            if b - a > 16 and o_hi.norm() > 0:
                assert_close_to_reference(f"{name}/{br}[{a}:{b}]", o[:, a:b], o_hi, o_lo)
            else:
                torch.testing.assert_close(o[:, a:b].float(), o_hi, rtol=2e-2, atol=2e-2)
            assert_lse_close(f"{name}/{br}[{a}:{b}]", lse[:, a:b], lse_hi)
    problem = kernel_key("selection_fwd", q, k, v.shape[3], -1.0, sel_block=s.block, top_n=s.top_n)
    per_token = load_scheduled(problem.with_schedule({**default_schedule(problem), "tile_tokens": 1}))
    with use_kernel(problem, per_token):
        packed, _ = ops.selection_attention(q, k, v, idx, s.block, -1.0, maps["seq_start"])
        for a, b in bounds:
            alone, _ = ops.selection_attention(q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b], s.block, -1.0)
            assert torch.equal(packed[:, a:b], alone), f"{name}: packed per-token selection differs from [{a}, {b}) alone"


def test_pack_keeps_a_nan_in_its_sequence():
    """A NaN query / key in one sequence of a pack never reaches another sequence's output (a NaN
    value row: test_a_nan_value_reaches_exactly_the_outputs_that_see_it)."""
    from nsa_codegen import nsa_attention
    name, spec, B, T = MATRIX[0]
    lengths = [300, 77, 1000, 5]
    q, k, v, gates, cu = _pack(spec, lengths, seed=43)
    a, b = 300, 377
    q, k = q.clone(), k.clone()
    q[:, a + 10] = float("nan")
    k[:, a:b] = float("nan")
    with torch.no_grad():
        out = nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu)
    assert torch.isnan(out[:, a:b]).any(), "the poisoned sequence should see its NaN"
    others = torch.ones(out.shape[1], dtype=torch.bool, device="cuda")
    others[a:b] = False
    assert not torch.isnan(out[:, others]).any(), "a NaN reached another sequence of the pack"


def test_a_nan_value_reaches_exactly_the_outputs_that_see_it():
    """A NaN value row (and an Inf one) in a pack: the output is non-finite exactly where the
    reference's is (run on the kernels' own block lists), never in another sequence, and equal to
    the reference elsewhere (nsa_attention's value guard: the kernels get finite values, the gates
    of the (token, group) pairs that see the row NaN)."""
    from nsa_codegen import nsa_attention
    name, spec, B, T = MATRIX[0]
    lengths = [300, 77, 1000, 5]
    q, k, v, gates, cu = _pack(spec, lengths, seed=44)
    v = v.clone()
    v[:, 310, 0, 3] = float("nan")      # the second sequence, KV head 0
    v[:, 900, 1, 5] = float("inf")      # the third, KV head 1
    with torch.no_grad():
        out, idx = nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu, return_indices=True)
        want = ref.nsa_reference(*f32(q, k, v), *f32(*gates), spec, block_indices=idx, cu_seqlens=cu)
    bad, bad_ref = ~torch.isfinite(out), ~torch.isfinite(want)
    assert torch.equal(bad, bad_ref), f"non-finite outputs differ from the reference's at {int((bad ^ bad_ref).sum())} places"
    assert not bad[:, :300].any() and not bad[:, 377 + 1000:].any()
    assert bad[:, 310:377].any() and bad[:, 900:1377].any()
    ok = ~bad_ref
    err = (out.float()[ok] - want[ok]).norm() / want[ok].norm()
    assert err < 1e-2, f"relative error {err:.2e} where the outputs are finite"


def test_bad_inputs_raise_clear_errors():
    from nsa_codegen import nsa_attention, ops
    name, spec, B, T = MATRIX[3]
    q, k, v, gates = make_inputs(spec, B, 64, seed=7)
    with pytest.raises(ValueError, match="CUDA tensor"):
        ops.window_attention(q.cpu(), k.cpu(), v.cpu(), 64, -1.0)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ops.window_attention(q.float(), k.float(), v.float(), 64, -1.0)
    with pytest.raises(ValueError, match="k must be"):
        ops.window_attention(q, k.float(), v, 64, -1.0)
    with pytest.raises(ValueError, match="multiple of k heads"):
        ops.window_attention(q[:, :, :3], k, v, 64, -1.0)
    with pytest.raises(ValueError, match="spec's dtype"):
        nsa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), *gates, spec)
    with pytest.raises(ValueError, match="block_indices must be"):
        ops.selection_attention(q, k, v, torch.zeros(B, 64, 1, 8, dtype=torch.int32, device="cuda"), 32, -1.0)


def test_opcheck_and_compile():
    from nsa_codegen import NativeSparseAttention, ops
    name, spec, B, T = MATRIX[3]
    q, k, v, _ = make_inputs(spec, 1, 200, seed=8)
    torch.library.opcheck(ops.window_attention, (q, k, v, 64, -1.0), test_utils=("test_schema", "test_faketensor"))
    kc = ref.compress(k, 16, 16, 1)
    torch.library.opcheck(ops.compression_attention, (q, kc, ref.compress(v, 16, 16, 1), 16, 16, 1, -1.0),
                          test_utils=("test_schema", "test_faketensor"))
    layer = NativeSparseAttention(64, spec).cuda().half()
    x = torch.randn(1, 200, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():  # forward kernels only; autograd through them comes with the backward kernels
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name,spec,B,T", [MATRIX[0], MATRIX[3]], ids=[MATRIX[0][0], MATRIX[3][0]])
def test_kernels_are_deterministic(name, spec, B, T):
    """Same inputs, same bits: a moving result would be a race."""
    from nsa_codegen import nsa_attention
    q, k, v, gates = make_inputs(spec, B, T, seed=9)
    first = nsa_attention(q, k, v, *gates, spec, return_indices=True)
    for _ in range(3):
        again = nsa_attention(q, k, v, *gates, spec, return_indices=True)
        assert torch.equal(first[1], again[1]), f"{name}: selected indices changed between runs"
        assert torch.equal(first[0], again[0]), f"{name}: output changed between runs"


@pytest.mark.parametrize("branches", [("cmp", "slc", "win"), ("cmp", "slc"), ("win",)])
def test_gate_combine(branches):
    from nsa_codegen import ops
    spec = MATRIX[3][1]
    g = torch.Generator(device="cuda").manual_seed(10)
    B, T, HQ, Dv = 2, 333, spec.heads, spec.v_head_dim
    args, expect = [], torch.zeros(B, T, HQ, Dv, device="cuda", dtype=torch.float64)
    for name in ("cmp", "slc", "win"):
        if name in branches:
            o = torch.randn(B, T, HQ, Dv, generator=g, device="cuda").half()
            gate = torch.rand(B, T, HQ, generator=g, device="cuda").half()
            expect += o.double() * gate.double()[..., None]
            args += [o, gate]
        else:
            args += [None, None]
    out = ops.gate_combine(*args, spec.kv_heads)
    assert not torch.isnan(out).any()
    # One fp16 rounding of an fp32 sum: within half an fp16 ulp of the exact result (plus fp32 slack).
    torch.testing.assert_close(out.double(), expect, rtol=2 ** -11, atol=1e-6)
