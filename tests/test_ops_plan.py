"""CPU: the ops launch exactly the kernels lowering plans, under the plan's keys, with the registry's
launch signature: nsa_attention (forward and autograd backward) runs on CPU tensors with every kernel
replaced by a recorder, for each spec of the default build set."""
import pytest
import torch

from nsa_codegen import NSASpec, launch, ops
from nsa_codegen.build import default_build_set
from nsa_codegen.kinds import KINDS
from nsa_codegen.lowering import lower_to_plan
from nsa_codegen.schedules import default_schedule


class _Recorder:
    """Stands in for a compiled kernel (of the default schedule, as a resolved one has): records the
    launch, checks its arity against the registry and writes plausible outputs (floats 0.5, int32 0:
    block 0, which every query may select)."""

    def __init__(self, key, launched):
        self.key, self.launched = key.with_schedule(default_schedule(key)), launched

    def __call__(self, *tensors):
        entry = KINDS[self.key.kind]
        assert len(tensors) == len(entry.args), (self.key, len(tensors), entry.args)
        assert all(isinstance(t, torch.Tensor) for t in tensors), self.key
        for t in tensors[len(entry.inputs):]:
            t.fill_(0.5 if t.dtype.is_floating_point else 0)
        self.launched.append(self.key.problem)


@pytest.fixture
def launched(monkeypatch):
    out = []
    monkeypatch.setattr(launch, "is_gpu", lambda t: True)
    monkeypatch.setattr(launch, "arch_of", lambda t: "sm90")
    monkeypatch.setattr(ops, "arch_of", lambda t: "sm90")
    monkeypatch.setattr(launch, "get_kernel", lambda key: _Recorder(key, out))
    return out


SPECS = {**default_build_set(),
         "scaled_first_block": NSASpec(heads=8, kv_heads=2, head_dim=64, v_head_dim=64, scale=0.1,
                                       compression=dict(block=32, stride=16, pool="mean", first_block=1),
                                       selection=dict(block=32, top_n=8, initial=1, local=2), window=dict(size=64)),
         "no_window": NSASpec(window=None)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_ops_launch_the_planned_keys(name, launched):
    spec = SPECS[name]
    torch.manual_seed(0)
    B, T, dt = 1, 300, getattr(torch, spec.dtype)
    q = torch.randn(B, T, spec.heads, spec.head_dim, dtype=dt, requires_grad=True)
    k = torch.randn(B, T, spec.kv_heads, spec.head_dim, dtype=dt, requires_grad=True)
    v = torch.randn(B, T, spec.kv_heads, spec.v_head_dim, dtype=dt, requires_grad=True)
    gates = [torch.rand(B, T, spec.heads, dtype=dt, requires_grad=True) for _ in range(3)]
    o = ops.nsa_attention(q, k, v, *gates, spec)
    forward = list(launched)
    o.float().sum().backward()
    plan = lower_to_plan(spec, "sm90")
    assert forward == [c.key for c in plan.calls]
    assert sorted(map(str, launched[len(forward):])) == sorted(str(c.key) for c in plan.backward)
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_a_pack_runs_one_launch_per_kernel(launched, monkeypatch):
    """A pack runs each planned kernel once, forward and backward, passing the pack's token maps
    (top-n its tile table)."""
    spec = NSASpec(compression=dict(block=32, stride=16, pool="mean"), dtype="float16")
    seen = {}
    real = launch.token_map
    for module in (ops, launch):   # the ops' own maps, and those launch.pack_maps checks
        monkeypatch.setattr(module, "token_map", lambda name, m, q: seen.setdefault(name, real(name, m, q)))
    lengths = [5, 300, 1, 64, 130]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    dt = torch.float16
    q = torch.randn(1, T, spec.heads, spec.head_dim, dtype=dt)
    k = torch.randn(1, T, spec.kv_heads, spec.head_dim, dtype=dt)
    v = torch.randn(1, T, spec.kv_heads, spec.v_head_dim, dtype=dt)
    gates = [torch.rand(1, T, spec.heads, dtype=dt) for _ in range(3)]
    with torch.no_grad():
        ops.nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu)
    plan = lower_to_plan(spec, "sm90")
    assert launched == [c.key for c in plan.calls]
    starts = torch.repeat_interleave(cu[:-1], torch.tensor(lengths))
    assert torch.equal(seen["seq_start"][0], starts.to(torch.int32))
    rows = [max(0, (n - 32) // 16 + 1) if n >= 32 else 0 for n in lengths]
    cmp_cu = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()])
    assert torch.equal(seen["cmp_start"][0], torch.repeat_interleave(cmp_cu[:-1], torch.tensor(lengths)).to(torch.int32))
    launched.clear()
    leaf = q.clone().requires_grad_()
    ops.nsa_attention(leaf, k, v, *gates, spec, cu_seqlens=cu).float().sum().backward()
    assert launched[:len(plan.calls)] == [c.key for c in plan.calls]
    assert sorted(map(str, launched[len(plan.calls):])) == sorted(str(c.key) for c in plan.backward)
    assert leaf.grad is not None


def test_bad_packs_are_named_before_any_launch(launched):
    """A bad pack (cu_seqlens that do not rise from 0 to T, a batch of 2, a float tensor) or a bad
    token map is named, and nothing is launched."""
    spec = NSASpec(compression=dict(block=32, stride=16, pool="mean"), dtype="float16")
    T, dt = 100, torch.float16
    q = torch.randn(1, T, spec.heads, spec.head_dim, dtype=dt)
    k = torch.randn(1, T, spec.kv_heads, spec.head_dim, dtype=dt)
    v = torch.randn(1, T, spec.kv_heads, spec.v_head_dim, dtype=dt)
    gates = [torch.rand(1, T, spec.heads, dtype=dt) for _ in range(3)]
    for cu, match in ((torch.tensor([0, 60, 50, 100]), "rise from 0 to total tokens 100"),
                      (torch.tensor([0, 60, 90]), "rise from 0 to total tokens 100"),
                      (torch.tensor([0.0, 100.0]), "1-D int32 / int64")):
        with pytest.raises(ValueError, match=match):
            ops.nsa_attention(q, k, v, *gates, spec, cu_seqlens=cu)
    with pytest.raises(ValueError, match="packed as \\[1, total, HQ, D\\]"):
        ops.nsa_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                          *[g.expand(2, -1, -1) for g in gates], spec, cu_seqlens=torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="seq_start must be torch.int32, got torch.int64"):
        ops.window_attention(q, k, v, 64, -1.0, torch.zeros(1, T, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"seq_start must be an int32 \[B, T\] = \[1, 100\]"):
        ops.window_attention(q, k, v, 64, -1.0, torch.zeros(1, T - 1, dtype=torch.int32))
    lse = torch.zeros(1, T, spec.heads)
    kc = torch.randn(1, 5, spec.kv_heads, spec.head_dim, dtype=dt)
    zeros = torch.zeros(1, T, dtype=torch.int32)
    with pytest.raises(ValueError, match="a pack needs both seq_start / cmp_start and cu_seqlens"):
        ops.selection_topn(q, kc, lse, 32, 16, 0, 64, 16, 1, 2, -1.0, zeros, zeros)
    with pytest.raises(ValueError, match="selection_topn: a pack needs both seq_start and cmp_start"):
        ops.selection_topn(q, kc, lse, 32, 16, 0, 64, 16, 1, 2, -1.0, zeros, None, torch.tensor([0, T]))
    with pytest.raises(ValueError, match=r"compression_attention: a pack needs both seq_start and cmp_start "
                                         r"\(nsa_codegen.packing.packed_maps\), got only seq_start"):
        ops.compression_attention(q, kc, torch.randn(1, 5, spec.kv_heads, spec.v_head_dim, dtype=dt), 32, 16, 0,
                                  -1.0, zeros)
    assert launched == []


def test_a_shared_pack_is_checked_and_counted_once(launched, monkeypatch):
    """A packing.Pack built from host lengths needs no host sync in nsa_attention: no value check and
    no row count (both would sync on a GPU); it launches what cu_seqlens does, and two calls (two
    layers) reuse its maps."""
    from nsa_codegen import packing
    spec = NSASpec(compression=dict(block=32, stride=16, pool="mean"), dtype="float16")
    lengths = [5, 300, 1, 64, 130]
    pack = packing.Pack.from_lengths(lengths)
    T = pack.total
    dt = torch.float16
    q = torch.randn(1, T, spec.heads, spec.head_dim, dtype=dt)
    k = torch.randn(1, T, spec.kv_heads, spec.head_dim, dtype=dt)
    v = torch.randn(1, T, spec.kv_heads, spec.v_head_dim, dtype=dt)
    gates = [torch.rand(1, T, spec.heads, dtype=dt) for _ in range(3)]

    def no_sync(*a, **kw):
        raise AssertionError("a host sync the Pack should have saved")
    monkeypatch.setattr(packing, "check_cu_seqlens", no_sync)
    with torch.no_grad():
        ops.nsa_attention(q, k, v, *gates, spec, cu_seqlens=pack)
        maps = dict(pack._maps)
        ops.nsa_attention(q, k, v, *gates, spec, cu_seqlens=pack)
    plan = lower_to_plan(spec, "sm90")
    assert launched == [c.key for c in plan.calls] * 2
    assert pack.rows(spec.compression) == sum(max(0, (n - 32) // 16 + 1) if n >= 32 else 0 for n in lengths)
    assert all(pack._maps[key] is maps[key] for key in maps)   # computed once, reused
    with pytest.raises(ValueError, match="covers"):
        ops.nsa_attention(q[:, :-1], k[:, :-1], v[:, :-1], *(g[:, :-1] for g in gates), spec, cu_seqlens=pack)
