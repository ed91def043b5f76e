"""The checks every template's check_config shares: the problem fields (the spec's support matrix).

Validation only: it shapes no generated code, so codegen leaves it out of build fingerprints
(nsa_codegen.codegen._VALIDATION_ONLY); shared modules that shape code are hashed with their templates.
"""
import math

GROUPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
HEAD_DIMS = (64, 128, 192, 256)
V_HEAD_DIMS = (64, 128)


def check_problem(cfg, dk: str = "head_dim_qk", dv: str | None = "head_dim_v", parts=None) -> None:
    """Raise ValueError naming the field: dtype, part (when `parts` is given), heads_q / heads_kv
    and their group, the q/k head dim (field `dk`), the v head dim (field `dv`; None: no V) and scale."""
    if cfg.dtype not in ("float16", "bfloat16"):
        raise ValueError(f"dtype: must be float16 or bfloat16, got {cfg.dtype!r}")
    if parts is not None and cfg.part not in parts:
        raise ValueError(f"part: must be one of {tuple(parts)}, got {cfg.part!r}")
    if cfg.heads_kv < 1 or cfg.heads_q % cfg.heads_kv != 0:
        raise ValueError("heads_q: must be a positive multiple of heads_kv")
    if cfg.heads_q // cfg.heads_kv not in GROUPS:
        raise ValueError(f"heads_q: group size heads_q/heads_kv must be one of {GROUPS}")
    if getattr(cfg, dk) not in HEAD_DIMS:
        raise ValueError(f"{dk}: must be one of 64, 128, 192, 256")
    if dv is not None and getattr(cfg, dv) not in V_HEAD_DIMS:
        raise ValueError(f"{dv}: must be 64 or 128")
    if not (isinstance(cfg.scale, (int, float)) and math.isfinite(cfg.scale) and cfg.scale > 0):
        raise ValueError("scale: must be a positive finite float")


def warps_cover(n: int, n_split: int) -> bool:
    """Whether n_split warps side by side each get a whole number of 8-column MMA tiles of an N = n
    gemm (TileLang's FullRow partition needs it: N = 48 over 4 warps does not split)."""
    return n % (8 * n_split) == 0
