"""NSAKVCache: in-place appends with ragged lengths, and the incrementally maintained compressed
cache equal to phi recomputed from scratch (CPU); `nsa_decode`'s kernels after a prefill and decode
steps equal the reference over each whole sequence (GPU, DECODE_CASES)."""
import pytest
import torch

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen import reference as ref
from nsa_codegen.kv_cache import NSAKVCache, compressor_phi
from nsa_codegen.layer import MLPCompressor

SPEC = NSASpec(heads=8, kv_heads=2, head_dim=64, v_head_dim=64, dtype="bfloat16",
               compression=CompressionBranch(32, 16, "mean", 1), selection=SelectionBranch(32, 8, 1, 2),
               window=WindowBranch(64))


def _grow(cache, k, v, lens0, steps):
    """Prefill lens0 tokens per entry, then append `steps` chunks of 1..3 tokens with ragged counts."""
    B = k.shape[0]
    g = torch.Generator().manual_seed(1)
    cache.prefill(k[:, :max(lens0)], v[:, :max(lens0)], seqlens=torch.tensor(lens0, dtype=torch.int32))
    lens = list(lens0)
    for _ in range(steps):
        s = int(torch.randint(1, 4, (1,), generator=g))
        take = [int(x) for x in torch.randint(0, s + 1, (B,), generator=g)]
        kn = torch.stack([k[b, lens[b]:lens[b] + s] for b in range(B)])
        vn = torch.stack([v[b, lens[b]:lens[b] + s] for b in range(B)])
        cache.append(kn, vn, seqlens_new=torch.tensor(take, dtype=torch.int32))
        lens = [a + t for a, t in zip(lens, take)]
    return lens


def test_appends_and_compressed_cache_match_from_scratch():
    B, T = 3, 400
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, T, 2, 64, generator=g).bfloat16()
    v = torch.randn(B, T, 2, 64, generator=g).bfloat16()
    cache = NSAKVCache(SPEC, B, 512, device="cpu")
    lens = _grow(cache, k, v, [5, 47, 130], steps=60)
    assert cache.lengths == lens and cache.cache_seqlens.tolist() == lens
    c = SPEC.compression
    for b, L in enumerate(lens):
        assert torch.equal(cache.k[b, :L], k[b, :L]) and torch.equal(cache.v[b, :L], v[b, :L])
        rk = ref.compress(k[b:b + 1, :L], c.block, c.stride, c.first_block)[0]
        rv = ref.compress(v[b:b + 1, :L], c.block, c.stride, c.first_block)[0]
        N = rk.shape[0]
        assert cache.num_cmp_host[b] == N == int(cache.num_cmp[b])
        torch.testing.assert_close(cache.k_cmp[b, :N], rk, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(cache.v_cmp[b, :N], rv, rtol=1e-2, atol=1e-2)


def test_mlp_phi_runs_on_new_blocks_only_and_matches_the_layer():
    torch.manual_seed(2)
    c = SPEC.compression
    phi_k = MLPCompressor(64, c.block, c.stride, c.first_block).bfloat16()
    phi_v = MLPCompressor(64, c.block, c.stride, c.first_block).bfloat16()
    B, T = 2, 300
    k = torch.randn(B, T, 2, 64).bfloat16()
    v = torch.randn(B, T, 2, 64).bfloat16()
    cache = NSAKVCache(SPEC, B, 320, device="cpu", phi_k=compressor_phi(phi_k), phi_v=compressor_phi(phi_v))
    lens = _grow(cache, k, v, [40, 200], steps=40)
    with torch.no_grad():
        for b, L in enumerate(lens):
            rk = phi_k(k[b:b + 1, :L])[0]
            rv = phi_v(v[b:b + 1, :L])[0]
            N = rk.shape[0]
            torch.testing.assert_close(cache.k_cmp[b, :N], rk, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(cache.v_cmp[b, :N], rv, rtol=2e-2, atol=2e-2)


def test_decode_reference_on_given_blocks_and_its_selection():
    from nsa_codegen.kv_cache import nsa_decode_reference
    torch.manual_seed(3)
    B, L, ql = 2, 300, 2
    bf = torch.bfloat16
    cache = NSAKVCache(SPEC, B, L + 4, device="cpu", dtype=bf)
    H, Dk = SPEC.kv_heads, SPEC.head_dim
    cache.prefill(torch.randn(B, L, H, Dk).to(bf), torch.randn(B, L, H, SPEC.v_head_dim).to(bf), seqlens=[L, L - 57])
    q = torch.randn(B, ql, SPEC.heads, Dk).to(bf)
    gates = [torch.rand(B, ql, SPEC.heads).to(bf) for _ in range(3)]
    o, sels = nsa_decode_reference(q, cache, *gates, return_selection=True)
    own = torch.stack([idx for idx, _ in sels])                     # [B, ql, H, n]
    assert torch.equal(nsa_decode_reference(q, cache, *gates, block_indices=own), o)
    for idx, keys in sels:  # the reference's own choice is the top-n of its keys
        assert ref.compare_block_indices(idx, idx, keys)[0]
        assert keys.shape[:2] == (ql, H)
    other = own.clone()
    other[0, 0, 0, -1] = -1   # drop one block: a different output
    assert not torch.equal(nsa_decode_reference(q, cache, *gates, block_indices=other), o)


def test_clear_errors():
    cache = NSAKVCache(SPEC, 2, 16, device="cpu")
    k = torch.randn(2, 10, 2, 64).bfloat16()
    cache.prefill(k, k)
    with pytest.raises(ValueError, match="capacity"):
        cache.append(k, k)
    with pytest.raises(ValueError, match="k_new must have shape"):
        cache.append(k[:, :, :1], k)
    with pytest.raises(ValueError, match="batch_size"):
        NSAKVCache(SPEC, 0, 16, device="cpu")
    with pytest.raises(TypeError, match="capacity must be an int"):
        NSAKVCache(SPEC, 2, 16.5, device="cpu")
    from nsa_codegen.decode import nsa_decode
    from nsa_codegen.kv_cache import nsa_decode_reference
    q = torch.randn(2, 1, SPEC.heads, SPEC.head_dim).bfloat16()
    g = torch.rand(2, 1, SPEC.heads).bfloat16()
    with pytest.raises(ValueError, match=rf"q must be \[B, ql, {SPEC.heads}, {SPEC.head_dim}\], got \[2, 1, 1,"):
        nsa_decode_reference(q[:, :, :1], cache, g, g, g)
    with pytest.raises(ValueError, match="g_slc must be a floating tensor of shape"):
        nsa_decode_reference(q, cache, g, g.int(), g)
    with pytest.raises(ValueError, match="q must be torch.bfloat16"):
        nsa_decode_reference(q.float(), cache, g, g, g)
    with pytest.raises(ValueError, match="q_len must be in 1..8"):
        nsa_decode(torch.randn(2, 9, SPEC.heads, SPEC.head_dim).bfloat16(), cache, *[torch.rand(2, 9, SPEC.heads)] * 3)
    f32 = NSAKVCache(SPEC, 2, 16, device="cpu", dtype=torch.float32)   # the reference decode's
    f32.prefill(k.float(), k.float())
    assert nsa_decode_reference(q.float(), f32, g.float(), g.float(), g.float()).shape == (2, 1, SPEC.heads, SPEC.v_head_dim)
    with pytest.raises(ValueError, match="float16 / bfloat16 cache"):
        nsa_decode(q.float(), f32, g.float(), g.float(), g.float())
