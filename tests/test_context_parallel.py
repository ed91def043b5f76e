"""Context parallelism on the CPU: gloo, world sizes 2 and 4 in spawned processes. Each rank's output
and every gradient equal the single-process reference's (float64, 1e-10); bad input fails on every
rank with a clear error. Every collective runs under a 60 s timeout, and the test under a deadline,
so a hang is a failure."""
from __future__ import annotations

import datetime
import os
import re
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsa_codegen import context_parallel as cp
from nsa_codegen import reference as ref
from nsa_codegen.layer import NativeSparseAttention
from nsa_codegen.ops import nsa_attention
from nsa_codegen.spec import NSASpec

TOL = 1e-10


def _spec(first_block=0, window=24, selection=True, compression=True, pool="mean", heads=4, kv_heads=1):
    return NSASpec.from_dict(dict(
        heads=heads, kv_heads=kv_heads, head_dim=16, v_head_dim=8, dtype="float32",
        compression=dict(block=16, stride=8, first_block=first_block, pool=pool) if compression else None,
        selection=dict(block=16, top_n=3) if selection else None,
        window=dict(size=window) if window else None))


def _inputs(spec, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    HQ, H, Dk, Dv = spec.heads, spec.kv_heads, spec.head_dim, spec.v_head_dim
    x = dict(q=torch.randn(B, T, HQ, Dk, generator=g, dtype=torch.float64),
             k=torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64),
             v=torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64))
    for name in ("g_cmp", "g_slc", "g_win"):
        x[name] = torch.rand(B, T, HQ, generator=g, dtype=torch.float64)
    return x, torch.randn(B, T, HQ, Dv, generator=g, dtype=torch.float64)


_ORDER = ("q", "k", "v", "g_cmp", "g_slc", "g_win")


# ------------------------------------------------------------------------------------------------
# Without processes: the split and the reference's query offset
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", cp.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_cover_the_sequence_once(world, layout):
    T = 8 * world * 3
    x = torch.arange(T).view(1, T, 1)
    shards = [cp.shard(x, world, r, layout) for r in range(world)]
    assert all(s.shape[1] == T // world for s in shards)
    torch.testing.assert_close(cp.unshard(shards, layout), x)
    pos = torch.cat([cp.shard_positions(T, world, r, layout) for r in range(world)])
    assert sorted(pos.tolist()) == list(range(T))
    if layout == "zigzag" and world > 1:   # rank 0 holds the first and the last chunk
        assert cp.shard_chunks(T, world, 0, layout) == [(0, T // (2 * world)), (T - T // (2 * world), T)]


def test_split_rejects_lengths_it_cannot_cut():
    with pytest.raises(ValueError, match="divisible by 8"):
        cp.shard_chunks(100, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        cp.shard_chunks(64, 2, 0, "ring")
    with pytest.raises(ValueError, match="rank"):
        cp.shard_chunks(64, 2, 2)


def test_zigzag_balances_causal_work():
    """Paper config at 128k: contiguous gives the last rank several times the first's work (the
    compression branch grows with t); zigzag evens it out."""
    spec = NSASpec.from_yaml(Path(__file__).parent.parent / "examples" / "paper.yaml")
    T = 131072
    for world in (2, 4, 8):
        cont = cp.work_per_rank(spec, T, world, "contiguous")
        zig = cp.work_per_rank(spec, T, world, "zigzag")
        assert max(cont) / min(cont) > 1.5
        assert max(zig) / min(zig) < 1.01
        assert abs(sum(cont) - sum(zig)) < 1e-6 * sum(cont)


@pytest.mark.parametrize("first_block", [0, 1])
def test_reference_queries_at_an_offset_equal_the_whole_sequence(first_block):
    spec = _spec(first_block=first_block, window=40)
    x, _ = _inputs(spec, 2, 150, seed=3)
    whole, idx = ref.nsa_reference(*(x[n] for n in _ORDER), spec, return_indices=True)
    for a, b in ((0, 37), (37, 100), (100, 150)):
        part, pidx = ref.nsa_reference_queries(
            *(x[n][:, a:b] for n in ("q",)), x["k"][:, :b], x["v"][:, :b],
            *(x[n][:, a:b] for n in ("g_cmp", "g_slc", "g_win")), spec, t_offset=a, return_indices=True)
        torch.testing.assert_close(part, whole[:, a:b], rtol=TOL, atol=TOL)
        assert torch.equal(pidx, idx[:, a:b])
    with pytest.raises(ValueError, match="exactly 100 tokens"):
        ref.nsa_reference_queries(x["q"][:, 37:100], x["k"], x["v"], *(x[n][:, 37:100] for n in _ORDER[3:]),
                                  spec, t_offset=37)


def test_cp_group_needs_torch_distributed():
    spec = _spec()
    x, _ = _inputs(spec, 1, 32, seed=0)
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        nsa_attention(*(x[n] for n in _ORDER), spec, cp_group=object())


# ------------------------------------------------------------------------------------------------
# Spawned ranks
# ------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args, deadline=240):
    """Run fn(rank, world, *args) on `world` gloo ranks; fail (not hang) past the deadline. A rank's
    exception fails the test with that rank's traceback."""
    port = _free_port()
    ctx = mp.start_processes(_rank_main, args=(world, port, fn, args), nprocs=world, join=False,
                             start_method="spawn")
    end = time.monotonic() + deadline
    while not ctx.join(timeout=5):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"context-parallel ranks still running after {deadline} s (a hang)")


def _rank_main(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except (Exception, pytest.fail.Exception):   # pytest.raises reports through the latter
        raise RuntimeError(f"rank {rank}:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def _close(got, want, what):
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= TOL, f"{what}: max |difference| {err:.3e} > {TOL}"


# (spec kwargs, B, T per world size, layout): ragged T (not a multiple of world x block), windows wider
# than a chunk, both first_block, MQA and GQA, each branch set.
_CASES = [
    (dict(first_block=0, window=24), 2, {2: 200, 4: 168}, "zigzag"),
    (dict(first_block=1, window=60, heads=4, kv_heads=2), 1, {2: 152, 4: 184}, "zigzag"),
    (dict(first_block=0, window=40), 1, {2: 148, 4: 172}, "contiguous"),
    (dict(window=None), 1, {2: 120, 4: 136}, "zigzag"),
    (dict(selection=False, window=36), 1, {2: 100, 4: 104}, "zigzag"),
]


def _count_received_bytes():
    """Patch cp._all_gather to count the bytes this rank receives, up to its first backward."""
    state = {"first_forward": 0, "restore": cp._all_gather, "done": False}

    def counting(x, group):
        if not torch.is_grad_enabled() or state["done"]:
            return state["restore"](x, group)
        state["first_forward"] += (dist.get_world_size(group) - 1) * x.numel() * x.element_size()
        return state["restore"](x, group)
    cp._all_gather = counting
    state["stop"] = lambda: state.update(done=True)
    return state


def _check_against_one_process(rank, world):
    group = dist.group.WORLD
    for i, (kw, B, Ts, layout) in enumerate(_CASES):
        spec, T = _spec(**kw), Ts[world]
        x, w = _inputs(spec, B, T, seed=100 + i)
        full = {n: t.clone().requires_grad_() for n, t in x.items()}
        want, idx = ref.nsa_reference(*(full[n] for n in _ORDER), spec, return_indices=True)
        (want * w).sum().backward()
        mine = {n: cp.shard(t, world, rank, layout) for n, t in x.items()}
        received = _count_received_bytes()
        grads = []
        for _ in range(2):   # twice: bit-identical
            loc = {n: t.clone().requires_grad_() for n, t in mine.items()}
            out = nsa_attention(*(loc[n] for n in _ORDER), spec, cp_group=group, cp_layout=layout)
            received["stop"]()
            (out * cp.shard(w, world, rank, layout)).sum().backward()
            grads.append({n: t.grad for n, t in loc.items()})
        # What the forward received (the backward's gathers' gradients go back, not counted):
        # what bytes_per_rank states for this spec
        want_bytes = sum(cp.bytes_per_rank(spec, T, world, layout, itemsize=8, separate_branch_kv=False, batch=B).values())
        assert received["first_forward"] == want_bytes, (received, want_bytes)
        cp._all_gather = received["restore"]
        _close(out, cp.shard(want, world, rank, layout), f"case {i} o")
        for n in _ORDER:
            if n == "g_slc" and spec.selection is None or n == "g_win" and spec.window is None:
                continue
            _close(grads[0][n], cp.shard(full[n].grad, world, rank, layout), f"case {i} d{n}")
            assert torch.equal(grads[0][n], grads[1][n]), f"case {i} d{n} differs run to run"
        # The lists reach blocks this rank does not hold (rank 0 of a contiguous split holds its whole prefix).
        if spec.selection is not None and (layout == "zigzag" or rank > 0):
            held = set()
            for a, b in cp.shard_chunks(T, world, rank, layout):
                held |= set(range(a // spec.selection.block, (b - 1) // spec.selection.block + 1))
            picked = set(cp.shard(idx, world, rank, layout).flatten().tolist()) - {-1}
            assert picked - held, f"case {i}: no selected block lives on another rank"


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_one_process(world):
    _spawn(_check_against_one_process, world)


def _check_layer(rank, world):
    """The layer (MLP compressor) on shards: output shards and parameter gradients summed over the
    group equal one process running the whole sequence."""
    torch.manual_seed(0)
    spec = _spec(pool="mlp", first_block=1, window=40)
    T, layout = 40 * world, "zigzag"
    one = NativeSparseAttention(32, spec, backend="reference").double()
    split = NativeSparseAttention(32, spec, backend="reference", cp_group=dist.group.WORLD,
                                  cp_layout=layout).double()
    split.load_state_dict(one.state_dict())
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    xs = x.clone().requires_grad_()
    (one(xs) * w).sum().backward()
    xl = cp.shard(x, world, rank, layout).clone().requires_grad_()
    received = _count_received_bytes()
    y = split(xl)
    received["stop"]()
    cp._all_gather = received["restore"]
    # each branch its own K/V: raw gather for selection, pooled rows + halos for compression, halos for the window
    assert received["first_forward"] == sum(cp.bytes_per_rank(spec, T, world, layout, itemsize=8, batch=2).values())
    (y * cp.shard(w, world, rank, layout)).sum().backward()
    _close(y, cp.shard(one(x), world, rank, layout), "layer y")
    _close(xl.grad, cp.shard(xs.grad, world, rank, layout), "layer dx")
    for (name, p), (_, p1) in zip(split.named_parameters(), one.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        _close(g, p1.grad, f"layer d{name}")
    with pytest.raises(NotImplementedError, match="context parallelism"):
        split.prefill(xl, None)


@pytest.mark.parametrize("world", [2])
def test_layer_with_cp_group_equals_one_process(world):
    _spawn(_check_layer, world)


def _bad_inputs(rank, world):
    spec = _spec()
    x, _ = _inputs(spec, 1, 16 * world, seed=1)
    mine = {n: cp.shard(t, world, rank, "zigzag") for n, t in x.items()}
    group = dist.group.WORLD

    def expect(match, **over):
        args = {**mine, **over.pop("tensors", {})}
        with pytest.raises(ValueError, match=re.escape(match)):
            nsa_attention(*(args[n] for n in _ORDER), over.pop("spec", spec), cp_group=group, **over)

    # Rank 1's shard is shorter: every rank is told, none waits.
    cut = {n: t[:, :-2] for n, t in mine.items()} if rank == 1 else {}
    expect("disagree on tokens per shard", tensors=cut)
    # One rank's own check fails (a gate of the wrong shape): it names it, the others stop too.
    bad_gate = {"g_win": mine["g_win"][..., :1]} if rank == 0 else {}
    expect("g_win must be" if rank == 0 else "rank(s) [0] rejected", tensors=bad_gate)
    # Different specs or layouts.
    expect("disagree on spec", spec=_spec(window=48) if rank == world - 1 else spec)
    expect("disagree on layout", cp_layout="contiguous" if rank == 0 else "zigzag")
    # Global block ids beyond the whole sequence.
    T = 16 * world
    idx = torch.full((1, T // world, 1, 3), T // 16, dtype=torch.int32)
    expect("global block ids", block_indices=idx)
    # After all of that the group still works.
    out = nsa_attention(*(mine[n] for n in _ORDER), spec, cp_group=group)
    assert out.shape == mine["q"].shape[:3] + (spec.v_head_dim,)
    # An empty sequence: empty shards in, empty shards out. An odd shard cannot be cut in two.
    empty = {n: t[:, :0] for n, t in mine.items()}
    assert nsa_attention(*(empty[n] for n in _ORDER), spec, cp_group=group).shape == (1, 0, 4, spec.v_head_dim)
    odd = {n: t[:, :3] for n, t in mine.items()}
    expect("divisible by", tensors=odd)
    # A process outside the group it passes.
    sub = dist.new_group([0, 1])
    if rank >= 2:
        with pytest.raises(ValueError, match="not a member"):
            nsa_attention(*(mine[n] for n in _ORDER), spec, cp_group=sub)


@pytest.mark.parametrize("world", [4])
def test_bad_input_fails_on_every_rank(world):
    _spawn(_bad_inputs, world)
