"""How every benchmark here times: cases of one input set interleaved round by round, each launch
timed by CUDA events; median and interquartile range over all launches (>= 20 by default)."""
from __future__ import annotations

import sys
import time

import torch

_T0 = time.time()


def say(msg: str) -> None:
    """Progress with the seconds since start (stderr, unbuffered): a lent GPU's minutes are few."""
    print(f"[{time.time() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def timed_rounds(cases: dict, rounds: int, iters: int) -> dict:
    """{name: [ms per launch]}: cases interleaved round by round, every launch timed by events."""
    times = {name: [] for name in cases}
    for fn in cases.values():  # warm-up (clocks, first-launch costs)
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in cases.items():
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for a, b in evs:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            times[name] += [a.elapsed_time(b) for a, b in evs]
    return times


def stats(ms: list[float]) -> dict:
    t = torch.tensor(ms)
    q1, med, q3 = (torch.quantile(t, x).item() for x in (0.25, 0.5, 0.75))
    return dict(median_ms=med, q1_ms=q1, q3_ms=q3, n=len(ms))


class Rounds:
    """Collect the cases of one input set, then time them together (`timed_rounds`). A case whose
    first call fails is reported with its error instead of a time."""

    def __init__(self, rounds: int = 5, iters: int = 4):
        self.rounds, self.iters, self.cases = rounds, iters, {}

    def add(self, name: str, fn, **info) -> None:
        self.cases[name] = (fn, info)

    def run(self) -> list[dict]:
        """[dict(case, ms (the median), q1_ms, q3_ms, n, **info)] in the order added; ms None and
        error where the case failed."""
        ok, rows = {}, {}
        for name, (fn, info) in self.cases.items():
            try:
                fn()
                torch.cuda.synchronize()
                ok[name] = fn
            except Exception as e:
                rows[name] = dict(case=name, ms=None, error=f"{type(e).__name__}: {str(e)[:200]}", **info)
                say(f"{name}: FAILED {rows[name]['error']}")
        times = timed_rounds(ok, self.rounds, self.iters) if ok else {}
        for name, ms in times.items():
            st = stats(ms)
            rows[name] = dict(case=name, ms=st["median_ms"], q1_ms=st["q1_ms"], q3_ms=st["q3_ms"], n=st["n"],
                              **self.cases[name][1])
        self.cases = {}
        return [rows[n] for n in list(ok) + [n for n in rows if n not in ok]]
