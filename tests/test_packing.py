"""CPU: the pack's token maps and packed pooling against the per-sequence definitions."""
import pytest
import torch

from nsa_codegen import packing, reference as ref


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


LENGTHS = [[7], [1, 1, 1], [33, 0, 64, 5, 200], [0, 48, 0]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("block,stride,first", [(32, 16, 0), (32, 16, 1), (16, 16, 0), (64, 32, 2)])
def test_maps_match_each_sequence(lengths, block, stride, first):
    cu = _cu(lengths)
    T = int(cu[-1])
    rows = [ref.num_compressed_blocks(n, block, stride, first) for n in lengths]
    cmp_cu = packing.compressed_offsets(cu, block, stride, first)
    assert cmp_cu.tolist() == [0, *torch.tensor(rows).cumsum(0).tolist()]
    c = type("C", (), dict(block=block, stride=stride, first_block=first))
    maps = packing.packed_maps(cu, T, c)
    t = 0
    for i, n in enumerate(lengths):
        assert maps["seq_start"][0, t:t + n].tolist() == [int(cu[i])] * n
        assert maps["cmp_start"][0, t:t + n].tolist() == [int(cmp_cu[i])] * n
        t += n
    assert maps["seq_start"].dtype == torch.int32 and maps["seq_start"].shape == (1, T)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_compress_packed_is_each_sequence_pooled(lengths):
    cu = _cu(lengths)
    x = torch.randn(1, int(cu[-1]), 2, 8)
    want = torch.cat([ref.compress(x[:, a:b], 16, 8, 1) for a, b in zip(cu.tolist(), cu.tolist()[1:])], 1)
    got = packing.compress_packed(x, cu, 16, 8, 1, want.shape[1])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_bad_cu_seqlens_are_named():
    with pytest.raises(ValueError, match="rise from 0 to total tokens 10"):
        packing.check_cu_seqlens(torch.tensor([0, 6, 4, 10]), 10)
    with pytest.raises(ValueError, match="rise from 0 to total tokens 10"):
        packing.check_cu_seqlens(torch.tensor([0, 6, 9]), 10)
    with pytest.raises(ValueError, match="1-D int32 / int64"):
        packing.check_cu_seqlens(torch.tensor([0.0, 10.0]), 10)


@pytest.mark.parametrize("lengths", LENGTHS + [[10, 3, 8]], ids=str)
@pytest.mark.parametrize("tile", [1, 4, 8])
def test_tile_starts_cover_each_sequence_without_straddling(lengths, tile):
    cu = _cu(lengths)
    T = int(cu[-1])
    got = packing.tile_starts(T, tile, cu).tolist()
    want = [a + j for a, b in zip(cu.tolist(), cu.tolist()[1:]) for j in range(0, b - a, tile)]
    assert [x for x in got if x >= 0] == want
    assert all(x == -1 for x in got[len(want):]) and len(got) == -(-T // tile) + len(lengths)
    assert packing.tile_starts(T, tile).tolist() == list(range(0, T, tile))


@pytest.mark.parametrize("lengths", LENGTHS + [[40, 0, 100, 3, 64]], ids=str)
def test_compressed_row_spans_are_each_rows_visible_tokens(lengths):
    cu = _cu(lengths)
    T, (l, d, f) = int(cu[-1]), (16, 8, 1)
    maps = packing.packed_maps(cu, T, type("C", (), dict(block=l, stride=d, first_block=f)))
    N = int(packing.compressed_offsets(cu, l, d, f)[-1])
    first, end = packing.compressed_row_spans(T, N, l, d, f, maps["seq_start"], maps["cmp_start"])
    want = [(a + (f + c) * d + l - 1, b) for a, b in zip(cu.tolist(), cu.tolist()[1:])
            for c in range(ref.num_compressed_blocks(b - a, l, d, f))]
    assert list(zip(first.tolist(), end.tolist())) == want
    first, end = packing.compressed_row_spans(100, 5, l, d, f)       # a batch: one sequence per row
    assert first.tolist() == [(f + c) * d + l - 1 for c in range(5)] and end.tolist() == [100] * 5


def test_pack_checks_once_and_counts_like_the_offsets():
    from nsa_codegen.packing import Pack, compressed_offsets, packed_maps
    from nsa_codegen.spec import CompressionBranch
    c = CompressionBranch(32, 16, "mean", 1)
    lengths = [0, 5, 300, 1, 64, 130, 32]
    a = Pack.from_lengths(lengths)
    b = Pack(a.cu_seqlens.long(), a.total)
    assert a.total == b.total == sum(lengths)
    assert a.rows(c) == b.rows(c) == int(compressed_offsets(a.cu_seqlens, 32, 16, 1)[-1])
    want = packed_maps(a.cu_seqlens, a.total, c)
    for key in want:
        assert torch.equal(a.maps(c)[key], want[key]) and a.maps(c)[key] is a.maps(c)[key]
    with pytest.raises(ValueError, match="rise from 0"):
        Pack(torch.tensor([0, 5, 3]), 3)
    with pytest.raises(ValueError, match="lengths"):
        Pack.from_lengths([3, -1])


def test_reference_takes_a_pack_without_checking_it_again(monkeypatch):
    """The reference over a Pack made from host lengths equals it over the tensor and reads no
    device value (the pack was checked when it was made); a pack of another length is refused."""
    from nsa_codegen import NSASpec
    from nsa_codegen.packing import Pack
    from nsa_codegen.spec import CompressionBranch, SelectionBranch, WindowBranch
    spec = NSASpec(heads=4, kv_heads=2, head_dim=16, v_head_dim=16, dtype="float32",
                   compression=CompressionBranch(16, 8, "mean"), selection=SelectionBranch(16, 4, 1, 1),
                   window=WindowBranch(32))
    lengths = [50, 0, 100, 7]
    g = torch.Generator().manual_seed(3)
    T = sum(lengths)
    q, k, v = (torch.randn(1, T, h, 16, generator=g) for h in (4, 2, 2))
    gates = [torch.rand(1, T, 4, generator=g) for _ in range(3)]
    want = ref.nsa_reference(q, k, v, *gates, spec, cu_seqlens=_cu(lengths))
    pack = Pack.from_lengths(lengths)

    def no_sync(*a, **k):
        raise AssertionError("the reference checked a Pack again")

    monkeypatch.setattr(packing, "check_cu_seqlens", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    assert torch.equal(ref.nsa_reference(q, k, v, *gates, spec, cu_seqlens=pack), want)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="pack holds"):
        ref.nsa_reference(q[:, :-1], k[:, :-1], v[:, :-1], *[x[:, :-1] for x in gates], spec, cu_seqlens=pack)


@pytest.mark.parametrize("lengths", LENGTHS + [[40, 0, 100, 3, 64], [15, 17, 31, 33]], ids=str)
@pytest.mark.parametrize("block,stride,first", [(32, 16, 0), (16, 8, 1), (16, 16, 0), (64, 32, 2)])
def test_rows_bound_pads_rows_no_token_sees(lengths, block, stride, first):
    """torch.compile's row count (rows_bound, from the token count alone) covers the pack's rows; the
    rows past them pool to zero and their visible span is empty, so nothing reads them."""
    cu = _cu(lengths)
    T = int(cu[-1])
    c = type("C", (), dict(block=block, stride=stride, first_block=first))
    N = int(packing.compressed_offsets(cu, block, stride, first)[-1])
    bound = packing.rows_bound(T, c)
    assert bound >= N
    x = torch.randn(1, T, 2, 8)
    x[0, -1] = float("nan")   # a NaN in the last token must not reach a padding row
    got = packing.compress_packed(x, cu, block, stride, first, bound)
    assert got.shape[1] == bound
    torch.testing.assert_close(got[:, :N], packing.compress_packed(x, cu, block, stride, first, N), equal_nan=True)
    assert torch.equal(got[:, N:], torch.zeros_like(got[:, N:]))
    maps = packing.packed_maps(cu, T, c)
    row_first, row_end = packing.compressed_row_spans(T, bound, block, stride, first, maps["seq_start"],
                                                      maps["cmp_start"])
    assert (row_first[N:] >= row_end[N:]).all()


def test_a_pack_traces_whole_under_torch_compile():
    """Pack, its maps, rows, tile table and pooling trace as one graph (fullgraph: no host sync), and a
    second pack of as many tokens and sequences runs without recompiling."""
    from nsa_codegen.spec import CompressionBranch
    c = CompressionBranch(32, 16, "mean", 1)

    def pooled(x, cu):
        pack = packing.Pack(cu, x.shape[1])
        rows = pack.rows(c)
        maps = pack.maps(c)
        k_cmp = packing.compress_packed(x, pack.cu_seqlens, c.block, c.stride, c.first_block, rows)
        first, end = packing.compressed_row_spans(x.shape[1], rows, c.block, c.stride, c.first_block,
                                                  maps["seq_start"], maps["cmp_start"])
        return k_cmp, first, end, packing.tile_starts(x.shape[1], 4, pack.cu_seqlens)

    torch._dynamo.reset()
    fn = torch.compile(pooled, fullgraph=True, backend="eager", dynamic=False)
    x = torch.randn(1, 300, 2, 8)
    for lengths in ([100, 150, 50], [3, 290, 7]):
        cu = _cu(lengths)
        k_cmp, first, end, tiles = fn(x, cu)
        N = int(packing.compressed_offsets(cu, 32, 16, 1)[-1])
        torch.testing.assert_close(k_cmp[:, :N], packing.compress_packed(x, cu, 32, 16, 1, N))
        assert (first[N:] >= end[N:]).all() and torch.equal(tiles, packing.tile_starts(300, 4, cu))
        if lengths == [3, 290, 7]:
            break
        torch.compiler.set_stance("fail_on_recompile")
    torch.compiler.set_stance("default")
