"""CPU: nsa_codegen.value_guard flags exactly the (token, KV head) pairs whose reference output a
non-finite value row reaches, per branch, for batches and packs; and the ops hand the kernels finite
values and NaN gates there (kernels replaced by recorders, as in test_ops_plan)."""
import pytest
import torch

from nsa_codegen import NSASpec, launch, ops, packing
from nsa_codegen import reference as ref
from nsa_codegen import value_guard as vg
from nsa_codegen.spec import CompressionBranch

H, G, D = 2, 2, 16


def _poisoned(T, seed, rows=((0, 7, 0), (0, 70, 1), (0, 131, 0)), inf_row=(0, 200, 1)):
    """q, k, v float64 [1, T, ...]; v rows NaN (and one Inf) at (b, t, h)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H * G, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, T, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, T, H, D, generator=g, dtype=torch.float64)
    for b, t, h in rows:
        if t < T:
            v[b, t, h, 3] = float("nan")
    if inf_row[1] < T:
        v[inf_row[0], inf_row[1], inf_row[2], 5] = float("inf")
    return q, k, v


def _rows(x):
    """[B, T, H, D] -> [B, T, H] bool: the rows split_finite flags (a NaN or Inf in them)."""
    return vg.split_finite(x)[1]


def _reached(o):
    """[B, T, HQ, Dv] -> [B, T, H] bool: a non-finite output in any head of the KV head's group."""
    B, T, HQ, _ = o.shape
    return (~torch.isfinite(o)).any(-1).view(B, T, H, HQ // H).any(-1)


def _lists(T, block, n, seed, seq_start=None, seq_len=None):
    """Random block lists [1, T, H, n] over each token's visible blocks, and the next one where its
    sequence has it (a future block), with some pads."""
    g = torch.Generator().manual_seed(seed)
    s0 = torch.zeros(T, dtype=torch.long) if seq_start is None else seq_start[0].long()
    L = torch.full((T,), T) if seq_len is None else seq_len
    p = torch.arange(T) - s0
    idx = torch.randint(0, 10 ** 6, (1, T, H, n), generator=g) % ((p // block + 2)[None, :, None, None])
    idx = torch.minimum(idx, ((L + block - 1) // block - 1)[None, :, None, None])
    idx[torch.rand(idx.shape, generator=g) < 0.1] = -1
    return idx.to(torch.int32)


@pytest.mark.parametrize("T", [1, 64, 300])
def test_window_flags_match_the_reference(T):
    q, k, v = _poisoned(T, seed=1)
    for w in (1, 16, 64, 512):
        o, _ = ref.window_attention(q, k, v, w)
        assert torch.equal(vg.sees_nonfinite_window(_rows(v), w), _reached(o)), w


@pytest.mark.parametrize("T", [1, 64, 300])
def test_selection_flags_match_the_reference(T):
    q, k, v = _poisoned(T, seed=2)
    for block in (16, 64):
        idx = _lists(T, block, 4, seed=3)
        o, _ = ref.selection_attention(q, k, v, idx, block)
        assert torch.equal(vg.sees_nonfinite_selection(_rows(v), idx, block), _reached(o)), block


@pytest.mark.parametrize("first_block", [0, 1])
@pytest.mark.parametrize("T", [20, 64, 300])
def test_compression_flags_match_the_reference(T, first_block):
    q, k, v = _poisoned(T, seed=4)
    l, d = 32, 16
    k_cmp, v_cmp = ref.compress(k, l, d, first_block), ref.compress(v, l, d, first_block)
    o, _ = ref.compression_attention(q, k_cmp, v_cmp, l, d, first_block)
    sees = vg.sees_nonfinite_compression(_rows(v_cmp), T, l, d, first_block)
    assert torch.equal(sees, _reached(o))


def test_pack_flags_match_the_reference_per_sequence():
    """A pack: each sequence's flags are those of the sequence alone (a bad row never reaches the
    next sequence), for every branch."""
    lengths = [5, 90, 1, 64, 140]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = _poisoned(T, seed=5, rows=((0, 3, 0), (0, 40, 1), (0, 100, 0), (0, 165, 0)), inf_row=(0, 250, 1))
    c = CompressionBranch(32, 16, "mean", first_block=0)
    maps = packing.packed_maps(cu, T, c)
    ss, cs = maps["seq_start"], maps["cmp_start"]
    seq = packing.sequence_of_token(cu, T)
    idx = _lists(T, 16, 3, seed=6, seq_start=ss, seq_len=(cu[1:] - cu[:-1]).long()[seq])
    rows = _rows(v)
    got = {"win": vg.sees_nonfinite_window(rows, 32, ss), "slc": vg.sees_nonfinite_selection(rows, idx, 16, ss)}
    v_cmp = torch.cat([ref.compress(v[:, a:b], c.block, c.stride) for a, b in zip(cu[:-1], cu[1:])], dim=1)
    got["cmp"] = vg.sees_nonfinite_compression(_rows(v_cmp), T, c.block, c.stride, 0, ss, cs)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = q[:, a:b], k[:, a:b], v[:, a:b]
        want = {"win": _reached(ref.window_attention(qs, ks, vs, 32)[0]),
                "slc": _reached(ref.selection_attention(qs, ks, vs, idx[:, a:b], 16)[0]),
                "cmp": _reached(ref.compression_attention(qs, ref.compress(ks, 32, 16), ref.compress(vs, 32, 16),
                                                          32, 16)[0])}
        for branch in want:
            assert torch.equal(got[branch][:, a:b], want[branch]), (branch, a, b)


def test_gates_take_nan_at_flagged_groups_only():
    g = torch.rand(1, 3, H * G)
    sees = torch.tensor([[[True, False], [False, False], [False, True]]])
    out = vg.poison_gates(g, sees)
    assert torch.isnan(out[0, 0, :G]).all() and torch.equal(out[0, 0, G:], g[0, 0, G:])
    assert torch.equal(out[0, 1], g[0, 1]) and torch.isnan(out[0, 2, G:]).all()
    w = torch.tensor([1.0, float("nan"), float("-inf"), 2.0, 3.0, 4.0]).view(1, 1, 3, 2).requires_grad_()
    both = vg.split_finite(w)
    assert torch.equal(both[0].flatten(), torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 4.0]))
    assert both[1].tolist() == [[[True, True, False]]]
    both[0].sum().backward()   # straight through: nothing saved
    assert torch.equal(w.grad, torch.ones_like(w))


class _Recorder:
    """A kernel stand-in that keeps its inputs and writes 0.5 / int 0 (block 0) outputs."""

    def __init__(self, key, seen):
        from nsa_codegen.schedules import default_schedule
        self.key, self.seen = key.with_schedule(default_schedule(key)), seen

    def __call__(self, *tensors):
        from nsa_codegen.kinds import KINDS
        n_in = len(KINDS[self.key.kind].inputs)
        self.seen[self.key.kind] = [t.clone() for t in tensors[:n_in]]
        for t in tensors[n_in:]:
            t.fill_(0.5 if t.dtype.is_floating_point else 0)


def test_ops_pass_finite_values_and_nan_gates(monkeypatch):
    """nsa_attention (kernels replaced by recorders; top-n picks block 0 for every token): the value
    tensors the kernels get are finite, and the gates the combine gets are NaN exactly at the
    (token, group) pairs that see the NaN value row (token 5, KV head 0) in each branch."""
    seen = {}
    monkeypatch.setattr(launch, "is_gpu", lambda t: True)
    monkeypatch.setattr(launch, "arch_of", lambda t: "sm90")
    monkeypatch.setattr(ops, "arch_of", lambda t: "sm90")
    monkeypatch.setattr(launch, "get_kernel", lambda key: _Recorder(key, seen))
    spec = NSASpec(heads=4, kv_heads=2, head_dim=64, v_head_dim=64, dtype="float16",
                   compression=dict(block=32, stride=16, pool="mean"), selection=dict(block=64, top_n=4, initial=1, local=1),
                   window=dict(size=64))
    T, dt = 300, torch.float16
    q = torch.randn(1, T, 4, 64, dtype=dt)
    k = torch.randn(1, T, 2, 64, dtype=dt)
    v = torch.randn(1, T, 2, 64, dtype=dt)
    v[0, 5, 0, 7] = float("nan")
    gates = [torch.rand(1, T, 4, dtype=dt) for _ in range(3)]
    ops.nsa_attention(q, k, v, *gates, spec)
    for kind, arg in (("selection_fwd", 2), ("window_fwd", 2), ("compression_fwd", 2)):
        assert torch.isfinite(seen[kind][arg]).all(), kind
    o_cmp, g_cmp, o_slc, g_slc, o_win, g_win = seen["gate_combine"][:6]
    t = torch.arange(T)
    want = {"slc": (g_slc, t >= 5),                    # block 0 holds token 5: seen from t = 5 on
            "win": (g_win, (t >= 5) & (t < 5 + 64)),   # keys (t - 64, t]
            "cmp": (g_cmp, t >= 31)}                   # compressed row 0 (tokens 0..31), complete at t = 31
    for branch, (g, rows) in want.items():
        nan = torch.isnan(g[0])                        # [T, HQ]
        assert torch.equal(nan[:, :2], rows[:, None].expand(T, 2)), branch
        assert not nan[:, 2:].any(), branch            # KV head 1's group never sees it
