"""Schedule search on a GPU: compile candidates in parallel, check each against the reference,
time the correct ones, and append every outcome to tuning_logs/<arch>/<gpu>.jsonl.

Search (per problem, i.e. kernel key without schedule):
  greedy (default)  round 1: the default and every single-knob change of it; round 2: the
                    default with each knob at its round-1 best (when that is a new schedule).
  exhaustive        the whole cartesian product of schedules/<arch>.yaml's space.
Candidates the template rejects are pruned before anything compiles; all problems' candidates of
a round compile together in one pool of worker processes (all CPU cores busy), then each is
checked and timed on the GPU.

How a candidate runs:
  forward kinds     launched directly on fresh inputs (`_inputs`), outputs NaN-poisoned.
  backward, decode  through the real op (ops.*_attention's autograd, gate_combine, nsa_decode)
                    with the candidate swapped in for its problem (`_use_kernel`): the op's
                    gradients / outputs are checked against the reference; for timing, the
                    candidate's launch arguments are captured from the op and replayed alone.
Timing: CUDA events, median of repeats after warm-up, rotating input sets larger than L2.

Records are append-only JSON lines; an interrupted tune loses nothing, and a rerun skips the
(problem, schedule) pairs already recorded for this GPU (their times still steer round 2).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from . import reference as ref
from . import workloads
from .cache import CompiledKernel, tilelang_cache_dir, precompile_scheduled, use_kernel, versioned_dir
from .codegen import check_schedule, compile_kernel, template_source_hash
from .kernel_key import KernelKey, schedule_hash
from .kinds import KINDS
from .schedules import (default_schedule, in_search_space, load_arch, pick_best, record_is_current, search_space,
                        tuning_dir)

CHECK_T = 1000  # correctness check length (not a multiple of any block)
TOL = 1e-2


def gpu_record_fields() -> dict:
    import tilelang
    p = torch.cuda.get_device_properties(0)
    try:
        import subprocess
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        driver = "unknown"
    return dict(gpu=p.name, sm_count=p.multi_processor_count, driver=driver, cuda=torch.version.cuda,
                tilelang=tilelang.__version__, torch=torch.__version__)


def log_path(arch: str) -> Path:
    name = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    return tuning_dir(arch) / f"{name}.jsonl"


def _logged(path: Path) -> dict[tuple[str, str], dict]:
    """(problem id, schedule hash) -> record, for every complete line of the log that measured the
    kernel's current template (records of an older template text are kept but no longer count)."""
    seen = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                if record_is_current(r, r["problem"].split("/")[1]):
                    seen[(r["problem"], schedule_hash(r["schedule"]))] = r
            except (json.JSONDecodeError, KeyError, IndexError):
                continue
    return seen


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write per line: an interrupt leaves at most one partial line
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------
def _space(key: KernelKey) -> dict[str, list]:
    return dict(load_arch(key.arch)["kernels"][key.kind].get("space", {}))


def greedy_round1(key: KernelKey) -> list[dict]:
    """The default, then every schedule that changes one knob of it."""
    default = default_schedule(key)
    out = [default]
    for knob, values in sorted(_space(key).items()):
        out += [{**default, knob: v} for v in values if v != default.get(knob)]
    return out


def greedy_round2(key: KernelKey, times: dict[str, float]) -> dict | None:
    """The default with every knob at its best round-1 value (times: schedule hash -> ms), if new."""
    default = default_schedule(key)
    best = dict(default)
    for knob, values in _space(key).items():
        # (time, not the default's value, value): on a tie the default's value stays
        tried = [(times[h], v != default.get(knob), v) for v in dict.fromkeys([*values, default.get(knob)])
                 if (h := schedule_hash({**default, knob: v})) in times]
        if tried:
            best[knob] = min(tried, key=lambda t: t[:2])[2]
    return None if best == default or schedule_hash(best) in times else best


# ------------------------------------------------------------------------------------------------
# Forward kinds: direct launches
# ------------------------------------------------------------------------------------------------
def _inputs(key: KernelKey, T: int, seed: int):
    """Fresh random inputs for one launch of key's kernel, and a function computing the reference."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, key.dtype)
    p = key.param
    HQ, H, Dk, Dv = key.heads, key.kv_heads, key.head_dim, key.v_head_dim or key.head_dim
    sc = key.scale

    def rn(*s):
        return torch.randn(*s, generator=g, device="cuda").to(dt)

    if key.kind == "gate_combine":
        names = p["branches"].split(".")
        os_, gs = [rn(1, T, HQ, Dv) for _ in names], [torch.rand(1, T, HQ, generator=g, device="cuda").to(dt)
                                                      for _ in names]
        slots = {n: (o, gg) for n, o, gg in zip(names, os_, gs)}
        args = [x for n in ("cmp", "slc", "win") for x in slots.get(n, slots[names[0]])]
        outs = [torch.full((1, T, HQ, Dv), float("nan"), device="cuda", dtype=dt)]
        return args, outs, lambda: (sum(o.float() * gg.float()[..., None] for o, gg in zip(os_, gs)),)
    q = rn(1, T, HQ, Dk)
    zero = torch.zeros(1, T, dtype=torch.int32, device="cuda")   # seq_start / cmp_start: one sequence
    if key.kind in ("compression_fwd", "selection_topn"):
        N = ref.num_compressed_blocks(T, p["cmp_block"], p["stride"], p["first_block"])
        kc, vc = rn(1, N, H, Dk), rn(1, N, H, Dv)
        if key.kind == "compression_fwd":
            outs = [torch.full((1, T, HQ, Dv), float("nan"), device="cuda", dtype=dt),
                    torch.full((1, T, HQ), float("nan"), device="cuda")]
            return [q, kc, vc, zero, zero], outs, lambda: ref.compression_attention(
                q.float(), kc.float(), vc.float(), p["cmp_block"], p["stride"], p["first_block"], sc)
        # The compression branch's lse, in query chunks so the fp32 probabilities never exist for all of T.
        step = max(1, (1 << 28) // max(1, HQ * N * 4))
        lse = torch.cat([ref.compression_attention(q[:, t0:t0 + step].float(), kc.float(), kc[..., :1].float(),
                                                   p["cmp_block"], p["stride"], p["first_block"], sc, t_offset=t0)[1]
                         for t0 in range(0, T, step)], 1)
        n = p["top_n"]
        outs = [torch.full((1, T, H, n), -7, device="cuda", dtype=torch.int32),
                torch.full((1, T, H), -7, device="cuda", dtype=torch.int32)]

        def want():
            _, _, pr = ref.compression_attention(q.float(), kc.float(), kc[..., :1].float(), p["cmp_block"],
                                                 p["stride"], p["first_block"], sc, return_probs=True)
            s = ref.selection_scores(pr, H, T, p["cmp_block"], p["stride"], p["sel_block"], p["first_block"])
            return (ref.select_top_n(s, p["sel_block"], n, p["initial"], p["local"]),)
        from .ops import topn_tile_starts
        tiles = topn_tile_starts(key, T, device="cuda")
        return [q, kc, lse.contiguous(), zero, zero, tiles], outs, want
    k, v = rn(1, T, H, Dk), rn(1, T, H, Dv)
    outs = [torch.full((1, T, HQ, Dv), float("nan"), device="cuda", dtype=dt),
            torch.full((1, T, HQ), float("nan"), device="cuda")]
    if key.kind == "window_fwd":
        return [q, k, v, zero], outs, lambda: ref.window_attention(q.float(), k.float(), v.float(), p["window"], sc)
    idx = _selection_lists(key, T, seed)
    return [q, k, v, idx, zero], outs, lambda: ref.selection_attention(q.float(), k.float(), v.float(), idx,
                                                                 p["sel_block"], sc)


def _selection_lists(key: KernelKey, T: int, seed: int) -> torch.Tensor:
    """[1, T, H, n] block lists to tune selection on: top-n lists of scores that drift along the
    sequence (workloads "drift", coherence 16), so that kernels sharing blocks across neighbouring
    tokens are timed on the locality real selections have, not on independent random picks."""
    p = key.param
    return workloads.block_indices("drift", 1, T, key.kv_heads, p["sel_block"], p["top_n"], p.get("initial", 1),
                                   p.get("local", 2), coherence=16, seed=seed)


def _rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _direct_check(key: KernelKey, kernel) -> str | None:
    ins, outs, want = _inputs(key, CHECK_T, seed=int(time.time()) % 100000)
    kernel(*ins, *outs)
    torch.cuda.synchronize()
    expect = want()
    if key.kind == "selection_topn":
        agree = (outs[0] == expect[0]).all(-1).float().mean().item()
        return None if agree > 0.98 else f"only {agree:.1%} of index rows match the reference"
    o, lse = outs[0], (outs[1] if len(outs) > 1 else outs[0][..., 0])
    if torch.isnan(o).any() or torch.isnan(lse).any():
        return "NaN in output (unwritten elements)"
    err = _rel(o, expect[0])
    return None if err < TOL else f"relative error {err:.2e}"


# ------------------------------------------------------------------------------------------------
# Backward and decode kinds: through the op, with the candidate swapped in
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _use_kernel(problem: KernelKey, kernel: CompiledKernel):
    """Ops that ask for `problem` get `kernel` inside this block (decode's kernel table is rebuilt)."""
    from . import decode
    decode.clear_decode_kernels()
    try:
        with use_kernel(problem, kernel):
            yield
    finally:
        decode.clear_decode_kernels()


class _Capture:
    """A kernel callable that records the arguments of every launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.kernel(*args)


def _spec_of(key: KernelKey):
    from .spec import NSASpec
    p = key.param
    return NSASpec(heads=key.heads, kv_heads=key.kv_heads, head_dim=key.head_dim, v_head_dim=key.v_head_dim,
                   dtype=key.dtype, scale=key.scale,
                   compression=dict(block=p["cmp_block"], stride=p["stride"], pool="mean",
                                    first_block=p["first_block"]),
                   selection=dict(block=p["sel_block"], top_n=p["top_n"], initial=p["initial"], local=p["local"]),
                   window=dict(size=p["window"]))


def _grad_workload(key: KernelKey, T: int, seed: int):
    """(run, check) for a backward kind: run() returns the op's gradients of random cotangents;
    check(grads) compares them with the fp32 reference's autograd."""
    from . import ops
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, key.dtype)
    p = key.param
    HQ, H, Dk, Dv = key.heads, key.kv_heads, key.head_dim, key.v_head_dim
    sc_op = -1.0 if key.scale is None else float(key.scale)

    def rn(*s, dtype=dt):
        return torch.randn(*s, generator=g, device="cuda").to(dtype)

    family = key.kind.split("_bwd")[0]
    do = rn(1, T, HQ, Dv)
    if family == "gate_combine":
        names = p["branches"].split(".")
        os_ = [rn(1, T, HQ, Dv) for _ in names]
        gs = [torch.rand(1, T, HQ, generator=g, device="cuda").to(dt) for _ in names]
        inputs = [x for pair in zip(os_, gs) for x in pair]

        def kern(*xs):
            slots = dict(zip(names, zip(xs[0::2], xs[1::2])))
            args = [a for n in ("cmp", "slc", "win") for a in slots.get(n, (None, None))]
            return (ops.gate_combine(*args, H),)

        def oracle(*xs):
            return (sum(o * gg[..., None] for o, gg in zip(xs[0::2], xs[1::2])),)
        dlse = None
    else:
        q = rn(1, T, HQ, Dk)
        dlse = rn(1, T, HQ, dtype=torch.float32)
        if family == "compression":
            l, d, f = p["cmp_block"], p["stride"], p["first_block"]
            N = ref.num_compressed_blocks(T, l, d, f)
            inputs = [q, rn(1, N, H, Dk), rn(1, N, H, Dv)]
            kern = lambda *xs: ops.compression_attention(*xs, l, d, f, sc_op)  # noqa: E731
            oracle = lambda *xs: ref.compression_attention(*xs, l, d, f, key.scale)  # noqa: E731
        elif family == "selection":
            idx = _selection_lists(key, T, seed)
            inputs = [q, rn(1, T, H, Dk), rn(1, T, H, Dv)]
            kern = lambda *xs: ops.selection_attention(*xs, idx, p["sel_block"], sc_op)  # noqa: E731
            oracle = lambda *xs: ref.selection_attention(*xs, idx, p["sel_block"], key.scale)  # noqa: E731
        else:
            inputs = [q, rn(1, T, H, Dk), rn(1, T, H, Dv)]
            kern = lambda *xs: ops.window_attention(*xs, p["window"], sc_op)  # noqa: E731
            oracle = lambda *xs: ref.window_attention(*xs, p["window"], key.scale)  # noqa: E731

    def grads(fn, xs, do_):
        leaves = [x.detach().requires_grad_() for x in xs]
        out = fn(*leaves)
        loss = (out[0].float() * do_.float()).sum()
        if dlse is not None:
            lse = out[1]
            loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).float() * dlse).sum()
        return torch.autograd.grad(loss, leaves)

    def check(got):
        want = grads(oracle, [x.float() for x in inputs], do.float())
        for i, (a, w) in enumerate(zip(got, want)):
            if torch.isnan(a).any():
                return f"NaN in gradient {i} (unwritten elements)"
            err = _rel(a, w)
            if err >= TOL:
                return f"gradient {i}: relative error {err:.2e}"
        return None
    return (lambda: grads(kern, inputs, do)), check


def _decode_workload(key: KernelKey, B: int, lengths: list[int], seed: int):
    """(run, check) for a decode kind: a cache of B entries filled to `lengths`; run() is one
    nsa_decode step of q_len tokens; check(o) compares with nsa_decode_reference."""
    from .decode import nsa_decode
    from .kv_cache import NSAKVCache, nsa_decode_reference
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, key.dtype)
    spec = _spec_of(key)
    p = key.param
    ql, sep = p["q_len"], bool(p["separate_window"])
    HQ, H, Dk, Dv = key.heads, key.kv_heads, key.head_dim, key.v_head_dim
    T0 = max(lengths)

    def rn(*s):
        return torch.randn(*s, generator=g, device="cuda").to(dt)
    kv = (rn(B, T0, H, Dk), rn(B, T0, H, Dv), *((rn(B, T0, H, Dk), rn(B, T0, H, Dv)) if sep else ()))
    if p.get("page_size"):   # the paged kinds: a PagedNSAKVCache of those pages, one slot per entry
        from .paged_kv_cache import PagedNSAKVCache
        P = p["page_size"]
        pool = PagedNSAKVCache(spec, sum(-(-L // P) for L in lengths) + B, page_size=P, max_seqs=B,
                               max_seq_len=T0, device="cuda", dtype=dt, separate_window=sep)
        cache = pool.batch([pool.add_sequence() for _ in range(B)])
        cache.append(*kv, seqlens_new=lengths)
    else:
        cache = NSAKVCache(spec, B, T0, device="cuda", dtype=dt, separate_window=sep)
        cache.prefill(*kv, seqlens=lengths)
    q = rn(B, ql, HQ, Dk)
    gates = [torch.sigmoid(torch.randn(B, ql, HQ, generator=g, device="cuda")).to(dt) for _ in range(3)]

    def check(res):
        o, idx = res
        if torch.isnan(o).any():
            return "NaN in output (unwritten elements)"
        ref_o, sels = nsa_decode_reference(q, cache, *gates, return_selection=True)
        if not all(torch.equal(idx[b].cpu(), want.cpu()) for b, (want, _) in enumerate(sels)):
            # near ties (within 1e-2 of a row's largest score) may pick the other block: then the
            # output is checked on the kernel's own choice
            for b, (want, keys) in enumerate(sels):
                ok, _, msg = ref.compare_block_indices(idx[b], want, keys)
                if not ok:
                    return f"top-n of entry {b}: {msg}"
            ref_o = nsa_decode_reference(q, cache, *gates, block_indices=idx)
        err = _rel(o, ref_o)
        return None if err < TOL else f"relative error {err:.2e}"
    return (lambda: nsa_decode(q, cache, *gates, return_indices=True)), check


DECODE_TIMING_BATCH, DECODE_TIMING_LEN = 16, 65536  # issue 6's headline point


def _op_workload(key: KernelKey, T: int | None, seed: int):
    """The (run, check) of key's op: T=None is the correctness check's size, else the timed size
    (backward: T tokens; decode: DECODE_TIMING_BATCH caches of DECODE_TIMING_LEN tokens)."""
    if key.kind.startswith("decode_"):
        if T is None:
            rng = torch.Generator().manual_seed(seed)
            lens = [int(x) for x in torch.randint(key.param["q_len"], 3000, (3,), generator=rng)]
            return _decode_workload(key, 3, lens, seed)
        return _decode_workload(key, DECODE_TIMING_BATCH, [DECODE_TIMING_LEN] * DECODE_TIMING_BATCH, seed)
    return _grad_workload(key, CHECK_T if T is None else T, seed)


def _op_check(key: KernelKey, kernel: CompiledKernel) -> str | None:
    run, check = _op_workload(key, None, seed=int(time.time()) % 100000)
    cap = _Capture(kernel.kernel)
    with _use_kernel(key.problem, CompiledKernel(key, cap, "candidate", 0.0)):
        got = run()
    torch.cuda.synchronize()
    if not cap.calls:
        return f"the op never launched {key.problem_id} (key mismatch)"
    return check(got)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
WARMUP_S = 0.05  # launch for at least this long before timing (GPU clocks ramp up from idle)
MIN_TIMED_S = 0.03  # and time at least this much GPU work (short kernels get more repeats)


def _median_min(launch_sets: list[Callable[[], None]], repeats: int) -> tuple[float, float]:
    """(median, min) ms of single launches after a warm-up, alternating input sets."""
    t0, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - t0 < WARMUP_S:
        launch_sets[n % len(launch_sets)]()
        n += 1
        if n % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    per_launch = (time.perf_counter() - t0) / n
    repeats = max(repeats, min(1000, int(MIN_TIMED_S / max(per_launch, 1e-6))))
    times = []
    for i in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        launch_sets[i % len(launch_sets)]()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times[0]


def _nbytes(args) -> int:
    return sum(x.numel() * x.element_size() for x in args if isinstance(x, torch.Tensor))


def time_direct(key: KernelKey, kernel, T: int, repeats: int = 30) -> tuple[float, float]:
    """(median, min) ms of key's kernel alone, rotating input sets that together exceed L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sets = [_inputs(key, T, seed=i) for i in range(2)]
    while len(sets) * _nbytes(sets[0][0]) < 2 * l2 and len(sets) < 8:
        sets.append(_inputs(key, T, seed=len(sets)))
    return _median_min([lambda s=s: kernel(*s[0], *s[1]) for s in sets], repeats)


class _TimingSets:
    """Per problem, the captured launch arguments of its op at the timed size (built once)."""

    def __init__(self, key: KernelKey, T: int):
        # Two input sets: each is far larger than L2 at the timed sizes (T = 16k tokens; 16 x 64k caches).
        self.runs = [_op_workload(key, T, seed)[0] for seed in range(2)]

    def time(self, key: KernelKey, kernel: CompiledKernel, repeats: int = 30) -> tuple[float, float]:
        cap = _Capture(kernel.kernel)
        with _use_kernel(key.problem, CompiledKernel(key, cap, "candidate", 0.0)):
            for run in self.runs:
                run()
        torch.cuda.synchronize()
        if not cap.calls:
            raise RuntimeError(f"the op never launched {key.problem_id}")
        # Replays the launches the ops made (one per op call today), alternating input sets.
        return _median_min([lambda a=a: kernel.kernel(*a) for a in cap.calls], repeats)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _direct(kind: str) -> bool:
    return KINDS[kind].tuned_by == "direct"


def _compile_candidates(keys: list[KernelKey], jobs: int | None, deadline: float, say) -> None:
    """Compile into the disk cache in worker processes, all problems together; stops at the deadline."""
    t0, failed = time.time(), 0

    def progress(i, total, err):
        nonlocal failed
        failed += err is not None
        if i % max(1, total // 20) == 0 or i == total:
            say(f"  compile [{'#' * (24 * i // total):<24}] {i}/{total} ({failed} failed) {time.time() - t0:.0f} s")
    precompile_scheduled(keys, jobs, progress, deadline)
    if time.time() > deadline:
        say("  budget spent while compiling; rerun to resume (compiled candidates stay cached)")


def tune(problems: list[KernelKey], T: int = 16384, budget_minutes: float | None = None, jobs: int | None = None,
         exhaustive: bool = False, max_candidates: int | None = None,
         say: Callable[[str], None] = print) -> list[dict]:
    """Search each problem's schedule space; returns the records written. max_candidates caps the
    candidates per problem and round (the default schedule comes first)."""
    if not torch.cuda.is_available():
        raise RuntimeError("tuning needs a CUDA GPU (none found)")
    deadline = time.time() + budget_minutes * 60 if budget_minutes else math.inf
    fields = gpu_record_fields()
    os.environ["NSA_CODEGEN_POISON_OUTPUTS"] = "1"  # op outputs NaN-filled before launch: unwritten fails
    written: list[dict] = []
    problems = [p.problem for p in dict.fromkeys(problems)]
    rounds = [lambda key, times: list(search_space(key))] if exhaustive else \
        [lambda key, times: greedy_round1(key), lambda key, times: [r] if (r := greedy_round2(key, times)) else []]
    for rnd, propose in enumerate(rounds, 1):
        todo: list[tuple[KernelKey, list[KernelKey]]] = []
        n_pruned = 0
        logs: dict[str, dict] = {}  # arch -> its log, read once per round
        for problem in problems:
            seen = logs.get(problem.arch)
            if seen is None:
                seen = logs[problem.arch] = _logged(log_path(problem.arch))
            times = {h: r["median_ms"] for (pid, h), r in seen.items()
                     if pid == problem.problem_id and r.get("median_ms") is not None}
            cands = []
            for s in propose(problem, times):
                if (problem.problem_id, schedule_hash(s)) in seen:
                    continue
                if check_schedule(problem, s) is None:
                    cands.append(problem.with_schedule(s))
                else:
                    n_pruned += 1
            cands = list(dict.fromkeys(cands))[:max_candidates]
            if cands:
                todo.append((problem, cands))
        n = sum(len(c) for _, c in todo)
        say(f"round {rnd}: {n} candidates for {len(todo)} problems ({n_pruned} pruned before compiling; "
            f"logged ones skipped)")
        if not n or time.time() > deadline:
            continue
        _compile_candidates([k for _, cs in todo for k in cs], jobs, deadline, say)
        for problem, cands in todo:
            if time.time() > deadline:
                say("budget spent; rerun to resume")
                return written
            path = log_path(problem.arch)
            timing = None
            for i, key in enumerate(cands, 1):
                if time.time() > deadline:
                    say("budget spent; rerun to resume")
                    return written
                rec = dict(problem=key.problem_id, key=str(key), schedule=dict(key.schedule), T=T,
                           template=template_source_hash(key.kind),
                           date=datetime.datetime.now().isoformat(timespec="seconds"), round=rnd, **fields)
                if key.kind.startswith("decode_"):
                    rec.update(T=DECODE_TIMING_LEN, batch=DECODE_TIMING_BATCH)
                try:
                    with tilelang_cache_dir(versioned_dir() / "tilelang"):
                        jit = compile_kernel(key)
                    if _direct(key.kind):
                        why = _direct_check(key, jit)
                    else:
                        why = _op_check(key, CompiledKernel(key, jit, "candidate", 0.0))
                    rec["correct"] = why is None
                    if why:
                        rec["why"] = why
                    elif _direct(key.kind):
                        rec["median_ms"], rec["min_ms"] = time_direct(key, jit, T)
                    else:
                        timing = timing or _TimingSets(problem, T)
                        rec["median_ms"], rec["min_ms"] = timing.time(key, CompiledKernel(key, jit, "candidate", 0.0))
                except Exception as e:
                    rec.update(correct=False, why=f"{type(e).__name__}: {str(e)[:300]}")
                _append(path, rec)
                written.append(rec)
                say(f"  [{i}/{len(cands)}] {key}: " + (f"{rec['median_ms']:.4f} ms" if rec.get("median_ms") else
                                                       f"rejected ({rec.get('why')})"))
            del timing
            torch.cuda.empty_cache()
    return written


def speedups(arch: str, path: Path | None = None) -> list[dict]:
    """Per problem in a tuning log: default and best correct median ms, and best's speedup."""
    out = []
    recs = _logged(path) if path else {k: v for p in sorted(tuning_dir(arch).glob("*.jsonl"))
                                       for k, v in _logged(p).items()}
    by_problem: dict[str, list[dict]] = {}
    for (pid, _), r in recs.items():
        by_problem.setdefault(pid, []).append(r)
    for pid, rs in sorted(by_problem.items()):
        kind = pid.split("/")[1]
        # the records the build may pick (schedules.tuned_best): correct, timed, still in the space
        ok = [r for r in rs if r.get("correct") and r.get("median_ms") is not None
              and in_search_space(arch, kind, dict(r["schedule"]))]
        if not ok:
            continue
        default = dict(load_arch(arch)["kernels"][kind]["default"])
        dflt = pick_best([r for r in ok if dict(r["schedule"]) == default], default)
        # what the build uses (schedules.MIN_GAIN); with no default record, the default, unmeasured
        best = pick_best([r for r in rs if in_search_space(arch, kind, dict(r["schedule"]))], default)
        out.append(dict(problem=pid, candidates=len(rs), correct=len(ok),
                        default_ms=dflt["median_ms"] if dflt else None,
                        best_ms=best["median_ms"] if best else None,
                        best_schedule=best["schedule"] if best else default,
                        speedup=(dflt["median_ms"] / best["median_ms"]) if dflt and best else None))
    return out
