"""Schedule search on a GPU: compile candidates in parallel, check each against the reference,
time the correct ones, and append every outcome to tuning_logs/<arch>/<gpu>.jsonl.

Records are append-only JSON lines; an interrupted tune loses nothing, and a rerun skips the
(problem, schedule) pairs already recorded for this GPU.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from . import reference as ref
from .cache import _tilelang_cache_dir, precompile_scheduled, versioned_dir
from .codegen import check_schedule, compile_kernel
from .kernel_key import KernelKey, schedule_hash
from .schedules import search_space, tuning_dir

CHECK_T = 1000  # correctness check length (not a multiple of any block)


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


def _done(path: Path) -> set[tuple[str, str]]:
    seen = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                seen.add((r["problem"], schedule_hash(r["schedule"])))
            except (json.JSONDecodeError, KeyError):
                continue
    return seen


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write per line: an interrupt leaves at most one partial line
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    if key.kind in ("compression_fwd", "selection_topn"):
        N = ref.num_compressed_blocks(T, p["cmp_block"], p["stride"], p["first_block"])
        kc, vc = rn(1, N, H, Dk), rn(1, N, H, Dv)
        if key.kind == "compression_fwd":
            outs = [torch.full((1, T, HQ, Dv), float("nan"), device="cuda", dtype=dt),
                    torch.full((1, T, HQ), float("nan"), device="cuda")]
            return [q, kc, vc], outs, lambda: ref.compression_attention(
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
        return [q, kc, lse.contiguous()], outs, want
    k, v = rn(1, T, H, Dk), rn(1, T, H, Dv)
    outs = [torch.full((1, T, HQ, Dv), float("nan"), device="cuda", dtype=dt),
            torch.full((1, T, HQ), float("nan"), device="cuda")]
    if key.kind == "window_fwd":
        return [q, k, v], outs, lambda: ref.window_attention(q.float(), k.float(), v.float(), p["window"], sc)
    bs, n = p["sel_block"], p["top_n"]
    t = torch.arange(T, device="cuda")
    r = torch.rand(1, T, H, n, generator=g, device="cuda")
    idx = (r * (t // bs + 1)[None, :, None, None]).long()
    idx[..., 0] = (t // bs)[None, :, None]
    s, _ = idx.sort(-1)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    idx = s.masked_fill(dup, -1).int()
    return [q, k, v, idx], outs, lambda: ref.selection_attention(q.float(), k.float(), v.float(), idx, bs, sc)


def check_candidate(key: KernelKey, kernel) -> str | None:
    """None when the kernel matches the reference on fresh inputs, else why not."""
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
    err = ((o.double() - expect[0].double()).norm() / expect[0].double().norm()).item()
    return None if err < 1e-2 else f"relative error {err:.2e}"


def time_candidate(key: KernelKey, kernel, T: int, repeats: int = 30) -> tuple[float, float]:
    """(median, min) ms over repeats after warm-up, rotating input sets that together exceed L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sets = [_inputs(key, T, seed=i) for i in range(2)]
    per_set = sum(x.numel() * x.element_size() for x in sets[0][0])
    while len(sets) * per_set < 2 * l2 and len(sets) < 8:
        sets.append(_inputs(key, T, seed=len(sets)))
    for ins, outs, _ in sets[:2]:
        kernel(*ins, *outs)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        ins, outs, _ = sets[i % len(sets)]
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        kernel(*ins, *outs)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times[0]


def tune(problems: list[KernelKey], T: int = 16384, budget_minutes: float | None = None, jobs: int | None = None,
         say: Callable[[str], None] = print) -> list[dict]:
    """Search each problem's schedule space; returns the records written."""
    if not torch.cuda.is_available():
        raise RuntimeError("tuning needs a CUDA GPU (none found)")
    deadline = time.time() + budget_minutes * 60 if budget_minutes else math.inf
    fields = gpu_record_fields()
    written = []
    for problem in problems:
        path = log_path(problem.arch)
        seen = _done(path)
        logged = sum(pid == problem.problem_id for pid, _ in seen)
        cands, pruned = [], 0
        for s in search_space(problem):
            if (problem.problem_id, schedule_hash(s)) in seen:
                continue
            if check_schedule(problem, s) is None:
                cands.append(problem.with_schedule(s))
            else:
                pruned += 1
        say(f"{problem.problem_id}: {len(cands)} candidates to try ({pruned} pruned, {logged} already logged)")
        if not cands or time.time() > deadline:
            continue
        # Compile in parallel on the CPU cores, into the user cache; each later load is a disk hit.
        precompile_scheduled(cands, jobs)
        for i, key in enumerate(cands, 1):
            if time.time() > deadline:
                say("budget spent; rerun to resume")
                return written
            rec = dict(problem=key.problem_id, key=str(key), schedule=dict(key.schedule), T=T,
                       date=datetime.datetime.now().isoformat(timespec="seconds"), **fields)
            try:
                with _tilelang_cache_dir(versioned_dir() / "tilelang"):
                    kernel = compile_kernel(key)
                why = check_candidate(key, kernel)
                rec["correct"] = why is None
                if why:
                    rec["why"] = why
                else:
                    rec["median_ms"], rec["min_ms"] = time_candidate(key, kernel, T)
            except Exception as e:
                rec.update(correct=False, why=f"{type(e).__name__}: {str(e)[:300]}")
            _append(path, rec)
            written.append(rec)
            say(f"  [{i}/{len(cands)}] {key}: " + (f"{rec['median_ms']:.3f} ms" if rec.get("median_ms") else
                                                   f"rejected ({rec.get('why')})"))
    return written

