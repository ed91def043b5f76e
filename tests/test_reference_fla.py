"""Parity of the reference with FLA's naive NSA selection (fla-core, pinned in the test extra), on
the CPU: the same block lists give the same outputs, wherever FLA's reference is defined (G >= 16
by FLA's rule, every token with at least one visible key).

FLA's end-to-end naive_nsa pools with a Triton kernel and attends its window with flash-attn, so it
does not run on a CPU; the compression branch is checked against the paper's equations in
tests/test_reference.py instead."""
import warnings

import pytest
import torch

from nsa_codegen import reference as ref
from nsa_codegen import workloads

with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # FLA warns that flash-attn is missing (not used here)
    naive = pytest.importorskip("fla.ops.nsa.naive")


@pytest.mark.parametrize("kind", ["uniform", "drift"])
@pytest.mark.parametrize("B,T,HQ,H,Dk,Dv,bs,n", [(1, 200, 16, 1, 32, 32, 16, 4), (2, 150, 32, 2, 24, 40, 32, 3)])
def test_selection_matches_fla_naive(kind, B, T, HQ, H, Dk, Dv, bs, n):
    g = torch.Generator().manual_seed(T + n)
    q = torch.randn(B, T, HQ, Dk, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    idx = workloads.block_indices(kind, B, T, H, bs, n, initial=1, local=1, coherence=8, seed=T, device="cpu")
    ours, _ = ref.selection_attention(q, k, v, idx, bs)
    theirs = naive.naive_nsa_selection(q, k, v, idx.long(), block_size=bs)   # computes in float32
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-5)
    # and with the pads first and the slots shuffled: neither reference may depend on the order
    perm = torch.argsort(torch.rand(idx.shape, generator=g), -1)
    shuffled = torch.gather(idx, -1, perm)
    torch.testing.assert_close(ref.selection_attention(q, k, v, shuffled, bs)[0], ours, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(naive.naive_nsa_selection(q, k, v, shuffled.long(), block_size=bs).to(ours.dtype),
                               theirs.to(ours.dtype), rtol=1e-5, atol=1e-5)
