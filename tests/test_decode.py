"""The decode step (nsa_codegen.decode): how it splits work (CPU), and on the GPU prefill plus decode
steps against the reference over each whole sequence."""
import pytest
import torch

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen import reference as ref
from nsa_codegen.kv_cache import NSAKVCache


@pytest.mark.parametrize("block,stride,first,sel", [(32, 16, 0, 64), (32, 16, 1, 32), (16, 16, 0, 32),
                                                    (64, 16, 3, 32), (32, 8, 0, 128), (32, 4, 0, 128),
                                                    (64, 1, 0, 128)])
def test_decode_score_groups_cover_the_blocks_their_rows_overlap(block, stride, first, sel):
    """The decode cmp kernel sums its top-n scores per group of SG compressed rows into NBG blocks
    GB*g + JMIN + k: exactly the blocks those rows overlap, at the same offsets for every group."""
    from nsa_codegen.resources import template_module
    SG, NBG, JMIN = template_module("decode_attention").score_groups(block, stride, first, sel)
    m_u, r_u = block // stride, sel // stride
    assert SG % 16 == 0 and SG % r_u == 0
    for g in range(5):
        # row c is unit u = c + m_u - 1 + first - j * r_u (0 <= u <= r_u + m_u - 2) of block j
        touched = {j for c in range(SG * g, SG * g + SG) for j in range(-4, 2000)
                   if 0 <= c + m_u - 1 + first - j * r_u <= r_u + m_u - 2}
        assert touched == set(range(SG // r_u * g + JMIN, SG // r_u * g + JMIN + NBG))


@pytest.mark.parametrize("B,n", [(1, 1), (5, 2), (5, 4), (16, 2), (7, 3), (64, 8)])
def test_batch_parts_cover_the_batch_once(B, n):
    from nsa_codegen.decode import _batch_parts
    parts = _batch_parts(B, 4, n)
    assert len(parts) == n and parts[0][0] == 0 and parts[-1][1] == B
    assert all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    sizes = [b - a for a, b in parts]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert _batch_parts(1, 4, None) == [(0, 1)] and _batch_parts(8, 4, None) == [(0, 8)]
    assert len(_batch_parts(16, 4, None)) == 4    # the heuristic: 4 parts once B * H >= 64
    with pytest.raises(ValueError, match="num_parts"):
        _batch_parts(B, 4, B + 1)


# ------------------------------------------------------------------------------------------------
# GPU: nsa_decode against the full forward
# ------------------------------------------------------------------------------------------------
# (name, spec, q_len, prefill lengths (ragged, not multiples of any block), decode steps, separate window)
DECODE_CASES = [
    ("paper_d128_fp16_q1", NSASpec(head_dim=128, v_head_dim=128, dtype="float16"), 1, [37, 700, 2000, 3001], 5,
     False),
    ("g8_dk192_bf16_f1_sepwin_q2", NSASpec(heads=16, kv_heads=2, head_dim=192, v_head_dim=128, dtype="bfloat16",
                                           compression=CompressionBranch(32, 16, "mean", 1),
                                           selection=SelectionBranch(32, 8, 1, 2), window=WindowBranch(128)),
     2, [3, 97, 1201], 4, True),
    # the default build set's G=4 bf16 problem (h4_g4), whose decode check failed while tuning
    ("g4_d128_bf16_q1", NSASpec(heads=16, kv_heads=4, head_dim=128, v_head_dim=128, dtype="bfloat16"), 1,
     [37, 700, 2000, 3001], 5, False),
    ("g1_d64_fp16_q8", NSASpec(heads=4, kv_heads=4, head_dim=64, v_head_dim=64, dtype="float16",
                               compression=CompressionBranch(16, 16, "mean"), selection=SelectionBranch(32, 8, 1, 2),
                               window=WindowBranch(64)), 8, [9, 333, 1000], 3, False),
    # groups padded to a power of two of 16-row slabs: 48 -> 64 rows (q_len 1), 6 x 8 -> 64 (q_len 8,
    # with a window of 24, shorter than a tile and off the 64-multiples)
    ("g48_d64_fp16_q1", NSASpec(heads=48, kv_heads=1, head_dim=64, v_head_dim=64, dtype="float16",
                                compression=CompressionBranch(32, 16, "mean"), window=WindowBranch(256)), 1,
     [37, 700, 2000], 3, False),
    # the seed article's long-context compression (block 256, stride 128)
    ("seed_l256_bf16_q1", NSASpec(head_dim=128, v_head_dim=128, dtype="bfloat16",
                                  compression=CompressionBranch(256, 128, "mean"),
                                  selection=SelectionBranch(128, 16, 1, 2)), 1, [37, 700, 3001], 3, False),
    ("g6_d128_bf16_q8", NSASpec(heads=48, kv_heads=8, head_dim=128, v_head_dim=128, dtype="bfloat16",
                                window=WindowBranch(24)), 8,
     [9, 333, 1000], 3, False),
]


@pytest.fixture(scope="module")
def decode_compiled():
    """Compile the cases' decode kernels in parallel, once (the test would compile them one by one)."""
    from nsa_codegen.cache import precompile
    from nsa_codegen.lowering import arch_of_capability, lower_decode
    arch = arch_of_capability(*torch.cuda.get_device_capability())   # the arch nsa_decode will pick
    keys = [c.key for _, spec, ql, lens0, steps, sep in DECODE_CASES
            for c in lower_decode(spec, arch, ql, sep, max(lens0) + steps * ql + 5)]
    failed = [(k, e) for k, e, _ in precompile(keys) if e]
    assert not failed, failed


@pytest.mark.gpu
@pytest.mark.parametrize("name,spec,ql,lens0,steps,sep", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_steps_equal_the_full_forward(name, spec, ql, lens0, steps, sep, decode_compiled):
    """Prefill ragged lengths, then `steps` decode steps of ql tokens: the compressed cache equals
    compress() from scratch, the top-n blocks equal the reference's (up to near ties), and every
    step's output equals nsa_reference over the whole sequence at those positions (1e-2, and at
    most 2x the reference's own error in the kernel dtype)."""
    from nsa_codegen.decode import nsa_decode
    from test_ops import rel_err
    g = torch.Generator(device="cuda").manual_seed(7)
    dt = getattr(torch, spec.dtype)
    B, HQ, H, Dk, Dv = len(lens0), spec.heads, spec.kv_heads, spec.head_dim, spec.v_head_dim
    final = [L + steps * ql for L in lens0]
    Tm = max(final)

    def rn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dt)
    q, k, v = rn(B, Tm, HQ, Dk), rn(B, Tm, H, Dk), rn(B, Tm, H, Dv)
    kw, vw = (rn(B, Tm, H, Dk), rn(B, Tm, H, Dv)) if sep else (None, None)
    gates = torch.sigmoid(torch.randn(B, Tm, 3, HQ, generator=g, device="cuda")).to(dt)
    cache = NSAKVCache(spec, B, Tm + 5, device="cuda", dtype=dt, separate_window=sep)
    T0 = max(lens0)
    cache.prefill(k[:, :T0], v[:, :T0], *((kw[:, :T0], vw[:, :T0]) if sep else ()), seqlens=lens0)
    lens, outs, idxs = list(lens0), [], []
    bi = torch.arange(B, device="cuda")[:, None]
    for _ in range(steps):
        pos = torch.tensor(lens, device="cuda")[:, None] + torch.arange(ql, device="cuda")[None]
        cache.append(k[bi, pos], v[bi, pos], *((kw[bi, pos], vw[bi, pos]) if sep else ()))
        lens = [L + ql for L in lens]
        gg = gates[bi, pos]
        o, idx = nsa_decode(q[bi, pos], cache, gg[..., 0, :], gg[..., 1, :], gg[..., 2, :], return_indices=True)
        assert not torch.isnan(o).any(), "NaN in decode output (unwritten elements?)"
        outs.append(o)
        idxs.append(idx)
    assert cache.lengths == final and cache.cache_seqlens.tolist() == final
    c = spec.compression
    same_rows = total_rows = 0
    for b in range(B):
        L = final[b]
        N = cache.num_cmp_host[b]
        for raw, cmp in ((k, cache.k_cmp), (v, cache.v_cmp)):
            want = ref.compress(raw[b:b + 1, :L].float(), c.block, c.stride, c.first_block)[0]
            # stored in the cache dtype: no worse than compress() rounded to it
            own = rel_err(want.to(dt), want)
            assert N == want.shape[0] and rel_err(cmp[b, :N], want) <= 2 * own + 1e-6
        P = torch.tensor([lens0[b] + s * ql + i for s in range(steps) for i in range(ql)], device="cuda")
        args = [x[b:b + 1, :L] for x in (q, k, v, gates[:, :, 0], gates[:, :, 1], gates[:, :, 2])]
        win = dict(k_win=kw[b:b + 1, :L], v_win=vw[b:b + 1, :L]) if sep else {}
        _, ref_idx = ref.nsa_reference(*[a.float() for a in args], spec, return_indices=True,
                                       **{n: t.float() for n, t in win.items()})
        got_idx = torch.cat([idxs[s][b] for s in range(steps)])           # [P, H, n]
        same_rows += (got_idx == ref_idx[0, P]).all(-1).sum().item()
        total_rows += got_idx.shape[0] * H
        # the output is checked on the kernel's own choice (a near tie may pick the other block)
        sub = ref_idx.clone()
        sub[0, P] = got_idx.to(sub.dtype)
        hi = ref.nsa_reference(*[a.float() for a in args], spec, block_indices=sub,
                               **{n: t.float() for n, t in win.items()})[0, P]
        lo = ref.nsa_reference(*args, spec, block_indices=sub, **win)[0, P]
        got = torch.cat([outs[s][b] for s in range(steps)])
        err, err_lo = rel_err(got, hi), rel_err(lo, hi)
        assert err < 1e-2, f"entry {b}: relative error {err:.2e}"
        assert err <= 2 * err_lo + 1e-6, f"entry {b}: relative error {err:.2e} > 2x the reference's {err_lo:.2e}"
    assert same_rows >= 0.97 * total_rows, f"top-n equals the reference in only {same_rows}/{total_rows} rows"


@pytest.mark.gpu
def test_decode_batch_parts_and_graph_replay_equal_one_launch_chain(decode_compiled):
    """The batch split into parts on their own streams (num_parts), eagerly and replayed from a
    CUDA graph, gives bit-identical outputs and blocks to one chain with the same split counts."""
    from nsa_codegen.decode import nsa_decode
    name, spec, ql, lens0, steps, sep = DECODE_CASES[0]
    g = torch.Generator(device="cuda").manual_seed(11)
    dt = getattr(torch, spec.dtype)
    B, HQ, H, D = 5, spec.heads, spec.kv_heads, spec.head_dim
    lens = [3001, 37, 700, 2000, 1531]
    cache = NSAKVCache(spec, B, max(lens) + 5, device="cuda", dtype=dt)
    k = torch.randn(B, max(lens), H, D, generator=g, device="cuda").to(dt)
    v = torch.randn(B, max(lens), H, D, generator=g, device="cuda").to(dt)
    cache.prefill(k, v, seqlens=lens)
    q = torch.randn(B, ql, HQ, D, generator=g, device="cuda").to(dt)
    gates = [torch.rand(B, ql, HQ, generator=g, device="cuda").to(dt) for _ in range(3)]
    splits = (3, 2, 2)
    want_o, want_i = nsa_decode(q, cache, *gates, return_indices=True, num_splits=splits, num_parts=1)
    assert not torch.isnan(want_o).any()
    for n in (2, 3, 5):
        o, i = nsa_decode(q, cache, *gates, return_indices=True, num_splits=splits, num_parts=n)
        assert torch.equal(o, want_o) and torch.equal(i, want_i), f"{n} parts"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up off the capture
        nsa_decode(q, cache, *gates, num_splits=splits, num_parts=2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = nsa_decode(q, cache, *gates, num_splits=splits, num_parts=2)
    o_graph.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o_graph, want_o)


# Paged decode: page sizes below (several pages a tile), at and above the selection block (64).
PAGED_CASES = [(c, P) for c in (DECODE_CASES[0], DECODE_CASES[1]) for P in (16, 64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("case,page_size", PAGED_CASES, ids=[f"{c[0]}-pg{P}" for c, P in PAGED_CASES])
def test_paged_decode_equals_the_contiguous_decode_and_the_reference(case, page_size):
    """nsa_decode over a PagedNSAKVCache batch (slots out of order, pages of a freed NaN-filled
    sequence reused) picks the contiguous cache's blocks and its output equals the reference's on
    them (1e-2, at most 2x the reference's own error in the dtype), step after step; more than 4
    batch parts too (the pools are shared, the tables sliced)."""
    from nsa_codegen.decode import nsa_decode
    from nsa_codegen.kv_cache import nsa_decode_reference
    from nsa_codegen.paged_kv_cache import PagedNSAKVCache
    from test_ops import rel_err
    name, spec, ql, lens0, steps, sep = case
    g = torch.Generator(device="cuda").manual_seed(13)
    dt = getattr(torch, spec.dtype)
    B, HQ, H, Dk, Dv = len(lens0), spec.heads, spec.kv_heads, spec.head_dim, spec.v_head_dim
    Tm = max(lens0) + steps * ql

    def rn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dt)
    k, v = rn(B, Tm, H, Dk), rn(B, Tm, H, Dv)
    kw, vw = (rn(B, Tm, H, Dk), rn(B, Tm, H, Dv)) if sep else (None, None)
    contig = NSAKVCache(spec, B, Tm + 5, device="cuda", dtype=dt, separate_window=sep)
    pool = PagedNSAKVCache(spec, num_pages=2 * B * (-(-Tm // page_size)) + 8, page_size=page_size, max_seqs=B + 1,
                           max_seq_len=Tm + 5, device="cuda", dtype=dt, separate_window=sep)
    junk = pool.add_sequence()   # fill pages with NaN, then free them: the real sequences reuse them
    nan = torch.full((1, 3 * page_size + 5, H, Dk), float("nan"), device="cuda", dtype=dt)
    pool.append([junk], nan, nan[..., :Dv], *((nan, nan[..., :Dv]) if sep else ()))
    pool.free_sequence(junk)
    slots = [pool.add_sequence() for _ in range(B)][::-1]   # entry i = slots[i], not slot i
    batch = pool.batch(slots)
    T0 = max(lens0)
    pre = (k[:, :T0], v[:, :T0], *((kw[:, :T0], vw[:, :T0]) if sep else ()))
    contig.prefill(*pre, seqlens=lens0)
    batch.append(*pre, seqlens_new=lens0)
    lens = list(lens0)
    bi = torch.arange(B, device="cuda")[:, None]
    for step in range(steps):
        pos = torch.tensor(lens, device="cuda")[:, None] + torch.arange(ql, device="cuda")[None]
        new = (k[bi, pos], v[bi, pos], *((kw[bi, pos], vw[bi, pos]) if sep else ()))
        contig.append(*new)
        batch.append(*new)
        lens = [L + ql for L in lens]
        q = rn(B, ql, HQ, Dk)
        gates = [torch.sigmoid(rn(B, ql, HQ).float()).to(dt) for _ in range(3)]
        _, want_idx = nsa_decode(q, contig, *gates, return_indices=True)
        o, idx = nsa_decode(q, batch, *gates, return_indices=True, num_parts=min(B, 3) if step % 2 else None)
        assert not torch.isnan(o).any(), f"step {step}: NaN in the paged output (a reused page's NaN, or unwritten)"
        assert torch.equal(idx, want_idx), f"step {step}: the paged step chose other blocks than the contiguous one"
        hi = nsa_decode_reference(q.float(), _fp32_view(batch), *(x.float() for x in gates), _fp32(spec),
                                  block_indices=idx)
        lo = nsa_decode_reference(q, batch, *gates, block_indices=idx)
        err, err_lo = rel_err(o, hi), rel_err(lo, hi)
        assert err < 1e-2 and err <= 2 * err_lo + 1e-6, f"step {step}: relative error {err:.2e} (reference {err_lo:.2e})"


def _fp32(spec):
    d = spec.to_dict()
    d["dtype"] = "float32"
    return NSASpec.from_dict(d)


class _fp32_view:
    """A paged batch read in float32 (the reference's high-precision run)."""

    def __init__(self, batch):
        self.b = batch
        self.spec, self.dtype, self.device = _fp32(batch.spec), torch.float32, batch.device
        self.batch_size, self.lengths = batch.batch_size, batch.lengths
        self.separate_window, self.separate_cmp = batch.separate_window, batch.separate_cmp

    def entry(self, i):
        return {n: (None if t is None else t.float()) for n, t in self.b.entry(i).items()}


@pytest.mark.parametrize("L", [1, 63, 64, 65, 500, 700, 4096, 65536])
@pytest.mark.parametrize("local,window", [(2, 512), (0, 512), (2, 0), (3, 64)])
def test_decode_bytes_count_each_row_once(L, local, window):
    """nsa_decode_bytes against the row sets themselves: compressed rows, plus the union of the
    selected blocks' rows (forced blocks, the rest as far from the window as possible) and the
    window's rows."""
    from nsa_codegen.decode import nsa_decode_bytes
    spec = NSASpec(head_dim=128, v_head_dim=128, selection=SelectionBranch(64, 16, 1, local),
                   window=WindowBranch(window) if window else None)
    s = spec.selection
    nb = -(-L // s.block)
    forced = set(range(min(s.initial, nb))) | set(range(max(0, nb - s.local), nb))
    win = set(range(max(0, L - window), L)) if window else set()
    outside = [j for j in range(nb) if j not in forced and not any(t in win for t in range(j * 64, min(j * 64 + 64, L)))]
    inside = [j for j in range(nb) if j not in forced and j not in outside]
    picks = sorted(forced) + (outside + inside)[:max(0, s.top_n - len(forced))]
    rows = win | {t for j in picks for t in range(j * 64, min(j * 64 + 64, L))}
    c = spec.compression
    n_cmp = ref.num_compressed_blocks(L, c.block, c.stride, c.first_block)
    assert nsa_decode_bytes(spec, L) == (n_cmp + len(rows)) * spec.kv_heads * 256 * 2
