"""PagedNSAKVCache (CPU): sequences join, grow by ragged appends and leave while their pages are
reused; every sequence read back through its pages equals what was written, its compressed rows equal
phi from scratch, and the decode reference over a paged batch equals the contiguous cache's
bit for bit and the reference over each whole sequence."""
import pytest
import torch

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen import reference as ref
from nsa_codegen.kv_cache import NSAKVCache, compressor_phi, nsa_decode_reference
from nsa_codegen.layer import MLPCompressor
from nsa_codegen.paged_kv_cache import PagedNSAKVCache

SPEC = NSASpec(heads=4, kv_heads=2, head_dim=32, v_head_dim=16, dtype="float32",
               compression=CompressionBranch(16, 8, "mean", 1), selection=SelectionBranch(16, 4, 1, 2),
               window=WindowBranch(24))


def _stream(seed, n, T):
    g = torch.Generator().manual_seed(seed)
    return [dict(k=torch.randn(T, 2, 32, generator=g, dtype=torch.float64).float(),
                 v=torch.randn(T, 2, 16, generator=g, dtype=torch.float64).float()) for _ in range(n)]


def _append(cache, slots, seqs, lens, s, take):
    kn = torch.stack([seqs[i]["k"][lens[i]:lens[i] + s] for i in range(len(slots))])
    vn = torch.stack([seqs[i]["v"][lens[i]:lens[i] + s] for i in range(len(slots))])
    cache.append(slots, kn, vn, seqlens_new=take)


def _check_sequence(cache, slot, seq, L):
    got = cache.sequence(slot)
    assert cache.length(slot) == L
    assert torch.equal(got["k"][0], seq["k"][:L]) and torch.equal(got["v"][0], seq["v"][:L])
    assert torch.equal(got["k_win"], got["k"])   # one K/V slot: the window reads the selection's
    c = SPEC.compression
    want = ref.compress(seq["k"][None, :L], c.block, c.stride, c.first_block)
    torch.testing.assert_close(got["k_cmp"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("page_size", [16, 64])
def test_sequences_join_grow_and_leave(page_size):
    cache = PagedNSAKVCache(SPEC, num_pages=40, page_size=page_size, max_seqs=4, max_seq_len=400, device="cpu")
    seqs = _stream(0, 6, 400)
    g = torch.Generator().manual_seed(1)
    slots = [cache.add_sequence() for _ in range(3)]
    owner = dict(zip(slots, range(3)))        # slot -> stream index
    lens = {s: 0 for s in slots}
    for step in range(40):
        if step == 15:   # one sequence leaves, two join (one reuses its slot and pages)
            gone = slots.pop(0)
            free_before = cache.free_pages
            used = -(-lens[gone] // page_size)
            cache.free_sequence(gone)
            assert cache.free_pages == free_before + used
            for _ in range(2):
                sl = cache.add_sequence()
                owner[sl] = len(owner)
                lens[sl] = 0
                slots.append(sl)
        s = int(torch.randint(1, 12 if step % 5 else 40, (1,), generator=g))
        take = [int(x) for x in torch.randint(0, s + 1, (len(slots),), generator=g)]
        _append(cache, slots, [seqs[owner[sl]] for sl in slots], [lens[sl] for sl in slots], s, take)
        for sl, t in zip(slots, take):
            lens[sl] += t
    assert cache.active == slots
    for sl in slots:
        _check_sequence(cache, sl, seqs[owner[sl]], lens[sl])
        assert cache.seqlens[sl] == lens[sl]
        table = cache.block_table[sl]
        assert (table[:-(-lens[sl] // page_size)] >= 0).all() and (table[-(-lens[sl] // page_size):] == -1).all()
    # every page is owned once or free
    owned = [p for sl in slots for p in cache.block_table[sl].tolist() if p >= 0]
    assert len(set(owned)) == len(owned) and len(owned) + cache.free_pages == 40


def test_decode_over_a_paged_batch_equals_contiguous_and_whole_sequences():
    torch.manual_seed(0)
    B, T = 3, 200
    seqs = _stream(3, B, T)
    paged = PagedNSAKVCache(SPEC, num_pages=30, page_size=16, max_seqs=8, max_seq_len=256, device="cpu")
    flat = NSAKVCache(SPEC, B, 256, device="cpu", dtype=torch.float32)
    # occupy and free a slot first, so the batch's slots and pages are not 0..B-1 in order
    junk = paged.add_sequence()
    paged.append([junk], seqs[0]["k"][None, :40], seqs[0]["v"][None, :40])
    slots = [paged.add_sequence() for _ in range(B)]
    paged.free_sequence(junk)
    lens0 = [37, 100, 64]
    _append(paged, slots, seqs, [0] * B, max(lens0), lens0)
    flat.prefill(torch.stack([x["k"][:max(lens0)] for x in seqs]), torch.stack([x["v"][:max(lens0)] for x in seqs]),
                 seqlens=torch.tensor(lens0))
    lens = list(lens0)
    g = torch.Generator().manual_seed(4)
    for ql in (1, 1, 3, 1, 2):
        kn = torch.stack([x["k"][L:L + ql] for x, L in zip(seqs, lens)])
        vn = torch.stack([x["v"][L:L + ql] for x, L in zip(seqs, lens)])
        paged.append(slots, kn, vn)
        flat.append(kn, vn)
        lens = [L + ql for L in lens]
        q = torch.randn(B, ql, 4, 32, generator=g)
        gates = [torch.rand(B, ql, 4, generator=g) for _ in range(3)]
        o_paged = nsa_decode_reference(q, paged.batch(slots), *gates, SPEC)
        o_flat = nsa_decode_reference(q, flat, *gates, SPEC)
        assert torch.equal(o_paged, o_flat)
        for b in range(B):   # the whole sequence's last ql outputs
            L = lens[b]
            qq = torch.randn(1, L, 4, 32, generator=g)
            qq[:, L - ql:] = q[b]
            gg = [torch.rand(1, L, 4, generator=g) for _ in range(3)]
            for x, y in zip(gg, gates):
                x[:, L - ql:] = y[b]
            want = ref.nsa_reference(qq, seqs[b]["k"][None, :L], seqs[b]["v"][None, :L], *gg, SPEC)
            torch.testing.assert_close(o_paged[b], want[0, L - ql:], rtol=1e-5, atol=1e-5)


def test_separate_branch_kv_and_mlp_phi():
    torch.manual_seed(5)
    c = SPEC.compression
    phi_k, phi_v = MLPCompressor(32, c.block, c.stride, c.first_block), MLPCompressor(16, c.block, c.stride, c.first_block)
    cache = PagedNSAKVCache(SPEC, num_pages=20, page_size=16, max_seqs=2, max_seq_len=160, device="cpu",
                            separate_window=True, separate_cmp=True, phi_k=compressor_phi(phi_k),
                            phi_v=compressor_phi(phi_v))
    T = 150
    x = {n: torch.randn(1, T, 2, 32 if n.startswith("k") else 16) for n in ("k", "v", "kw", "vw", "kc", "vc")}
    sl = cache.add_sequence()
    for a, b in ((0, 70), (70, 71), (71, 150)):
        cache.append([sl], x["k"][:, a:b], x["v"][:, a:b], x["kw"][:, a:b], x["vw"][:, a:b],
                     k_cmp_new=x["kc"][:, a:b], v_cmp_new=x["vc"][:, a:b])
    got = cache.sequence(sl)
    assert torch.equal(got["k_win"], x["kw"]) and torch.equal(got["v"], x["v"])
    with torch.no_grad():
        torch.testing.assert_close(got["k_cmp"], phi_k(x["kc"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["v_cmp"], phi_v(x["vc"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k_win_new"):
        cache.append([sl], x["k"][:, :1], x["v"][:, :1])


def test_out_of_pages_and_bad_input_leave_the_cache_as_it_was():
    cache = PagedNSAKVCache(SPEC, num_pages=4, page_size=16, max_seqs=2, max_seq_len=128, device="cpu")
    a, b = cache.add_sequence(), cache.add_sequence()
    k, v = torch.randn(2, 40, 2, 32), torch.randn(2, 40, 2, 16)
    cache.append([a], k[:1], v[:1])            # 3 pages
    state = (cache.free_pages, cache.block_table.clone(), cache.kv_k.clone(), cache.length(a), cache.length(b))
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.append([b], k[1:], v[1:])        # 3 more: only 1 free
    with pytest.raises(ValueError, match="distinct"):
        cache.append([a, a], k, v)
    with pytest.raises(ValueError, match="holds no sequence"):
        cache.append([7], k[:1], v[:1])
    with pytest.raises(ValueError, match="v_new must have shape"):
        cache.append([a], k[:1], v[:1, :, :, :8])
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.append([a], torch.randn(1, 100, 2, 32), torch.randn(1, 100, 2, 16))
    after = (cache.free_pages, cache.block_table, cache.kv_k, cache.length(a), cache.length(b))
    assert after[0] == state[0] and torch.equal(after[1], state[1]) and torch.equal(after[2], state[2])
    assert after[3:] == state[3:]
    with pytest.raises(RuntimeError, match="slots are in use"):
        cache.add_sequence()
    cache.free_sequence(a)
    with pytest.raises(ValueError, match="holds no sequence"):
        cache.free_sequence(a)
    assert cache.free_pages == 4


def test_constructor_rejects_bad_sizes():
    for kw in (dict(num_pages=0), dict(num_pages=4, page_size=0), dict(num_pages=4, max_seqs=True)):
        with pytest.raises(ValueError, match="positive int"):
            PagedNSAKVCache(SPEC, **kw, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        PagedNSAKVCache(SPEC, 4, dtype=torch.int8, device="cpu")


def test_continuous_batching_example_serves_every_request_exactly(load_script):
    """examples/continuous_batching.py: requests join and leave a paged cache (admission waits on
    pages), some verify 2-3 tokens a step; each request's outputs equal one forward over its whole
    sequence, and every page is free at the end."""
    ex = load_script("examples/continuous_batching.py")
    torch.manual_seed(0)
    spec = NSASpec.from_dict(dict(heads=4, kv_heads=2, head_dim=32, v_head_dim=16, dtype="float32",
                                  compression=dict(block=16, stride=8, pool="mlp", first_block=1),
                                  selection=dict(block=16, top_n=4), window=dict(size=32)))
    from nsa_codegen import NativeSparseAttention
    layer = NativeSparseAttention(48, spec, backend="reference")
    cache = layer.new_paged_cache(num_pages=40, page_size=16, max_seqs=4, max_seq_len=512, device="cpu",
                                  dtype=torch.float32)
    reqs = ex.make_requests(10, 48, seed=3)
    stats = {}
    out = ex.serve(layer, reqs, cache, stats=stats)
    assert ex.check(layer, reqs, out) < 1e-5
    assert stats["max_running"] > 1 and stats["batches"] > stats["steps"]   # concurrent, mixed chunk lengths
    assert cache.free_pages == 40 and cache.active == []


def test_fp8_pages_store_e4m3_with_per_head_scales():
    """kv_dtype=float8_e4m3fn: pools hold fp8, one scale per KV head and tensor fixed by the first
    write; reads return the cache dtype within e4m3's precision (3 mantissa bits: ~2.6% RMS on
    Gaussian data); a later value beyond the margin saturates (finite, never NaN); decode over the fp8
    pages, on the fp32 pages' own top-n blocks, stays within 6% of the fp32 pages (4.0% here; fp8
    can also swap near-tied top-n picks on random data, which moves the output more)."""
    spec = NSASpec.from_dict(dict(heads=16, kv_heads=2, head_dim=64, v_head_dim=32, dtype="bfloat16",
                                  compression=dict(block=32, stride=16), selection=dict(block=64, top_n=8),
                                  window=dict(size=128)))
    g = torch.Generator().manual_seed(0)
    B, T = 2, 1500
    k, v = torch.randn(B, T, 2, 64, generator=g), torch.randn(B, T, 2, 32, generator=g)
    caches = {}
    for kvd in (None, torch.float8_e4m3fn):
        c = PagedNSAKVCache(spec, num_pages=64, page_size=64, max_seqs=2, max_seq_len=2048, device="cpu",
                            dtype=torch.float32, kv_dtype=kvd)
        sl = [c.add_sequence() for _ in range(B)]
        c.append(sl, k[:, :T - 3], v[:, :T - 3])
        for i in range(T - 3, T):
            c.append(sl, k[:, i:i + 1], v[:, i:i + 1])
        caches[kvd] = (c, sl)
    c8, sl = caches[torch.float8_e4m3fn]
    assert c8.kv_k.dtype == torch.float8_e4m3fn and c8.k_cmp.dtype == torch.float8_e4m3fn
    assert set(c8.scales) == {"k", "v", "k_cmp", "v_cmp"} and all(s.shape == (2,) for s in c8.scales.values())
    got = c8.sequence(sl[1])
    assert got["k"].dtype == torch.float32
    rel = ((got["k"] - k[1:]).norm() / k[1:].norm()).item()
    assert 0.005 < rel < 0.04, rel
    q = torch.randn(B, 1, 16, 64, generator=g)
    gates = [torch.rand(B, 1, 16, generator=g) for _ in range(3)]
    o32, sel = nsa_decode_reference(q, caches[None][0].batch(caches[None][1]), *gates, spec, return_selection=True)
    o8 = nsa_decode_reference(q, c8.batch(sl), *gates, spec, block_indices=torch.stack([x[0] for x in sel]))
    err = ((o8 - o32).norm() / o32.norm()).item()
    assert 0 < err < 0.06, err
    scale = c8.scales["k"].clone()
    c8.append(sl, 100 * k[:, :1], v[:, :1])           # far beyond the first writes' range
    assert torch.equal(c8.scales["k"], scale)
    last = c8.sequence(sl[0])["k"][0, -1]
    assert torch.isfinite(last).all() and last.abs().max() <= 448 * scale.max() + 1e-6
    with pytest.raises(ValueError, match="kv_dtype"):
        PagedNSAKVCache(spec, 4, device="cpu", kv_dtype=torch.int8)


def test_pools_keep_a_zero_page_and_reused_pages_come_back_zero():
    """Each pool has a page more than it hands out (its last, which stays zero: the decode kernels read
    it for table entries with no page), and a page handed out again is zeroed first, so rows past a
    sequence's length read zero, never an earlier sequence's values (NaN included)."""
    P = 16
    cache = PagedNSAKVCache(SPEC, num_pages=6, page_size=P, max_seqs=2, max_seq_len=96, device="cpu")
    assert cache.kv_k.shape[0] == 7 and cache.k_cmp.shape[0] == cache.num_cmp_pages + 1
    a = cache.add_sequence()
    nan_k, nan_v = torch.full((1, 90, 2, 32), float("nan")), torch.full((1, 90, 2, 16), float("nan"))
    cache.append([a], nan_k, nan_v)
    assert cache.free_pages == 0                       # all six pages handed out, the zero page not
    assert torch.isnan(cache.kv_k[:6]).any() and not cache.kv_k[6].any() and not cache.k_cmp[-1].any()
    cache.free_sequence(a)
    b = cache.add_sequence()
    seq = _stream(3, 1, 40)[0]
    _append(cache, [b], [seq], [0], 40, [37])
    _check_sequence(cache, b, seq, 37)
    pages = cache.block_table[b, :3].tolist()
    rows = cache.kv_k[pages].flatten(0, 1)[:, 0]      # the sequence's three pages, row by row
    assert not torch.isnan(cache.kv_k[pages]).any() and not rows[37:].any()
    cmp_rows = cache.k_cmp[cache.cmp_block_table[b, 0]]
    assert not torch.isnan(cmp_rows).any()
    assert not cache.kv_k[6].any() and not cache.k_cmp[-1].any()


def test_kernel_tables_gather_the_batch_s_lengths_and_block_tables():
    cache = PagedNSAKVCache(SPEC, num_pages=20, page_size=16, max_seqs=3, max_seq_len=160, device="cpu")
    slots = [cache.add_sequence() for _ in range(3)]
    seqs = _stream(4, 3, 100)
    _append(cache, slots, seqs, [0, 0, 0], 100, [100, 5, 37])
    batch = cache.batch([slots[2], slots[0]])
    t = batch.kernel_tables()
    assert t["cache_seqlens"].tolist() == [37, 100]
    assert t["seqlens_table"][:, 0].tolist() == [37, 100]
    assert torch.equal(t["seqlens_table"][:, 1:], cache.block_table[[slots[2], slots[0]]])
    assert torch.equal(t["seqlens_cmp_table"][:, 1:], cache.cmp_block_table[[slots[2], slots[0]]])
    assert t["seqlens_table"].dtype == torch.int32 and t["seqlens_table"].is_contiguous()
