"""CI compiles every template for sm_90a (and the paper config for sm_80) on the CPU (nvcc, no GPU)."""
import re
import shutil

import pytest

from nsa_codegen import CompressionBranch, NSASpec, SelectionBranch, WindowBranch
from nsa_codegen.codegen import (_block_end, _nvdisasm, barriers_in_one_thread_branches, barriers_in_warp_branches, build_prim_func, check_schedule,
                                 tma_destinations_misaligned,
                                 compile_kernel, disassemble, ptxas_report, stages_freed_under_async_mma,
                                 template_config,
                                 thread_values_across_warp_split)
from nsa_codegen.lowering import lower_to_plan
from nsa_codegen.schedules import resolve_schedule

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")

PAPER = NSASpec(compression=CompressionBranch(32, 16, "mean"))
PAPER_FP16_D128 = NSASpec(head_dim=128, v_head_dim=128, dtype="float16")
G1 = NSASpec(heads=4, kv_heads=4, head_dim=64, v_head_dim=64, dtype="float16",
             compression=CompressionBranch(16, 16, "mean", 1), selection=SelectionBranch(32, 8, 1, 2),
             window=WindowBranch(64))
# Kernels whose sm90 code must use Hopper's warpgroup MMA.
CLAIMS_WGMMA = {"compression_fwd", "selection_topn", "window_fwd"}


def _calls(spec, arch="sm90", backward=False):
    plan = lower_to_plan(spec, arch)
    return [(c, spec) for c in (plan.all_calls if backward else plan.calls)]


def _scheduled(call):
    sched, _ = resolve_schedule(call.key, lambda s: check_schedule(call.key, s))
    return call.key.with_schedule(sched)


CASES = _calls(PAPER, backward=True) + _calls(G1) + _calls(PAPER, "sm80")


@needs_nvcc
@pytest.mark.compile
@pytest.mark.parametrize("call,spec", CASES, ids=[str(c.key) for c, _ in CASES])
def test_template_compiles(call, spec, tmp_path, monkeypatch):
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    key = _scheduled(call)
    kernel = compile_kernel(key)
    src = kernel.get_kernel_source()
    assert "__global__" in src
    if key.kind in CLAIMS_WGMMA and spec is PAPER and key.arch == "sm90":
        assert "wgmma" in src, f"{key} should lower its GEMMs to WGMMA on sm_90a"
        if _nvdisasm():  # and the machine code really issues Hopper's warpgroup MMA
            assert "HGMMA" in disassemble(kernel), f"{key}: no HGMMA in its SASS"
    if key.kind == "selection_fwd" and _nvdisasm():
        sass = disassemble(kernel)
        assert "HMMA" in sass or "HGMMA" in sass, f"{key}: no tensor-core MMA in its SASS"
    if key.arch == "sm80" and _nvdisasm():  # sm_80 and sm_90 machine code (it runs on an H100 too)
        targets = re.findall(r"\.target\s+(sm_\d+)", disassemble(kernel))
        assert sorted(targets) == ["sm_80", "sm_90"], f"{key}: SASS targets {targets}"


def test_barrier_in_a_one_thread_branch_is_found():
    """The deadlock the token tile's first build had on the H100 (a named barrier between the TMA
    loads, inside the elected thread's branch) is found; barriers outside such branches are not."""
    hang = """
    for (int it = 0; it < nu; ++it) {
      if (tl::tl_shuffle_elect<128>()) {
        mbarrier[0].arrive_and_expect_tx(24576);
        for (int i = 0; i < 3; ++i) {
          tl::__sync_thread_partial(4, 128);
          tl::tma_load(K_desc, mbarrier[0], K_s, i * 64, ((int*)Blk_s)[it] * 64);
        }
      }
    }
    if (((int)threadIdx.x) == 0) { if (c) { x = 1; } __syncthreads(); }"""
    found = barriers_in_one_thread_branches(hang)
    assert len(found) == 2 and "line 6" in found[0] and "__syncthreads" in found[1], found
    fine = """
    tl::__sync_thread_partial(4, 128);
    if (tl::tl_shuffle_elect<128>()) { mbarrier[0].arrive_and_expect_tx(24576); }
    __syncthreads();
    if (((int)threadIdx.x) == 0) { Num_s[0] = c; }
    __syncthreads();"""
    assert barriers_in_one_thread_branches(fine) == []


def test_barrier_in_a_per_warp_branch_is_found():
    """A barrier, or a reduction over more than one warp (tl::AllReduce syncs through shared memory
    above 32 threads), inside a branch on the warp index (warp_skip's per-warp block skip) is found;
    quad-wide reductions there, and barriers outside, are not."""
    branch = "if (-CUDART_INF_F < ((float*)Bias_s)[((((int64_t)it) * (int64_t)8) + (((int64_t)((int)threadIdx.x)) >> (int64_t)5))]) {"
    fine = f"""
    {branch}
      m[0] = tl::AllReduce<tl::MaxOp, 4, 1, 128, tl::NamedBarrier<256>>::run(m[0]);
    }}
    __syncthreads();"""
    assert barriers_in_warp_branches(fine) == []
    wide = fine.replace("MaxOp, 4,", "MaxOp, 64,")
    sync = fine.replace("run(m[0]);", "run(m[0]); __syncthreads();")
    plain = "if (((((int)threadIdx.x) >> 5) + t0) < S) { __syncthreads(); }"
    for src, what in ((wide, "AllReduce"), (sync, "__syncthreads"), (plain, "__syncthreads")):
        found = barriers_in_warp_branches(src)
        assert len(found) == 1 and what in found[0], found


def test_thread_values_across_a_warp_split_are_found():
    """The top-n's shifted rows on the H100 (2026-12-07): a row test computed from threadIdx.x above
    the producer / consumer split and read by the consumers, whose index TileLang remaps (- 128). A
    value the consumers compute themselves, or one only the producer reads, is fine."""
    bad = """
  int condval_1;
  if ((0 <= (((int)threadIdx.x) >> 4) + t0)) { condval_1 = SeqStart[(((int)threadIdx.x) >> 4) + t0]; } else { condval_1 = 0; }
  bool row_ok = ((live & (((((int)threadIdx.x) >> 4) + t0) < T)) & (condval_1 == s0));
  int nk = max(T, 1);
  if (((int)threadIdx.x) < 128) {
    if (row_ok) { x = nk; }
  } else {
    if (row_ok) { BlockIndices[(((int)threadIdx.x) >> 4) - 8] = nk; }
  }"""
    found = thread_values_across_warp_split(bad)
    assert len(found) == 1 and "`row_ok`" in found[0] and ">= 128" in found[0], found
    fine = bad.replace("if (row_ok) { BlockIndices", "if ((((int)threadIdx.x) >> 4) - 8 + t0 < T) { BlockIndices")
    assert thread_values_across_warp_split(fine) == []
    assert thread_values_across_warp_split(bad.replace("< 128", ">= 128")) != []   # consumers in the then-branch


def test_misaligned_tma_destinations_are_found():
    """The selection dK/dV async_mma kernel on the H100 (2026-12-07): a ring of 16 LSE floats a stage
    put every second stage's TMA destination 64 bytes off a 128-byte boundary (misaligned-address
    fault). Stages of 32 floats, or of 1024 halves, are fine; so is a misaligned base found as such."""
    src = """
  extern __shared__ __align__(1024) uchar buf_dyn_shmem[];
  void* QdO_s = ((void*)((char*)buf_dyn_shmem + 0));
  void* lse_s = ((void*)((char*)buf_dyn_shmem + 61568));
        tl::tma_load(Q_desc, mbarrier[(ci & 1)], (&(((half_t*)QdO_s)[(((ci & 1) * 5120) + (i_2 * 1024))])), (i_2 * 64), 0, t, b);
        tl::tma_load(LSE_desc, mbarrier[((ci & 1) + 4)], (&(((float*)lse_s)[((ci & 1) * 16)])), 0, t, b);"""
    found = tma_destinations_misaligned(src)
    assert len(found) == 1 and "LSE_desc into lse_s" in found[0], found
    assert tma_destinations_misaligned(src.replace("(ci & 1) * 16)", "(ci & 1) * 32)")) == []
    assert len(tma_destinations_misaligned(src.replace("61568", "61504").replace("* 16)", "* 32)"))) == 1
    assert len(tma_destinations_misaligned(src.replace("+ (i_2 * 1024)", "+ (i_2 * 1000)"))) == 2


@needs_nvcc
@pytest.mark.compile
@pytest.mark.parametrize("tile_tokens,mma", [(1, "HMMA"), (0, "HGMMA")])
@pytest.mark.parametrize("kind", ["selection_fwd", "selection_bwd_dq"])
def test_selection_schedules_compile(kind, tile_tokens, mma, tmp_path, monkeypatch):
    """Both schedules of the selection forward and of its dq kernel compile for sm_90a: per token
    on mma.sync, the paper config's token tile (auto: 4 tokens x 16 heads) on WGMMA; compile_kernel
    also rejects generated code with a barrier only one thread reaches."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    call = next(c for c in lower_to_plan(PAPER).all_calls if c.kind == kind)
    key = call.key.with_schedule({**dict(_scheduled(call).schedule), "tile_tokens": tile_tokens})
    kernel = compile_kernel(key)
    if _nvdisasm():
        assert mma in disassemble(kernel), f"{key}: no {mma} in its SASS"


@needs_nvcc
@pytest.mark.compile
@pytest.mark.parametrize("tile_tokens,threads", [(4, 128), (8, 256)])
def test_selection_warp_skip_compiles_on_mma_sync(tile_tokens, threads, tmp_path, monkeypatch):
    """The token tile's warp_skip schedule compiles for sm_90a on mma.sync only (a warp skips blocks
    on its own, which a warpgroup-wide WGMMA cannot), its per-warp branches hold no barrier
    (compile_kernel checks), and every warp tests the block bias of its own tokens."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    call = next(c for c in lower_to_plan(PAPER).all_calls if c.kind == "selection_fwd")
    key = call.key.with_schedule({**dict(_scheduled(call).schedule), "tile_tokens": tile_tokens,
                                  "threads": threads, "warp_skip": True})
    kernel = compile_kernel(key)
    src = kernel.get_kernel_source()
    assert "mma_sync" in src and "wgmma" not in src, f"{key}: not on mma.sync"
    # the producer warpgroup comes first: consumer warp w = (threadIdx.x >> 5) - 4 reads bias column w
    assert f"* (int64_t){tile_tokens}) + (((int64_t)((int)threadIdx.x)) >> (int64_t)5)) - (int64_t)4)]" in src
    if _nvdisasm():
        sass = disassemble(kernel)
        assert "HMMA" in sass and "HGMMA" not in sass, f"{key}: expected mma.sync only"


def test_stage_freed_under_a_running_wgmma_is_found():
    """A stage freed after an async WGMMA's issue but before its wait is reported; one freed after a
    full wait (or after waits that leave nothing pending) is not."""
    issue = "tl::warpgroup_arrive();\n wgmma(..);\n tl::warpgroup_commit_batch();\n"
    free = "mbarrier[((it & 1) + 2)].arrive();\n"
    assert stages_freed_under_async_mma(issue + issue + "tl::wait_wgmma<1>();\n" + free) != []
    assert stages_freed_under_async_mma(issue + free) != []
    assert stages_freed_under_async_mma(issue + issue + "tl::wait_wgmma<1>();\n" + issue +
                                        "tl::warpgroup_wait<0>();\n" + free) == []
    assert stages_freed_under_async_mma("mbarrier[0].arrive_and_expect_tx(64);\n" + issue) == []


ASYNC_SCHEDULES = [("compression_bwd_dkdv", {"kv_block_N": 128, "kv_block_M": 32, "kv_num_stages": 2,
                                             "kv_regs": True, "kv_async": True}),
                   ("window_bwd_dkdv", {"async_mma": True}),
                   ("selection_bwd_dkdv", {"async_mma": True})]


@needs_nvcc
@pytest.mark.compile
@pytest.mark.parametrize("kind,knobs", ASYNC_SCHEDULES, ids=[k for k, _ in ASYNC_SCHEDULES])
def test_async_wgmma_schedules_compile(kind, knobs, tmp_path, monkeypatch):
    """The dk/dv schedules with async WGMMA compile for sm_90a with their waits where the template
    puts them (S^T and dP^T in flight together, then one behind dV), no stage freed under a running
    WGMMA (compile_kernel checks), no wait ptxas had to inject and no spills."""
    from nsa_codegen.schedules import default_schedule
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    spec = NSASpec(compression=CompressionBranch(32, 16, "mean"), dtype="float16")
    call = next(c for c in lower_to_plan(spec).all_calls if c.kind == kind)
    kernel = compile_kernel(call.key.with_schedule({**default_schedule(call.key), **knobs}))
    src = kernel.get_kernel_source()
    assert src.count("wait_wgmma<1>") == 2, f"{kind}: expected two partial WGMMA waits"
    # ptxas serializes async WGMMA (and says so, C7517) when code touches an in-flight batch's registers
    report = ptxas_report(kernel)
    assert "C7517" not in report and "spill" in report, f"{kind}: {report}"
    if _nvdisasm():
        counts = sass_counts(disassemble(kernel))
        assert counts.get("HGMMA") and not counts.get("LDL", 0) + counts.get("STL", 0), counts


# Forward schedules that run the next chunk's score gemm as an async WGMMA under this chunk's SIMT
# work (kind, knobs, the SIMT instruction that must sit between the gemm's issue and its wait).
OVERLAP_SCHEDULES = [("selection_topn", {}, "exp2f"),
                     ("compression_fwd", {"overlap": True, "block_N": 64, "num_stages": 2}, "exp2f")]


@needs_nvcc
@pytest.mark.compile
@pytest.mark.parametrize("kind,knobs,simt", OVERLAP_SCHEDULES, ids=[k for k, _, _ in OVERLAP_SCHEDULES])
def test_overlap_schedules_run_simt_under_the_next_gemm(kind, knobs, simt, tmp_path, monkeypatch):
    """The top-n's and the compression forward's overlap schedules issue chunk kc's gemm as an async
    WGMMA, do chunk kc-1's SIMT work (exp2) before waiting for it, and free K's stage only after the
    wait (compile_kernel checks); ptxas keeps the WGMMA async (no C7517) with no spills."""
    from nsa_codegen.schedules import default_schedule
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    spec = NSASpec(compression=CompressionBranch(32, 16, "mean"), dtype="float16")
    call = next(c for c in lower_to_plan(spec).all_calls if c.kind == kind)
    kernel = compile_kernel(call.key.with_schedule({**default_schedule(call.key), **knobs}))
    src = kernel.get_kernel_source()
    issue, wait = src.index("warpgroup_commit_batch()"), src.index("wait_wgmma<0>")
    assert src.index(simt, issue) < wait, f"{kind}: the {simt} work must sit between the gemm's issue and its wait"
    report = ptxas_report(kernel)
    assert "C7517" not in report and "0 bytes spill stores" in report, report


def _chunk_loop_barriers(src: str) -> list[int]:
    """Barriers in the body of each `for (int kc...)` loop of generated CUDA (the top-n's chunks)."""
    counts = []
    for m in re.finditer(r"for \(int kc\w*[^\n]*\{", src):
        body = src[m.end():_block_end(src, m.end())]
        counts.append(len(re.findall(r"__syncthreads\(\)|__sync_thread_partial\(|bar\.sync", body)))
    return counts


@needs_nvcc
@pytest.mark.compile
@pytest.mark.parametrize("overlap,threads", [(True, 256), (False, 512)])
def test_topn_ring_halo_drops_the_halo_copy_and_barriers(overlap, threads, tmp_path, monkeypatch):
    """The top-n's ring_halo schedule keeps the previous chunk's group sums in place: its chunk loop
    has fewer barriers than the same schedule without it and no halo copy (a read of Pg_s stored
    back into Pg_s), and a barrier still separates the last chunk's reads from the merge. On 512
    threads (four consumer warpgroups, block_M 256, 96 registers a thread; without overlap, whose
    second score accumulator would spill) it compiles without spills."""
    from nsa_codegen.schedules import default_schedule
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    spec = NSASpec(compression=CompressionBranch(32, 16, "mean"), dtype="float16")
    call = next(c for c in lower_to_plan(spec).all_calls if c.kind == "selection_topn")
    kernels = {ring: compile_kernel(call.key.with_schedule({**default_schedule(call.key), "overlap": overlap,
                                                             "threads": threads, "block_M": 256, "ring_halo": ring}))
               for ring in (False, True)}
    srcs = {ring: kernel.get_kernel_source() for ring, kernel in kernels.items()}
    plain, ring = (max(_chunk_loop_barriers(srcs[r])) for r in (False, True))
    assert 0 < ring < plain, (ring, plain)
    copy = re.compile(r"\(\(float\*\)Pg_s\)\[[^\]]*\] = \(\(float\*\)Pg_s\)\[")
    assert copy.search(srcs[False]) and not copy.search(srcs[True])
    tail = srcs[True][srcs[True].rindex("wait_wgmma<0>" if overlap else "top_s[15] < cs"):]
    assert re.search(r"__syncthreads\(\)|__sync_thread_partial\(", tail[:tail.index("M_s")])
    report = ptxas_report(kernels[True])
    assert "0 bytes spill stores" in report, report


def test_configs_carry_the_spec_and_schedule():
    for call in lower_to_plan(PAPER_FP16_D128).calls:
        key = _scheduled(call)
        cfg = template_config(key)
        assert cfg.dtype == "float16" and cfg.heads_q == 64
        assert key.kind == "gate_combine" or cfg.heads_kv == 4
        for knob, value in key.schedule:
            assert getattr(cfg, knob) == value
        func, _ = build_prim_func(key)
        assert func is not None


def test_unknown_schedule_knob_is_named():
    key = lower_to_plan(PAPER).calls[0].key.with_schedule({"warp_size": 7})
    with pytest.raises(ValueError, match="warp_size"):
        template_config(key)


def test_selection_dkdv_async_schedule_states_its_limits():
    """The selection dK/dV async_mma schedule takes one token (G rows, the WGMMA N) a step and one
    warpgroup per 64 block rows: G not a multiple of 16, 32-row blocks, a thread count or chunk size
    other than its own are refused with the knob named; where it fits, its kernel is one program of
    two per SM."""
    from nsa_codegen.codegen import template_module
    from nsa_codegen.schedules import default_schedule

    def dkdv_key(spec):
        return next(c.key for c in lower_to_plan(spec, "sm90").all_calls if c.kind == "selection_bwd_dkdv")

    paper = dkdv_key(PAPER)
    ok = {**default_schedule(paper), "async_mma": True}
    assert check_schedule(paper, ok) is None
    assert "chunk_rows" in check_schedule(paper, {**ok, "chunk_rows": 32})
    assert "threads" in check_schedule(paper, {**ok, "threads": 256})
    g8 = dkdv_key(NSASpec(heads=16, kv_heads=2, head_dim=64, v_head_dim=64, compression=CompressionBranch(32, 16, "mean")))
    assert "G = 8" in check_schedule(g8, {**default_schedule(g8), "async_mma": True})
    bs32 = dkdv_key(NSASpec(compression=CompressionBranch(32, 16, "mean"), selection=SelectionBranch(32, 16, 1, 2)))
    assert "block" in check_schedule(bs32, {**default_schedule(bs32), "async_mma": True})
    cfg = template_config(paper.with_schedule(ok))
    tmpl = template_module("selection_attention_bwd")
    assert tmpl._threads(cfg) == 128 and tmpl._min_blocks(cfg) == 2


def test_shared_memory_limit_is_the_arch_s():
    """Every template sizes shared memory by the key's arch (kernel_key.SHARED_MEMORY): a schedule
    that fits the H100's 227 KiB but not the A100's 163 KiB is accepted for sm90 and refused for sm80,
    naming the limit; every config carries its arch's sizes."""
    import dataclasses
    from nsa_codegen.kernel_key import SHARED_MEMORY
    from nsa_codegen.schedules import default_schedule
    refused = set()
    for call in lower_to_plan(PAPER, "sm90").all_calls:
        k90 = call.key
        k80 = dataclasses.replace(k90, arch="sm80")
        for arch, key in (("sm90", k90), ("sm80", k80)):
            cfg = template_config(key.with_schedule(default_schedule(k90)))
            if hasattr(cfg, "smem_block"):
                assert (cfg.smem_block, cfg.smem_sm) == SHARED_MEMORY[arch]
        for knob in ("num_stages", "dq_num_stages", "kv_num_stages"):
            sched = dict(default_schedule(k90))
            if knob not in sched:
                continue
            for stages in (2, 3, 4):
                sched[knob] = stages
                if check_schedule(k90, sched) is None and (why := check_schedule(k80, sched)) is not None:
                    assert "shared memory" in why and "163 KiB" in why, why
                    refused.add(call.kind)
    assert {"selection_fwd", "window_fwd", "compression_bwd_dq", "window_bwd_dq"} <= refused, refused


def sass_counts(sass: str) -> dict:
    """Instruction counts by opcode (BRA, LDL, STL ...) in a disassembly."""
    counts = {}
    for op in re.findall(r"^\s+/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M):
        counts[op] = counts.get(op, 0) + 1
    return counts


# SASS budgets of the paper config's hot kernels (default knobs but the ones named): branches and
# local-memory accesses (spills). Each bound sits between the fixed code and a regression that cost
# time on the H100 (2026-12-07, a3fce66 vs f2eba11 on one machine): a select nvcc turned into two
# branches per copied row (per-token selection: 162 branches, 35.2 vs 26.7 ms at 64k), and-ed masks
# (compression dK/dV: 165), hoisted and spilled column offsets (token tile: 55 local accesses, 32.1
# vs 26.0 ms), an unrolled copy (dq tile: 1760). Fixed code: 45 / 40 / 107 branches; 37 / 22 local.
SASS_BUDGETS = [
    ("selection_fwd", {"tile_tokens": 1}, {"BRA": 80, "LDL+STL": 16}),
    ("selection_fwd", {"tile_tokens": 0}, {"LDL+STL": 46}),
    ("selection_bwd_dq", {"tile_tokens": 1}, {"BRA": 80, "LDL+STL": 16}),
    ("selection_bwd_dq", {"tile_tokens": 0}, {"LDL+STL": 46}),
    ("compression_bwd_dkdv", {}, {"BRA": 135}),
]


@needs_nvcc
@pytest.mark.compile
@pytest.mark.skipif(_nvdisasm() is None, reason="nvdisasm not found")
@pytest.mark.parametrize("kind,knobs,budget", SASS_BUDGETS, ids=[f"{k}-{v}" for k, v, _ in SASS_BUDGETS])
def test_hot_kernels_stay_within_their_sass_budget(kind, knobs, budget, tmp_path, monkeypatch):
    """Branches and spills of the paper config's hot kernels stay within the budgets above: a change
    that makes nvcc branch per copied row or spill in the main loop fails here, on the CPU, instead
    of showing up as a slower benchmark on the GPU."""
    from nsa_codegen.schedules import default_schedule
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    spec = NSASpec(compression=CompressionBranch(32, 16, "mean"), dtype="float16")
    call = next(c for c in lower_to_plan(spec).all_calls if c.kind == kind)
    key = call.key.with_schedule({**default_schedule(call.key), **knobs})
    counts = sass_counts(disassemble(compile_kernel(key)))
    for what, limit in budget.items():
        got = sum(counts.get(op, 0) for op in what.split("+"))
        assert got <= limit, f"{key}: {got} {what} instructions in its SASS, budget {limit}"
