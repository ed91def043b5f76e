"""Gated sum of the NSA branch outputs: out = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win.

One memory-bound pass (fp32 math, one rounding at the end) instead of several PyTorch ones.
Layouts: O_* [B, T, HQ, Dv] and G_* [B, T, HQ] in the kernel dtype, Out [B, T, HQ, Dv].
The signature always has three (O, G) pairs; a branch that is off (its bit not in `branches`) is
never read, so the caller may pass any tensor of the right shape in its place.
"""
import dataclasses

import tilelang.language as T


@dataclasses.dataclass(frozen=True)
class GateCombineConfig:
    heads_q: int = 64
    head_dim_v: int = 128
    branches: str = "cmp.slc.win"  # the branches that are on, '.'-separated, in cmp, slc, win order
    dtype: str = "bfloat16"
    # schedule
    rows: int = 16  # (token, head) rows per program
    threads: int = 128


def check_config(cfg) -> None:
    names = cfg.branches.split(".")
    if not names or any(n not in ("cmp", "slc", "win") for n in names) or len(set(names)) != len(names):
        raise ValueError(f"branches: must name some of cmp, slc, win once each, got {cfg.branches!r}")
    if cfg.dtype not in ("float16", "bfloat16"):
        raise ValueError(f"dtype: must be float16 or bfloat16, got {cfg.dtype!r}")
    if cfg.rows not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError("rows: must be a power of two up to 64")
    if cfg.threads not in (64, 128, 256):
        raise ValueError("threads: must be 64, 128 or 256")
    if (cfg.rows * cfg.head_dim_v) % (cfg.threads * 8):
        raise ValueError("rows: rows * head_dim_v must be a multiple of 8 * threads (16-byte accesses)")


def build(cfg):
    """(O_cmp, G_cmp, O_slc, G_slc, O_win, G_win, Out) -> writes Out."""
    check_config(cfg)
    HQ, Dv, R, dtype = cfg.heads_q, cfg.head_dim_v, cfg.rows, cfg.dtype
    on = set(cfg.branches.split("."))
    use_cmp, use_slc, use_win = "cmp" in on, "slc" in on, "win" in on
    B, S = T.dynamic("B, T")

    @T.prim_func
    def gate_combine(
        O_cmp: T.Tensor([B, S, HQ, Dv], dtype), G_cmp: T.Tensor([B, S, HQ], dtype),
        O_slc: T.Tensor([B, S, HQ, Dv], dtype), G_slc: T.Tensor([B, S, HQ], dtype),
        O_win: T.Tensor([B, S, HQ, Dv], dtype), G_win: T.Tensor([B, S, HQ], dtype),
        Out: T.Tensor([B, S, HQ, Dv], dtype),
    ):
        # Rows are (token, head) pairs, flattened so that a program covers R consecutive heads/tokens.
        with T.Kernel(T.ceildiv(S * HQ, R), B, threads=cfg.threads) as (bx, b):
            acc = T.alloc_fragment([R, Dv], "float32")
            T.clear(acc)
            for r, d in T.Parallel(R, Dv):
                row = bx * R + r
                if row < S * HQ:
                    t = row // HQ
                    h = row % HQ
                    if use_cmp:
                        acc[r, d] += T.cast(O_cmp[b, t, h, d], "float32") * T.cast(G_cmp[b, t, h], "float32")
                    if use_slc:
                        acc[r, d] += T.cast(O_slc[b, t, h, d], "float32") * T.cast(G_slc[b, t, h], "float32")
                    if use_win:
                        acc[r, d] += T.cast(O_win[b, t, h, d], "float32") * T.cast(G_win[b, t, h], "float32")
                    Out[b, t, h, d] = T.cast(acc[r, d], dtype)

    return gate_combine
