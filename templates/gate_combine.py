"""Gated sum of the NSA branch outputs: out = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win, and its backward.

One memory-bound pass (fp32 math, one rounding at the end) instead of several PyTorch ones.
Layouts: O_* [B, T, HQ, Dv] and G_* [B, T, HQ] in the kernel dtype, Out [B, T, HQ, Dv].
The signatures always have three slots per branch; a branch that is off (not in `branches`) is
never read or written, so the caller may pass any tensor of the right shape in its place.

part "fwd": (O_cmp, G_cmp, O_slc, G_slc, O_win, G_win, Out)
part "bwd": (dOut, O_cmp, G_cmp, O_slc, G_slc, O_win, G_win,
             dO_cmp, dG_cmp, dO_slc, dG_slc, dO_win, dG_win)
            dO_x = g_x * dOut, dG_x = sum_d dOut * O_x (fp32 sums, one rounding).
"""
import dataclasses

import tilelang.language as T


@dataclasses.dataclass(frozen=True)
class GateCombineConfig:
    heads_q: int = 64
    head_dim_v: int = 128
    branches: str = "cmp.slc.win"  # the branches that are on, '.'-separated, in cmp, slc, win order
    dtype: str = "bfloat16"
    part: str = "fwd"  # "fwd" | "bwd"
    # schedule
    rows: int = 16  # (token, head) rows per program
    threads: int = 128


def check_config(cfg) -> None:
    if cfg.part not in ("fwd", "bwd"):
        raise ValueError(f"part: must be 'fwd' or 'bwd', got {cfg.part!r}")
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
    """The prim_func of cfg.part (signatures in the module docstring)."""
    check_config(cfg)
    if cfg.part == "bwd":
        return _build_bwd(cfg)
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


def _build_bwd(cfg):
    HQ, Dv, R, dtype = cfg.heads_q, cfg.head_dim_v, cfg.rows, cfg.dtype
    Dp = 1 << (Dv - 1).bit_length()
    f32 = "float32"
    on = set(cfg.branches.split("."))
    B, S = T.dynamic("B, T")

    @T.prim_func
    def gate_combine_bwd(
        dOut: T.Tensor([B, S, HQ, Dv], dtype),
        O_cmp: T.Tensor([B, S, HQ, Dv], dtype), G_cmp: T.Tensor([B, S, HQ], dtype),
        O_slc: T.Tensor([B, S, HQ, Dv], dtype), G_slc: T.Tensor([B, S, HQ], dtype),
        O_win: T.Tensor([B, S, HQ, Dv], dtype), G_win: T.Tensor([B, S, HQ], dtype),
        dO_cmp: T.Tensor([B, S, HQ, Dv], dtype), dG_cmp: T.Tensor([B, S, HQ], dtype),
        dO_slc: T.Tensor([B, S, HQ, Dv], dtype), dG_slc: T.Tensor([B, S, HQ], dtype),
        dO_win: T.Tensor([B, S, HQ, Dv], dtype), dG_win: T.Tensor([B, S, HQ], dtype),
    ):
        with T.Kernel(T.ceildiv(S * HQ, R), B, threads=cfg.threads) as (bx, b):
            do_f = T.alloc_fragment([R, Dv], f32)
            prod = T.alloc_fragment([R, Dv], f32)
            dg = T.alloc_fragment([R], f32)
            if Dp != Dv:
                prod_s = T.alloc_shared([R, Dv], f32)
            for r, d in T.Parallel(R, Dv):
                row = bx * R + r
                do_f[r, d] = T.if_then_else(row < S * HQ, T.cast(dOut[b, row // HQ, row % HQ, d], f32), 0)
            for o_x, g_x, do_x, dg_x, name in ((O_cmp, G_cmp, dO_cmp, dG_cmp, "cmp"),
                                                (O_slc, G_slc, dO_slc, dG_slc, "slc"),
                                                (O_win, G_win, dO_win, dG_win, "win")):
                if name in on:  # Python-level: an off branch emits no code at all
                    for r, d in T.Parallel(R, Dv):
                        row = bx * R + r
                        prod[r, d] = T.if_then_else(
                            row < S * HQ, do_f[r, d] * T.cast(o_x[b, row // HQ, row % HQ, d], f32), 0)
                        if row < S * HQ:
                            do_x[b, row // HQ, row % HQ, d] = T.cast(
                                do_f[r, d] * T.cast(g_x[b, row // HQ, row % HQ], f32), dtype)
                    if Dp == Dv:
                        T.reduce_sum(prod, dg, dim=1)
                    else:
                        # No reduce layout spans a row of Dv (not a power of two) elements over whole
                        # threads: the row is summed from shared memory by one thread per row.
                        T.copy(prod, prod_s)
                        for r in T.Parallel(R):
                            dg[r] = 0
                            for d in T.serial(Dv):
                                dg[r] += prod_s[r, d]
                    for r in T.Parallel(R):
                        row = bx * R + r
                        if row < S * HQ:
                            dg_x[b, row // HQ, row % HQ] = T.cast(dg[r], dtype)

    return gate_combine_bwd
