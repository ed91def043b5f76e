"""Selection workloads: the block lists tuning and benchmarks time on (CPU)."""
import pytest
import torch

from nsa_codegen import workloads


@pytest.mark.parametrize("kind", workloads.KINDS)
def test_lists_are_what_top_n_would_give(kind):
    T, H, bs, n = 2000, 2, 32, 8
    idx = workloads.block_indices(kind, 2, T, H, bs, n, initial=1, local=2, coherence=16, device="cpu").long()
    assert idx.shape == (2, T, H, n) and idx.dtype == torch.int64
    t = torch.arange(T)[None, :, None, None]
    valid = idx >= 0
    assert (idx[valid] <= (t.expand_as(idx) // bs)[valid]).all(), "a block after its token"
    # ascending and distinct, -1 pads only at the end
    key = torch.where(valid, idx, 1 << 30)
    assert ((key[..., 1:] > key[..., :-1]) | ~valid[..., 1:]).all()
    # the forced blocks: the first block and the two latest visible ones
    jt = (t // bs).expand(2, T, H, 1)
    for forced in (torch.zeros_like(jt), jt, (jt - 1).clamp_min(0)):
        assert (idx == forced).any(-1).all()
    # full lists once n blocks are visible
    assert valid[:, n * bs:].all()


def test_drift_is_more_local_than_uniform():
    args = (1, 8192, 4, 64, 16)
    uni = workloads.block_indices("uniform", *args, device="cpu")
    drift = workloads.block_indices("drift", *args, coherence=64, device="cpu")
    assert workloads.union_size(uni, 1) == pytest.approx(workloads.union_size(drift, 1))
    assert workloads.union_size(drift, 4) < 0.6 * workloads.union_size(uni, 4)


def test_union_size_counts_distinct_blocks_per_tile():
    idx = torch.tensor([[0, 1, -1], [1, 2, -1], [5, -1, -1], [5, 6, 7]], dtype=torch.int32).view(1, 4, 1, 3)
    assert workloads.union_size(idx, 2) == pytest.approx((3 + 3) / 2)
    assert workloads.union_size(idx, 1) == pytest.approx((2 + 2 + 1 + 3) / 4)
    with pytest.raises(ValueError, match="tile"):
        workloads.union_size(idx, 8)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        workloads.block_indices("zipf", 1, 64, 1, 16, 4, device="cpu")
    with pytest.raises(ValueError, match="coherence"):
        workloads.block_indices("drift", 1, 64, 1, 16, 4, coherence=0, device="cpu")
