"""Hand-checkable cases for the reference: the oracle must be right before anything is held to it."""
import math

import pytest
import torch

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen import reference as ref

SEED_KEYS = [[0.2, 0.3, 0.8, 0.1], [0.3, 0.2, 0.7, 0.2], [0.1, 0.4, 0.9, 0.1], [0.2, 0.3, 0.8, 0.2],
             [0.7, 0.8, 0.2, 0.5], [0.8, 0.9, 0.1, 0.6], [0.6, 0.7, 0.3, 0.4], [0.7, 0.8, 0.2, 0.5],
             [0.4, 0.1, 0.3, 0.9], [0.5, 0.2, 0.2, 0.8], [0.3, 0.1, 0.4, 0.9], [0.4, 0.2, 0.3, 0.8],
             [0.9, 0.5, 0.6, 0.3], [0.8, 0.6, 0.7, 0.2], [0.9, 0.4, 0.5, 0.4], [0.8, 0.5, 0.6, 0.3]]
SEED_COMPRESSED = [[0.45, 0.6, 0.5, 0.35], [0.7, 0.8, 0.2, 0.5], [0.55, 0.45, 0.25, 0.65],
                   [0.4, 0.15, 0.3, 0.85], [0.6, 0.35, 0.5, 0.55], [0.85, 0.5, 0.6, 0.3]]


def rand(*shape, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2 ** 31))
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---- compression ---------------------------------------------------------------------------------
def test_seed_worked_example_first_block_1():
    k = torch.tensor(SEED_KEYS, dtype=torch.float64)[None, :, None, :]  # [1, 16, 1, 4]
    out = ref.compress(k, block=4, stride=2, first_block=1)
    assert out.shape == (1, 6, 1, 4)
    torch.testing.assert_close(out[0, :, 0], torch.tensor(SEED_COMPRESSED, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_seed_worked_example_first_block_0_adds_block_0():
    k = torch.tensor(SEED_KEYS, dtype=torch.float64)[None, :, None, :]
    out = ref.compress(k, block=4, stride=2, first_block=0)
    expect = [[0.2, 0.3, 0.8, 0.15]] + SEED_COMPRESSED
    torch.testing.assert_close(out[0, :, 0], torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,l,d,f,N", [(16, 4, 2, 0, 7), (16, 4, 2, 1, 6), (3, 4, 2, 0, 0), (4, 4, 2, 0, 1),
                                        (5, 4, 2, 0, 1), (6, 4, 2, 0, 2), (100, 32, 16, 0, 5), (1, 16, 16, 0, 0)])
def test_num_compressed_blocks(T, l, d, f, N):
    assert ref.num_compressed_blocks(T, l, d, f) == N
    assert ref.compress(rand(1, T, 2, 3), l, d, f).shape == (1, N, 2, 3)


def test_compressed_visibility():
    # l=4, d=2: block i covers [2i, 2i+4), complete at t = 2i + 3.
    vis = ref.compressed_visible(torch.arange(8), N=3, block=4, stride=2, first_block=0)
    expect = [[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert vis.int().tolist() == expect
    vis1 = ref.compressed_visible(torch.arange(8), N=2, block=4, stride=2, first_block=1)
    assert vis1.int().tolist() == [r[1:] for r in expect]


def test_compression_attention_no_visible_block_gives_zero_and_neg_inf():
    q, k, v = rand(1, 8, 2, 4), rand(1, 3, 1, 4), rand(1, 3, 1, 5)
    o, lse = ref.compression_attention(q, k, v, block=4, stride=2)
    assert torch.all(o[:, :3] == 0) and torch.all(torch.isneginf(lse[:, :3]))
    assert torch.isfinite(lse[:, 3:]).all()
    # t = 3 sees only block 0: output is exactly v_cmp[0].
    torch.testing.assert_close(o[0, 3, 0], v[0, 0, 0])
    # t = 7 sees all three: a plain softmax.
    s = (q[0, 7, 1] @ k[0, :, 0].T) / 2.0
    torch.testing.assert_close(o[0, 7, 1], torch.softmax(s, -1) @ v[0, :, 0])
    torch.testing.assert_close(lse[0, 7, 1], torch.logsumexp(s, -1))


# ---- scores and top-n ----------------------------------------------------------------------------
def test_score_mapping_weights_paper_eq9():
    # l=32, d=16, l'=64: weights over i = 4j-1 .. 4j+3 are 1, 2, 2, 2, 1.
    W = ref.score_mapping_weights(N=12, num_sel_blocks=4, block=32, stride=16, sel_block=64)
    assert W[3:8, 1].tolist() == [1, 2, 2, 2, 1]
    assert W[:, 1].sum() == 8 and W[0:4, 0].tolist() == [2, 2, 2, 1]
    assert W[0:3, 1].sum() == 0 and W[8:, 1].sum() == 0


def test_score_mapping_weights_identity_when_blocks_equal():
    W = ref.score_mapping_weights(N=5, num_sel_blocks=5, block=64, stride=64, sel_block=64)
    assert torch.equal(W, torch.eye(5))


def test_score_mapping_first_block_shifts_rows():
    W0 = ref.score_mapping_weights(6, 3, 32, 16, 64, first_block=0)
    W1 = ref.score_mapping_weights(5, 3, 32, 16, 64, first_block=1)
    assert torch.equal(W0[1:], W1)


def test_selection_scores_sum_over_group():
    p = torch.zeros(1, 1, 4, 3)  # HQ = 4, H = 2, N = 3, l = d = l' = 32
    p[0, 0, 0, 1], p[0, 0, 1, 1], p[0, 0, 2, 2] = 0.25, 0.5, 1.0
    s = ref.selection_scores(p, kv_heads=2, T=96, block=32, stride=32, sel_block=32)
    assert s.tolist() == [[[[0, 0.75, 0], [0, 0, 1.0]]]]


def topn(scores, t, l_sel, n, initial=1, local=2):
    s = torch.tensor(scores, dtype=torch.float32)[None, None, None, :]
    return ref.select_top_n(s, l_sel, n, initial, local, t_offset=t)[0, 0, 0].tolist()


def test_top_n_forced_blocks_beat_scores():
    # t = 700, l' = 64 -> current block 10; forced: 0, 10, 9. Best scores elsewhere: 3 then 5.
    sc = [0.0] * 11
    sc[3], sc[5], sc[0], sc[9], sc[10] = 0.9, 0.8, 0.0, 0.0, 0.0
    assert topn(sc, 700, 64, 3) == [0, 9, 10]
    assert topn(sc, 700, 64, 5) == [0, 3, 5, 9, 10]


def test_top_n_ties_go_to_lower_index():
    sc = [0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert topn(sc, 7 * 64, 64, 5) == [0, 1, 2, 6, 7]
    assert topn([0.0] * 8, 7 * 64, 64, 4) == [0, 1, 6, 7]


def test_top_n_short_prefix_takes_all_visible():
    assert topn([0.1] * 8, 130, 64, 4) == [0, 1, 2, -1]   # blocks 0..2 visible
    assert topn([0.1] * 8, 0, 64, 4) == [0, -1, -1, -1]
    assert topn([0.1] * 2, 100, 64, 16) == [0, 1] + [-1] * 14  # fewer blocks than slots


def test_top_n_ignores_invisible_blocks_however_high():
    sc = [0.0, 0.0, 0.0, 9.0]
    assert topn(sc, 150, 64, 3, initial=0, local=1) == [0, 1, 2]


def test_top_n_initial_and_local_zero():
    sc = [0.1, 0.9, 0.3, 0.2]
    assert topn(sc, 255, 64, 2, initial=0, local=0) == [1, 2]


# ---- selection / window / dense equivalence ------------------------------------------------------
def test_selection_masks_tokens_after_t_within_block():
    q, k, v = rand(1, 40, 1, 8), rand(1, 40, 1, 8), rand(1, 40, 1, 8)
    idx = torch.full((1, 40, 1, 2), -1, dtype=torch.int32)
    idx[..., 0] = 0
    o, lse = ref.selection_attention(q, k, v, idx, sel_block=32)
    # t = 5 selects block 0 but sees only keys 0..5.
    s = q[0, 5, 0] @ k[0, :6, 0].T / math.sqrt(8)
    torch.testing.assert_close(o[0, 5, 0], torch.softmax(s, -1) @ v[0, :6, 0])
    # t = 35 with block 0 only: keys 0..31.
    s = q[0, 35, 0] @ k[0, :32, 0].T / math.sqrt(8)
    torch.testing.assert_close(o[0, 35, 0], torch.softmax(s, -1) @ v[0, :32, 0])


@pytest.mark.parametrize("T,G", [(1, 1), (37, 2), (200, 4)])
def test_all_blocks_selected_equals_dense_causal(T, G):
    H = 2
    q, k, v = rand(2, T, H * G, 16), rand(2, T, H, 16), rand(2, T, H, 8)
    NS = ref.num_selection_blocks(T, 32)
    idx = torch.arange(NS, dtype=torch.int32).expand(2, T, H, NS).contiguous()
    o_sel, lse_sel = ref.selection_attention(q, k, v, idx, sel_block=32)
    o_dense, lse_dense = ref.dense_causal_attention(q, k, v)
    torch.testing.assert_close(o_sel, o_dense)
    torch.testing.assert_close(lse_sel, lse_dense)
    # A window as long as the sequence is dense too; a manual dense softmax agrees.
    s = torch.einsum("bthd,bshd->bhts", q[:, :, :G], k[:, :, :1].expand(-1, -1, G, -1)) / 4.0
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    manual = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), v[:, :, :1].expand(-1, -1, G, -1))
    torch.testing.assert_close(o_dense[:, :, :G], manual)


def test_nsa_reference_selects_every_block_when_top_n_covers_sequence():
    spec = NSASpec(heads=4, kv_heads=2, head_dim=64, v_head_dim=64,
                   compression=CompressionBranch(32, 16, "mean"), selection=SelectionBranch(32, 8, 1, 2),
                   window=None)
    T = 200  # 7 selection blocks <= top_n = 8
    q, k, v = rand(1, T, 4, 64), rand(1, T, 2, 64), rand(1, T, 2, 64)
    zeros, ones = torch.zeros(1, T, 4, dtype=q.dtype), torch.ones(1, T, 4, dtype=q.dtype)
    out, idx = ref.nsa_reference(q, k, v, zeros, ones, zeros, spec, return_indices=True)
    torch.testing.assert_close(out, ref.dense_causal_attention(q, k, v)[0])
    t = torch.arange(T)
    assert torch.equal((idx >= 0).sum(-1)[0, :, 0], t // 32 + 1)


def test_window_attention_sees_exactly_w_keys():
    q, k, v = rand(1, 100, 2, 8), rand(1, 100, 1, 8), rand(1, 100, 1, 4)
    o, _ = ref.window_attention(q, k, v, window=10)
    t = 57
    s = q[0, t, 1] @ k[0, t - 9:t + 1, 0].T / math.sqrt(8)
    torch.testing.assert_close(o[0, t, 1], torch.softmax(s, -1) @ v[0, t - 9:t + 1, 0])
    torch.testing.assert_close(o[0, 0, 0], v[0, 0, 0])


# ---- the whole layer -----------------------------------------------------------------------------
SMALL = NSASpec(heads=8, kv_heads=2, head_dim=64, v_head_dim=64,
                compression=CompressionBranch(32, 16, "mean"), selection=SelectionBranch(64, 4, 1, 2),
                window=WindowBranch(64))


def _inputs(T, spec=SMALL, B=1, dtype=torch.float64):
    q = rand(B, T, spec.heads, spec.head_dim, dtype=dtype)
    k = rand(B, T, spec.kv_heads, spec.head_dim, dtype=dtype)
    v = rand(B, T, spec.kv_heads, spec.v_head_dim, dtype=dtype)
    gates = [torch.rand(B, T, spec.heads, dtype=dtype) for _ in range(3)]
    return q, k, v, gates


def test_nsa_reference_is_gated_sum_of_branches():
    T = 300
    q, k, v, (gc, gs, gw) = _inputs(T)
    out, idx = ref.nsa_reference(q, k, v, gc, gs, gw, SMALL, return_indices=True)
    kc, vc = ref.compress(k, 32, 16), ref.compress(v, 32, 16)
    o_c, lse_c, p = ref.compression_attention(q, kc, vc, 32, 16, return_probs=True)
    idx2 = ref.select_top_n(ref.selection_scores(p, 2, T, 32, 16, 64), 64, 4, 1, 2)
    assert torch.equal(idx, idx2)
    o_s, _ = ref.selection_attention(q, k, v, idx2, 64)
    o_w, _ = ref.window_attention(q, k, v, 64)
    expect = gc[..., None] * o_c + gs[..., None] * o_s + gw[..., None] * o_w
    torch.testing.assert_close(out, expect)


def test_selection_follows_the_compression_scores():
    # Plant a strong match: query of head group 0 at t = 299 equals compressed key 6 (scaled up).
    T = 300
    q, k, v, gates = _inputs(T)
    kc = ref.compress(k, 32, 16)
    q[0, 299, 0:4] = 40 * kc[0, 6, 0]  # compressed block 6 covers tokens [96, 128) = selection block 1
    _, idx = ref.nsa_reference(q, k, v, *gates, SMALL, return_indices=True)
    assert 1 in idx[0, 299, 0].tolist()


def test_explicit_block_indices_and_branch_kv_override():
    T = 130
    q, k, v, gates = _inputs(T)
    idx = torch.zeros(1, T, 2, 4, dtype=torch.int32) - 1
    idx[..., 0] = 0
    k_win, v_win = rand(1, T, 2, 64), rand(1, T, 2, 64)
    out = ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=idx, k_win=k_win, v_win=v_win)
    o_c, _ = ref.compression_attention(q, ref.compress(k, 32, 16), ref.compress(v, 32, 16), 32, 16)
    o_s, _ = ref.selection_attention(q, k, v, idx, 64)
    o_w, _ = ref.window_attention(q, k_win, v_win, 64)
    gc, gs, gw = gates
    torch.testing.assert_close(out, gc[..., None] * o_c + gs[..., None] * o_s + gw[..., None] * o_w)


def test_compression_off_needs_indices():
    spec = NSASpec(heads=8, kv_heads=2, head_dim=64, compression=None, selection=SelectionBranch(64, 4),
                   window=None)
    q, k, v, gates = _inputs(70, spec)
    with pytest.raises(ValueError, match="block_indices"):
        ref.nsa_reference(q, k, v, *gates, spec)
    idx = torch.zeros(1, 70, 2, 4, dtype=torch.int32) - 1
    idx[..., 0] = 0
    idx[:, 64:, :, 1] = 1
    out = ref.nsa_reference(q, k, v, None, gates[1], None, spec, block_indices=idx)
    torch.testing.assert_close(out, gates[1][..., None] * ref.selection_attention(q, k, v, idx, 64)[0])


def test_first_block_1_reproduces_paper_indexing():
    spec1 = NSASpec(heads=8, kv_heads=2, head_dim=64, compression=CompressionBranch(32, 16, "mean", 1),
                    selection=None, window=None)
    T = 150
    q, k, v, gates = _inputs(T, spec1)
    out = ref.nsa_reference(q, k, v, gates[0], None, None, spec1)
    kc = ref.compress(k, 32, 16, first_block=0)[:, 1:]
    vc = ref.compress(v, 32, 16, first_block=0)[:, 1:]
    o, _ = ref.compression_attention(q, kc, vc, 32, 16, first_block=1)
    torch.testing.assert_close(out, gates[0][..., None] * o)
    assert torch.all(out[0, :47] == 0)  # block 1 covers [16, 48): first visible at t = 47


def test_cu_seqlens_matches_separate_sequences():
    lens = [70, 1, 200, 33]
    T = sum(lens)
    q, k, v, gates = _inputs(T)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    out, idx = ref.nsa_reference(q, k, v, *gates, SMALL, cu_seqlens=cu, return_indices=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o1, i1 = ref.nsa_reference(q[:, a:b], k[:, a:b], v[:, a:b], *[g[:, a:b] for g in gates], SMALL,
                                   return_indices=True)
        torch.testing.assert_close(out[:, a:b], o1)
        assert torch.equal(idx[:, a:b], i1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ref.nsa_reference(q, k, v, *gates, SMALL, cu_seqlens=torch.tensor([0, 5]))


def test_bad_shapes_name_the_tensor():
    q, k, v, gates = _inputs(10)
    with pytest.raises(ValueError, match="^k must be"):
        ref.nsa_reference(q, k[:, :, :1], v, *gates, SMALL)
    with pytest.raises(ValueError, match="^q must be"):
        ref.nsa_reference(q[..., :32], k, v, *gates, SMALL)


def test_hostile_inputs_raise_errors_that_name_the_argument():
    q, k, v, gates = _inputs(40)
    n = SMALL.selection.top_n
    idx = torch.zeros(1, 40, SMALL.kv_heads, n, dtype=torch.int64)
    cases = [
        (lambda: ref.nsa_reference(q.int(), k, v, *gates, SMALL), "^q must be a floating-point"),
        (lambda: ref.nsa_reference(q, k.float(), v, *gates, SMALL), "^k is torch.float32"),
        (lambda: ref.nsa_reference(q, k, v, gates[0][..., :1], *gates[1:], SMALL), "^g_cmp must be"),
        (lambda: ref.nsa_reference(q, k, v, gates[0], None, gates[2], SMALL), "^g_slc is required"),
        (lambda: ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=idx.float()), "^block_indices must be an int"),
        (lambda: ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=idx[..., :1]), r"^block_indices must be \[B"),
        (lambda: ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=idx + 99), r"^block_indices must lie in \[-1"),
        (lambda: ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=idx - 2), r"^block_indices must lie in \[-1"),
        (lambda: ref.nsa_reference(q, k, v, *gates, SMALL, cu_seqlens=torch.tensor([0.0, 40.0])), "^cu_seqlens must be"),
        (lambda: ref.nsa_reference(q, k, v, *gates, SMALL, cu_seqlens=torch.tensor([[0, 40]])), "^cu_seqlens must be"),
        (lambda: ref.nsa_reference(q, k, v, *gates, SMALL, cu_seqlens=torch.tensor([0, 50, 40])), "^cu_seqlens must rise"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_defined_results_for_edge_inputs():
    q, k, v, gates = _inputs(40)
    # T = 0: an empty output and empty block lists
    o, idx = ref.nsa_reference(q[:, :0], k[:, :0], v[:, :0], *(g[:, :0] for g in gates), SMALL, return_indices=True)
    assert o.shape == (1, 0, SMALL.heads, SMALL.v_head_dim) and idx.shape == (1, 0, SMALL.kv_heads, SMALL.selection.top_n)
    # non-contiguous and stride-0 inputs compute the same function as their contiguous copies
    want = ref.nsa_reference(q, k, v, *gates, SMALL)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(ref.nsa_reference(qt, k, v, *gates, SMALL), want)
    k0 = k[:, :1].expand_as(k)
    torch.testing.assert_close(ref.nsa_reference(q, k0, v, *gates, SMALL),
                               ref.nsa_reference(q, k0.contiguous(), v, *gates, SMALL))
    # blocks after the token are allowed and contribute nothing
    base = torch.full((1, 40, SMALL.kv_heads, SMALL.selection.top_n), -1, dtype=torch.int64)
    base[..., 0] = 0
    future = base.clone()
    future[..., 1] = ref.num_selection_blocks(40, SMALL.selection.block) - 1
    early = slice(0, SMALL.selection.block * (future[0, 0, 0, 1].item()))
    torch.testing.assert_close(ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=future)[:, early],
                               ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=base)[:, early])


@pytest.mark.parametrize("what", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_token_reaches_only_the_outputs_that_see_it(what, value):
    """Causally: a NaN/Inf at token s leaves every output t < s finite (all three branches), in the
    reference and in each branch alone; and with cu_seqlens, other sequences' outputs too."""
    T, s = 96, 61
    q, k, v, gates = _inputs(T)
    x = {"q": q, "k": k, "v": v}
    x[what] = x[what].clone()
    x[what][:, s] = value
    o = ref.nsa_reference(x["q"], x["k"], x["v"], *gates, SMALL)
    assert torch.isfinite(o[:, :s]).all(), f"a {value} {what} at token {s} reached an earlier output"
    assert not torch.isfinite(o[:, s]).all(), "the token itself must see it"
    cu = torch.tensor([0, s, T])      # s starts the second sequence: the first never sees it
    o = ref.nsa_reference(x["q"], x["k"], x["v"], *gates, SMALL, cu_seqlens=cu)
    assert torch.isfinite(o[:, :s]).all()


def test_low_precision_reference_is_close_to_fp64():
    T = 257
    q, k, v, gates = _inputs(T, dtype=torch.float64)
    idx = ref.nsa_reference(q, k, v, *gates, SMALL, return_indices=True)[1]
    hi = ref.nsa_reference(q, k, v, *gates, SMALL, block_indices=idx)
    lo = ref.nsa_reference(*(x.to(torch.bfloat16) for x in (q, k, v)), *(g.to(torch.bfloat16) for g in gates),
                           SMALL, block_indices=idx)
    err = (lo.double() - hi).norm() / hi.norm()
    assert 1e-4 < err < 1e-2


def test_paper_config_t8192_runs_on_cpu():
    spec = NSASpec(compression=CompressionBranch(32, 16, "mean"))  # paper config, HQ=64, Dk=192, Dv=128
    T = 8192
    torch.manual_seed(0)
    q = torch.randn(1, T, 64, 192)
    k, v = torch.randn(1, T, 4, 192), torch.randn(1, T, 4, 128)
    g = torch.rand(1, T, 64)
    out, idx = ref.nsa_reference(q, k, v, g, g, g, spec, return_indices=True)
    assert out.shape == (1, T, 64, 128) and torch.isfinite(out).all()
    assert idx.shape == (1, T, 4, 16) and (idx[:, -1] >= 0).all()


def test_selection_keys_rank_like_select_top_n():
    torch.manual_seed(0)
    scores = torch.rand(1, 5, 2, 9, dtype=torch.float64)
    keys = ref.selection_keys(scores, sel_block=16, initial=1, local=2, t_offset=60)
    idx = ref.select_top_n(scores, 16, 4, 1, 2, t_offset=60)
    # the top-n are the n largest keys; invisible blocks (past t // 16) are -inf, forced ones +inf
    for t in range(5):
        for h in range(2):
            picked = set(idx[0, t, h].tolist()) - {-1}
            want = set(torch.sort(keys[0, t, h], descending=True, stable=True).indices[:4].tolist())
            assert picked == {j for j in want if keys[0, t, h, j] > float("-inf")}
    assert keys[0, 0, 0, 0] == float("inf") and keys[0, 0, 0, 8] == float("-inf")


def test_compare_block_indices_accepts_near_ties_only():
    keys = torch.tensor([[float("inf"), 0.50, 0.30, 0.299, 0.10]], dtype=torch.float64)
    want = torch.tensor([[0, 1, 2]])
    assert ref.compare_block_indices(want, want, keys) == (True, 0, "")
    ok, ties, _ = ref.compare_block_indices(torch.tensor([[0, 1, 3]]), want, keys)  # 0.30 vs 0.299: a tie
    assert ok and ties == 1
    ok, _, msg = ref.compare_block_indices(torch.tensor([[0, 1, 4]]), want, keys)   # 0.30 vs 0.10: wrong
    assert not ok and "score gap" in msg
    ok, _, msg = ref.compare_block_indices(torch.tensor([[0, 3, 1]]), want, keys)   # not ascending
    assert not ok and "malformed" in msg


def test_branches_of_an_empty_sequence_are_empty():
    """T = 0 (an empty sequence of a pack, run alone): every branch returns empty o and lse."""
    for dt in (torch.bfloat16, torch.float64):
        q, k, v = torch.zeros(2, 0, 4, 8, dtype=dt), torch.zeros(2, 0, 2, 8, dtype=dt), torch.zeros(2, 0, 2, 8, dtype=dt)
        for o, lse in (ref.selection_attention(q, k, v, torch.zeros(2, 0, 2, 3, dtype=torch.int32), 16),
                       ref.window_attention(q, k, v, 16)):
            assert o.shape == (2, 0, 4, 8) and lse.shape == (2, 0, 4) and o.dtype == dt
