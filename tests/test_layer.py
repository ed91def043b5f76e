import pytest
import torch

from nsa_codegen import CompressionBranch, NativeSparseAttention, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen import reference as ref
from nsa_codegen.layer import MLPCompressor

SPEC = NSASpec(heads=4, kv_heads=2, head_dim=64, v_head_dim=64, dtype="float16",
               compression=CompressionBranch(32, 16, "mlp"), selection=SelectionBranch(32, 4, 1, 2),
               window=WindowBranch(64))


def test_layer_forward_backward_on_cpu():
    torch.manual_seed(0)
    layer = NativeSparseAttention(48, SPEC)
    x = torch.randn(2, 150, 48, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # phi (MLP + position encoding) and the gate MLP are trained through the compression branch.
    assert layer.k_phi.pos.grad.abs().sum() > 0 and layer.gate.weight.grad.abs().sum() > 0


def test_layer_matches_reference_call():
    torch.manual_seed(1)
    layer = NativeSparseAttention(32, SPEC).double()
    x = torch.randn(1, 100, 32, dtype=torch.float64)
    B, T = 1, 100
    q = layer.q_proj(x).view(B, T, 4, 64)
    g = torch.sigmoid(layer.gate(x)).view(B, T, 3, 4)
    kc, vc = layer._kv(x, "cmp")
    ks, vs = layer._kv(x, "slc")
    kw, vw = layer._kv(x, "win")
    o = ref.nsa_reference(q, ks, vs, g[:, :, 0], g[:, :, 1], g[:, :, 2], SPEC, k_cmp=layer.k_phi(kc),
                          v_cmp=layer.v_phi(vc), k_win=kw, v_win=vw)
    torch.testing.assert_close(layer(x), layer.o_proj(o.reshape(B, T, -1)))


def test_block_indices_are_the_lists_the_forward_selects():
    torch.manual_seed(4)
    layer = NativeSparseAttention(32, SPEC).double()
    x = torch.randn(2, 200, 32, dtype=torch.float64)
    B, T = x.shape[:2]
    idx = layer.block_indices(x)
    assert idx.shape == (B, T, 2, 4) and idx.dtype == torch.int32
    q = layer.q_proj(x).view(B, T, 4, 64)
    g = torch.sigmoid(layer.gate(x)).view(B, T, 3, 4)
    (kc, vc), (ks, vs), (kw, vw) = layer._kv(x, "cmp"), layer._kv(x, "slc"), layer._kv(x, "win")
    _, want = ref.nsa_reference(q, ks, vs, g[:, :, 0], g[:, :, 1], g[:, :, 2], SPEC, k_cmp=layer.k_phi(kc),
                                v_cmp=layer.v_phi(vc), k_win=kw, v_win=vw, return_indices=True)
    assert torch.equal(idx, want)
    # the forced blocks are there: block 0 and each token's own block
    own = (torch.arange(T) // 32).view(1, T, 1, 1)
    assert (idx == 0).any(-1).all() and (idx == own).any(-1).all()
    no_slc = NativeSparseAttention(32, NSASpec(heads=4, kv_heads=2, head_dim=64, compression=None,
                                               selection=None, window=WindowBranch(64)))
    with pytest.raises(ValueError, match="compression and selection"):
        no_slc.block_indices(x.float())


def test_mean_pool_layer_uses_compress():
    spec = NSASpec(heads=4, kv_heads=4, head_dim=64, compression=CompressionBranch(16, 16, "mean"),
                   selection=None, window=None)
    layer = NativeSparseAttention(16, spec)
    x = torch.randn(1, 40, 16)
    k = torch.randn(1, 40, 4, 64)
    torch.testing.assert_close(layer.k_phi(k), ref.compress(k, 16, 16))
    assert layer(x).shape == x.shape


def test_mlp_compressor_shapes_and_first_block():
    phi = MLPCompressor(8, block=4, stride=2, first_block=1)
    x = torch.randn(2, 16, 3, 8)
    assert phi(x).shape == (2, 6, 3, 8)
    assert phi(x[:, :3]).shape == (2, 0, 3, 8)


def test_layer_cu_seqlens_equals_separate_sequences():
    torch.manual_seed(2)
    layer = NativeSparseAttention(32, SPEC).double()
    a, b = torch.randn(1, 70, 32, dtype=torch.float64), torch.randn(1, 45, 32, dtype=torch.float64)
    packed = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 70, 115]))
    torch.testing.assert_close(packed, torch.cat([layer(a), layer(b)], 1))


def test_layer_rejects_bad_input():
    layer = NativeSparseAttention(32, SPEC)
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden\]"):
        layer(torch.randn(10, 32))
    with pytest.raises(ValueError, match=r"hidden = 32, got shape \[1, 10, 16\]"):
        layer(torch.randn(1, 10, 16))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(1, 10, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="NSASpec"):
        NativeSparseAttention(32, {"heads": 4})
    # T = 0 is defined: an empty output
    assert layer(torch.randn(2, 0, 32)).shape == (2, 0, 32)


def _decode_on_own_selection(layer, x_new, cache):
    """The layer's decode output for x_new (already appended to `cache`) recomputed by the reference
    on the kernel's own top-n blocks, after checking that those differ from the reference's selection
    only by near ties (reference.compare_block_indices); fails on any other difference.  Decode ranks
    blocks from fp16 block sums, the forward from its own scores: where two blocks' scores tie to
    rounding, either may pick another one (decode or the forward), and the outputs then differ by a
    whole block's share."""
    from nsa_codegen.decode import nsa_decode
    from nsa_codegen.kv_cache import nsa_decode_reference
    q, gates, _ = layer._project(x_new)
    q, gates = q.to(cache.dtype), [g.to(cache.dtype) for g in gates]
    _, idx = nsa_decode(q, cache, *gates, return_indices=True)
    _, sels = nsa_decode_reference(q, cache, *gates, return_selection=True)
    for b, (chosen, keys) in enumerate(sels):
        ok, _, msg = ref.compare_block_indices(idx[b], chosen, keys)
        assert ok, f"entry {b}: {msg}"
    o = nsa_decode_reference(q, cache, *gates, block_indices=idx)
    B, s = x_new.shape[:2]
    return layer.o_proj(o.to(x_new.dtype).reshape(B, s, -1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("pool", ["mlp", "mean"])
def test_prefill_then_decode_equals_the_full_forward(pool, device):
    """Prefill a cache, then decode 1 and 2 tokens at a time: each step's output equals the full
    forward's at those positions (CPU: the reference path; CUDA: the forward and nsa_decode kernels;
    a step whose output differs from the forward's must equal the reference's on the decode
    kernel's own blocks, which may differ from the reference's selection by near ties only)."""
    spec = NSASpec(heads=4, kv_heads=2, head_dim=64, v_head_dim=64, dtype="bfloat16",
                   compression=CompressionBranch(32, 16, pool), selection=SelectionBranch(32, 4, 1, 1),
                   window=WindowBranch(64))
    if device == "cuda":  # the forward and the 1- and 2-token decode kernels, compiled in parallel
        from nsa_codegen.cache import precompile
        from nsa_codegen.lowering import arch_of_capability, lower_decode, lower_to_plan
        arch = arch_of_capability(*torch.cuda.get_device_capability())
        keys = [c.key for c in lower_to_plan(spec, arch).calls + lower_decode(spec, arch, q_len=1)
                + lower_decode(spec, arch, q_len=2)]
        assert not [e for _, e, _ in precompile(keys) if e]
    torch.manual_seed(3)
    layer = NativeSparseAttention(48, spec).bfloat16().to(device)
    B, T0, T = 2, 150, 190
    x = torch.randn(B, T, 48).bfloat16().to(device)
    with torch.no_grad():
        full = layer(x)
    cache = layer.new_cache(B, 256, device=device)
    y0 = layer.prefill(x[:, :T0], cache)
    torch.testing.assert_close(y0.float(), full[:, :T0].float(), rtol=2e-2, atol=2e-2)
    t = T0
    while t < T:
        s = 1 if t % 3 else 2
        y = layer.decode(x[:, t:t + s], cache)
        want = full[:, t:t + s].float()
        if device == "cuda" and not torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2):
            want = _decode_on_own_selection(layer, x[:, t:t + s], cache).float()
        torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
        t += s
    assert cache.lengths == [T, T]


def test_prefill_and_decode_of_a_spec_beyond_the_kernels_on_cpu():
    """The reference decode runs a valid spec the kernels do not cover (fp32, G = 3, head dim 80,
    compression block 24 / stride 8): prefill plus decode steps equal the full forward."""
    spec = NSASpec(heads=6, kv_heads=2, head_dim=80, v_head_dim=48, dtype="float32",
                   compression=CompressionBranch(24, 8, "mlp"), selection=SelectionBranch(40, 5, 1, 1),
                   window=WindowBranch(20))
    torch.manual_seed(4)
    layer = NativeSparseAttention(32, spec)
    x = torch.randn(2, 130, 32)
    with torch.no_grad():
        full = layer(x)
    cache = layer.new_cache(2, 160)
    assert cache.dtype == torch.float32 and cache.k.device.type == "cpu"
    torch.testing.assert_close(layer.prefill(x[:, :120], cache), full[:, :120], rtol=1e-4, atol=1e-4)
    for t in range(120, 130, 2):
        torch.testing.assert_close(layer.decode(x[:, t:t + 2], cache), full[:, t:t + 2], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_layer_beyond_the_kernels_on_cuda_warns_once_or_raises():
    """backend='auto' on CUDA runs a spec the kernels do not cover through the reference, after one
    warning naming why; backend='kernels' refuses it."""
    import warnings
    from nsa_codegen import KernelSupportError
    spec = NSASpec(heads=4, kv_heads=2, head_dim=96, dtype="float16",
                   compression=dict(block=16, stride=16, pool="mean"), selection=dict(block=32, top_n=4),
                   window=dict(size=64))
    layer = NativeSparseAttention(32, spec).cuda()
    x = torch.randn(1, 100, 32, device="cuda")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y1, y2 = layer(x), layer(x)
    msgs = [str(w.message) for w in seen if "do not cover" in str(w.message)]
    assert len(msgs) == 1 and "head_dim: 96" in msgs[0]
    torch.testing.assert_close(y1, y2)
    strict = NativeSparseAttention(32, spec, backend="kernels").cuda()
    with pytest.raises(KernelSupportError, match="head_dim"):
        strict(x)


@pytest.mark.parametrize("phi", ["mean", "mlp"])
def test_compressors_pool_a_pack_in_one_call(phi):
    """forward_packed (one gather for every sequence, no per-sequence loop) equals each sequence's
    own forward, rows packed in order; sequences shorter than a block (and empty ones) add no row."""
    from nsa_codegen.layer import MLPCompressor, MeanCompressor
    torch.manual_seed(4)
    m = MLPCompressor(8, 16, 8, 1).double() if phi == "mlp" else MeanCompressor(16, 8, 1)
    lengths = [40, 3, 0, 100, 16, 25]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.randn(1, int(cu[-1]), 2, 8, dtype=torch.float64)
    want = torch.cat([m(x[:, a:b]) for a, b in zip(cu.tolist(), cu.tolist()[1:])], 1)
    torch.testing.assert_close(m.forward_packed(x, cu, want.shape[1]), want)
