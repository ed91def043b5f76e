"""The kernel registry: one `KernelKind` per kind of kernel, the only place a kind is defined.

A kind names its problem parameters (in key order, with the short tags `KernelKey` prints), the
template family and part that build it, which head dims it reads, the tensors one launch takes (in
argument order: inputs, then the outputs the caller allocates), how tuning checks and times it, and,
for a forward kind, the backward kernels lowering adds for it, bound to the plan's tensor names.

Adding a kernel kind is one entry here plus its template (and its op). Imports nothing of ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BackwardCall:
    """One backward kernel a forward kind needs, bound to plan tensor names. inputs/outputs None:
    derived from the forward call ("do" + its inputs -> "d" + each input), for kinds whose forward
    reads a varying set of tensors (the gate combine)."""

    kind: str
    inputs: Optional[tuple[str, ...]] = None
    outputs: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class KernelKind:
    name: str
    params: tuple[tuple[str, str], ...]  # (problem parameter, key tag), in key order
    template: str  # module in templates/
    config: str  # its config dataclass
    part: Optional[str]  # the config's `part` where one template family builds several kinds
    # One launch's tensors (formal names), in argument order: the inputs, then the outputs the caller
    # allocates.
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    reads_qk: bool = True  # False: the key's head_dim is 0 (and scale None)
    reads_v: bool = True  # False: the key's v_head_dim is 0
    tuned_by: str = "direct"  # "direct": tuning launches the kernel alone; "op": through its op
    backward: tuple[BackwardCall, ...] = ()  # forward kinds: their backward kernels, in launch order
    backward_first: bool = False  # its backward runs before the other branches' (the gate's does)

    @property
    def args(self) -> tuple[str, ...]:
        return self.inputs + self.outputs

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.params)


_CMP = (("cmp_block", "l"), ("stride", "d"), ("first_block", "f"))
_SEL = (("sel_block", "bs"), ("top_n", "n"))
_TOPN = _CMP + _SEL + (("initial", "i"), ("local", "loc"))
_WIN = (("window", "w"),)
_GATE = (("branches", "b-"),)
# The four decode kernels (one step against a KV cache) share one problem: every branch's
# parameters, the new queries per sequence, whether the window has its own K/V, and the bound on
# the cache length they are built for (it sizes the top-n candidate merge).
_DECODE = _TOPN + (("window", "w"), ("q_len", "q"), ("separate_window", "sw"), ("max_seqlen", "ms"))

_GATE_SLOTS = ("o_cmp", "g_cmp", "o_slc", "g_slc", "o_win", "g_win")
_DQ = ("q", "k", "v", "o", "do", "lse", "dlse")
_DKDV = ("q", "k", "v", "do", "lse", "delta")

_ALL = (
    # ---- forward ----
    KernelKind("compression_fwd", _CMP, "compression_attention", "CompressionAttentionConfig", None,
               ("q", "k_cmp", "v_cmp", "seq_start", "cmp_start"), ("o", "lse"),
               backward=(BackwardCall("compression_bwd_dq",
                                      ("q", "k_cmp", "v_cmp", "o_cmp", "do_cmp", "lse_cmp", "dlse_cmp", "seq_start",
                                       "cmp_start"),
                                      ("dq", "delta_cmp")),
                         BackwardCall("compression_bwd_dkdv",
                                      ("q", "k_cmp", "v_cmp", "do_cmp", "lse_cmp", "delta_cmp", "row_first",
                                       "row_end"),
                                      ("dk_cmp", "dv_cmp")))),
    KernelKind("selection_topn", _TOPN, "selection_topn", "SelectionTopNConfig", None,
               ("q", "k_cmp", "lse_cmp", "seq_start", "cmp_start", "tile_start"), ("block_indices", "block_counts"),
               reads_v=False),
    KernelKind("selection_fwd", _SEL, "selection_attention", "SelectionAttentionConfig", None,
               ("q", "k", "v", "block_indices", "seq_start"), ("o", "lse"),
               backward=(BackwardCall("selection_bwd_dq",
                                      ("q", "k", "v", "o_slc", "do_slc", "lse_slc", "dlse_slc", "block_indices",
                                       "seq_start"),
                                      ("dq", "delta_slc")),
                         BackwardCall("selection_bwd_dkdv",
                                      ("q", "k", "v", "do_slc", "lse_slc", "delta_slc", "block_units"),
                                      ("dk_partial", "dv_partial")),
                         BackwardCall("selection_bwd_reduce", ("dk_partial", "dv_partial", "block_units"),
                                      ("dk", "dv")))),
    KernelKind("window_fwd", _WIN, "window_attention", "WindowAttentionConfig", None,
               ("q", "k", "v", "seq_start"), ("o", "lse"),
               backward=(BackwardCall("window_bwd_dq",
                                      ("q", "k_win", "v_win", "o_win", "do_win", "lse_win", "dlse_win", "seq_start"),
                                      ("dq", "delta_win")),
                         BackwardCall("window_bwd_dkdv",
                                      ("q", "k_win", "v_win", "do_win", "lse_win", "delta_win", "seq_start"),
                                      ("dk_win", "dv_win")))),
    # Every gate slot is an argument: a branch that is off gets another branch's tensors, never read.
    KernelKind("gate_combine", _GATE, "gate_combine", "GateCombineConfig", "fwd", _GATE_SLOTS, ("o",),
               reads_qk=False, backward=(BackwardCall("gate_combine_bwd"),), backward_first=True),
    # ---- backward (a backward kind has its forward's problem parameters) ----
    KernelKind("compression_bwd_dq", _CMP, "compression_attention_bwd", "CompressionAttentionBwdConfig", "dq",
               _DQ + ("seq_start", "cmp_start"), ("dq", "delta"), tuned_by="op"),
    # dk/dv partials [S, B, N, H, D] fp32 over S token splits, summed by the op in a fixed order;
    # row_first / row_end [N]: each compressed row's visible tokens (packing.compressed_row_spans).
    KernelKind("compression_bwd_dkdv", _CMP, "compression_attention_bwd", "CompressionAttentionBwdConfig", "dkdv",
               _DKDV + ("row_first", "row_end"), ("dk_partial", "dv_partial"), tuned_by="op"),
    KernelKind("selection_bwd_dq", _SEL, "selection_attention_bwd", "SelectionAttentionBwdConfig", "dq",
               _DQ + ("block_indices", "seq_start"), ("dq", "delta"), tuned_by="op"),
    # Over the transposed block map (ops.selection_block_units), one program per unit of tokens;
    # block_row0 / block_row_end: each block's keys (a pack's sequences tile from their own starts).
    KernelKind("selection_bwd_dkdv", _SEL, "selection_attention_bwd", "SelectionAttentionBwdConfig", "dkdv",
               _DKDV + ("tok_idx", "unit_block", "unit_start", "unit_end", "block_row0", "block_row_end"),
               ("dk_partial", "dv_partial"), tuned_by="op"),
    KernelKind("selection_bwd_reduce", _SEL, "selection_attention_bwd", "SelectionAttentionBwdConfig", "reduce",
               ("dk_partial", "dv_partial", "block_unit_start", "block_row0", "block_row_end"), ("dk", "dv"),
               tuned_by="op"),
    KernelKind("window_bwd_dq", _WIN, "window_attention_bwd", "WindowAttentionBwdConfig", "dq",
               _DQ + ("seq_start",), ("dq", "delta"), tuned_by="op"),
    KernelKind("window_bwd_dkdv", _WIN, "window_attention_bwd", "WindowAttentionBwdConfig", "dkdv",
               _DKDV + ("seq_start",), ("dk", "dv"), tuned_by="op"),
    KernelKind("gate_combine_bwd", _GATE, "gate_combine", "GateCombineConfig", "bwd",
               ("do",) + _GATE_SLOTS, tuple(f"d{x}" for x in _GATE_SLOTS), reads_qk=False, tuned_by="op"),
    # ---- decode: one step against an NSAKVCache (decode.nsa_decode launches them) ----
    KernelKind("decode_cmp", _DECODE, "decode_attention", "DecodeAttentionConfig", "cmp",
               ("q", "k_cmp", "v_cmp", "cache_seqlens"), ("scores", "score_max", "o_cmp_part", "lse_cmp_part"),
               tuned_by="op"),
    KernelKind("decode_topn", _DECODE, "decode_attention", "DecodeAttentionConfig", "topn",
               ("scores", "score_max", "lse_cmp_part", "cache_seqlens"), ("candidate_scores", "candidate_blocks"),
               tuned_by="op"),
    KernelKind("decode_sparse", _DECODE, "decode_attention", "DecodeAttentionConfig", "sparse",
               ("q", "kv_k", "kv_v", "cache_seqlens", "candidate_scores", "candidate_blocks"),
               ("block_indices", "o_slc_part", "lse_slc_part", "o_win_part", "lse_win_part"), tuned_by="op"),
    # The same cmp / sparse kernels over a paged cache (PagedNSAKVCache): pools of page_size rows; the
    # sequence lengths with each entry's block table after them ([B, 1 + pages]; templates say why).
    KernelKind("decode_cmp_paged", _DECODE + (("page_size", "pg"),), "decode_attention", "DecodeAttentionConfig",
               "cmp", ("q", "k_cmp_pool", "v_cmp_pool", "seqlens_cmp_table"),
               ("scores", "score_max", "o_cmp_part", "lse_cmp_part"), tuned_by="op"),
    KernelKind("decode_sparse_paged", _DECODE + (("page_size", "pg"),), "decode_attention", "DecodeAttentionConfig",
               "sparse", ("q", "kv_k_pool", "kv_v_pool", "seqlens_table", "candidate_scores", "candidate_blocks"),
               ("block_indices", "o_slc_part", "lse_slc_part", "o_win_part", "lse_win_part"), tuned_by="op"),
    KernelKind("decode_combine", _DECODE, "decode_attention", "DecodeAttentionConfig", "combine",
               ("o_cmp_part", "lse_cmp_part", "o_slc_part", "lse_slc_part", "o_win_part", "lse_win_part",
                "g_cmp", "g_slc", "g_win"), ("o",), tuned_by="op"),
)

KINDS: dict[str, KernelKind] = {k.name: k for k in _ALL}


def kind(name: str) -> KernelKind:
    """The registry entry of a kind, or a ValueError naming the known kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown kernel kind {name!r}; known: {list(KINDS)}") from None


def forward_of(name: str) -> Optional[str]:
    """The forward kind whose backward `name` is (None for a forward or decode kind)."""
    for k in _ALL:
        if any(b.kind == name for b in k.backward):
            return k.name
    return None
