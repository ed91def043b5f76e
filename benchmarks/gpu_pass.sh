#!/usr/bin/env bash
# One GPU pass on the lent H100. Logs and results go to $OUT.
#   bash benchmarks/gpu_pass.sh [tests|bench|first|all|bwdtests|bwdbench|train|decodetests|decodebench|tune|selection]
#   tests: forward GPU tests; bwdtests: backward GPU tests; bench / bwdbench: forward / forward+backward
#   benchmarks; first: first-call latency; train: benchmarks/train_tiny.py; decodetests: the KV cache,
#   decode and layer GPU tests; decodebench: benchmarks/bench_decode.py; tune: `nsa-codegen tune` of the
#   default set for $2 minutes (records appended to $OUT/tuning_logs/sm90/, seeded from the repo's);
#   selection: the selection forward schedule tests, then benchmarks/bench_selection.py ($2: its args)
#   paper: benchmarks/bench_paper.py ($2: its args), the paper config end to end against dense
#   tiles: the token-tile pass, each step under its own time limit: the selection forward schedule
#          tests, the selection dq tests, bench_paper.py --backward ($2: its --T), bench_selection.py,
#          the decode GPU tests (tests/test_decode.py; their kernels are prebuilt)
#   tilesquick: the same on the paper config only, without bench_selection (about 5 minutes)
#   packs: tests/test_ops.py (packs in one launch included), the selection and pack backward tests,
#          bench_packed.py, bench_paper.py --backward ($2: its --T); packsquick: the same in about 7 minutes;
#          packsmini: the pack / tile tests, bench_packed.py and bench_paper.py --T 8192 (about 4.5 minutes)
#   profile: benchmarks/profile_paper.py, the paper config's forward + backward per CUDA kernel ($2: its T)
#   recall: benchmarks/bench_recall.py (MQAR, NSA vs dense vs sliding window; $2: its args)
#   decodecold: benchmarks/bench_decode_cold.py (decode step on cold rotating caches vs SDPA backends; $2: its args)
#   sanitize: compute-sanitizer memcheck, racecheck and synccheck over benchmarks/sanitize_kernels.py
#             (every kernel kind on small ragged shapes; prebuilt kernels)
#   pending: what 2026-12-07 left unrun on the GPU, in one pass (about 8 minutes): the selection / pack /
#            NaN / window / new-cell forward tests, every backward test (the G = 6 / 12 dk/dv fix and the
#            compiled packed step of da97536 have not run), the decode GPU tests, then bench_paper.py
#            --backward at 8k and 64k
#   asyncmma: bench_paper.py --backward ($2: its --T; default 8192 65536; 5 rounds x 4 launches), every
#            backward test (with the compression / window dk/dv schedule tests), the decode GPU tests
#            (paged decode included)
#   round2: bench_paper.py --backward --configs cmp_async cmp_async_s8, the paged decode tests, the backward
#          tests after test_compiled_training_step, bench_decode_cold.py (B 1, 16 at 64k, paged beside)
#   round3: the backward tests of the compression branch, packs and the layer (not torch.compile), then
#          bench_paper.py --backward --configs cmp_smem (the compression dK/dV default against the earlier one)
#   round3min: round3 in about 4 minutes (the compression backward tests; the A/B without per-kernel cases)
#   ncu: Nsight Compute sections of our kernels in one paper-config step (benchmarks/ncu_paper.py; $2: T,
#        $3: kernel-name regex, $4: a bench_paper config; NCU_LAUNCHES: how many matching launches)
#   pending2: what the afternoon of 2026-12-07 left unrun (window dK/dV rewrite, selection dK/dV
#        async_mma with LSE from the producer: tests, bench_paper, ncu of both dK/dV schedules)
#   trained: benchmarks/trained_selections.py (a byte-level NSA model trained here; its block lists'
#            locality at 8k and 64k), then bench_paper.py --backward --lists-file on them (the paper
#            config end to end, its selection kernels on the trained lists too, and the step estimated there)
#   probe: benchmarks/probe_matrix.py --run: the candidate cells outside the support matrix (head dims
#          96 / 160 / 32) against the reference, forward, backward and top-n (their kernels prebuilt)
#   pending3: what the evening of 2026-12-07 left unrun (about 8 minutes): the selection dK/dV tests of
#            both schedules (async_mma's aligned LSE / Delta ring; the cp.async dS^T select) and every
#            NaN-Delta test, the candidate head-dim cells (probe_matrix.py --run), then bench_paper.py
#            --backward with the async dK/dV configs; then re-tune the default dK/dV (its records are
#            stale): tune 3 "--kernel sm90/selection_bwd_dkdv/fp16/dk192_dv128/h4_g16/bs64_n16"
#   pending4: the top-n and compression forward overlap schedules (their tests over the matrix, bench_paper.py
#            --configs topn_sync cmp_overlap at 8k / 64k), then pending3's tests: selection dK/dV
#            schedules, NaN-Delta, probe_matrix.py --run
#   pending5: the selection token tile's warp_skip schedule (forward and dq): its tests over the matrix (with the
#            value guard's NaN-value pack test,
#            the NaN-key / NaN-Delta tests), then bench_paper.py (forward) --configs tile8 ws4 ws4_mb1 ws8 at
#            8k / 64k; `trained` times the same configurations on a trained model's lists. Also the top-n's
#            ring_halo and 512-thread schedules (their tests, bench_paper.py configs topn_ring / topn_ring_sync /
#            topn_t512 / topn_t512_ring)
#   pytest: python3 -m pytest -q $2 [-k "$PYTEST_K"] (any GPU tests, with the prebuilt kernels)
#   ab: bench_paper.py of an older commit (.ab/baseline.tar.xz from benchmarks/make_baseline.py REV:
#       its source and its own prebuilt kernels), then of this tree, on the same machine ($2: their
#       args; default --backward --T 8192 65536 --rounds 3 --iters 4); carry .ab
# Kernels: carry .gen (python benchmarks/prebuild.py, here on the CPU) and they load prebuilt, with
# no compile on the GPU's clock; anything not prebuilt compiles there, slowly.
set -uo pipefail
what=${1:-all}
mkdir -p /tmp/site
[ -f .gpu/site.tar.xz ] && tar -C /tmp/site -xJf .gpu/site.tar.xz
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NSA_CODEGEN_CACHE_DIR=/tmp/nsacache
if [ -f .gen/generated.tar.xz ]; then
  mkdir -p /tmp/gen/generated && tar -C /tmp/gen/generated -xJf .gen/generated.tar.xz
  export NSA_CODEGEN_GENERATED_DIR=/tmp/gen/generated
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -x tests/test_ops.py ${2:+-k "$2"} 2>&1 | tee "$OUT/tests.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [[ $what == bwdtests ]]; then
  python3 -m pytest -q tests/test_ops_backward.py ${2:+-k "$2"} 2>&1 | tee "$OUT/bwdtests.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [[ $what == selection ]]; then
  date
  python3 -m pytest -q tests/test_ops.py -k "schedules or token_tile" 2>&1 | tee "$OUT/selection_tests.log" | tail -25
  rc=${PIPESTATUS[0]}
  date
  python3 benchmarks/bench_selection.py --out "$OUT" ${2:-} 2>&1 | tee "$OUT/selection_bench.log" | grep -v "^|" | tail -60
  date
fi
if [[ $what == paper ]]; then
  python3 benchmarks/bench_paper.py --out "$OUT" ${2:-} 2>&1 | tee "$OUT/paper_bench.log" | grep -v "^|" | tail -60
  rc=${PIPESTATUS[0]}
fi
if [[ $what == tiles ]]; then
  Ts=${2:-8192 65536}
  date; timeout 90 python3 -m pytest -q tests/test_ops.py -k "schedules or token_tile" 2>&1 | tee "$OUT/selection_tests.log" | tail -8
  rc=${PIPESTATUS[0]}
  date; timeout 110 python3 -m pytest -q tests/test_ops_backward.py -k "selection_dq" 2>&1 | tee "$OUT/dq_tests.log" | tail -8
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 180 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T $Ts 2>&1 | tee "$OUT/paper_bench.log" | grep -v "^|" | tail -45
  date; timeout 80 python3 benchmarks/bench_selection.py --out "$OUT" --T 65536 --configs paper 2>&1 | tee "$OUT/selection_bench.log" | grep -v "^|" | tail -25
  date; timeout 90 python3 -m pytest -q tests/test_decode.py -m gpu 2>&1 | tee "$OUT/decode_tests.log" | tail -5
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date
fi
if [[ $what == packs ]]; then   # packs in one launch + the token-tile fixes: tests, then the paper and selection benchmarks
  date; timeout 150 python3 -m pytest -q -x tests/test_ops.py 2>&1 | tee "$OUT/ops_tests.log" | tail -12
  rc=${PIPESTATUS[0]}
  date; timeout 130 python3 -m pytest -q tests/test_ops_backward.py -k "selection or pack or cu_seqlens" 2>&1 | tee "$OUT/bwd_tests.log" | tail -8
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 120 python3 benchmarks/bench_packed.py --out "$OUT" --backward 2>&1 | tee "$OUT/packed_bench.log" | grep -v "^|" | tail -16
  date; timeout 150 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T ${2:-8192 65536} 2>&1 | tee "$OUT/paper_bench.log" | grep -v "^|" | tail -32
  date
fi
if [[ $what == packsquick ]]; then   # packs on a short device budget (about 7 minutes)
  date; timeout 110 python3 -m pytest -q -x tests/test_ops.py 2>&1 | tee "$OUT/ops_tests.log" | tail -12
  rc=${PIPESTATUS[0]}
  date; timeout 90 python3 -m pytest -q tests/test_ops_backward.py -k "selection_dq or pack or cu_seqlens" 2>&1 | tee "$OUT/bwd_tests.log" | tail -8
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 80 python3 benchmarks/bench_packed.py --out "$OUT" --rounds 4 --iters 5 2>&1 | tee "$OUT/packed_bench.log" | grep -v "^|" | tail -16
  date; timeout 130 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T ${2:-8192 65536} 2>&1 | tee "$OUT/paper_bench.log" | grep -v "^|" | tail -32
  date
fi
if [[ $what == packsmini ]]; then   # the packs' and tiles' correctness first, then the packed benchmark (~4.5 min)
  date; timeout 100 python3 -m pytest -q -x tests/test_ops.py -k "pack or cu_seqlens or schedules or token_tile or window or compression or topn" 2>&1 | tee "$OUT/ops_tests.log" | tail -12
  rc=${PIPESTATUS[0]}
  date; timeout 60 python3 -m pytest -q tests/test_ops_backward.py -k "(selection_dq and (g8 or paper or masks)) or pack or cu_seqlens" 2>&1 | tee "$OUT/bwd_tests.log" | tail -8
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 70 python3 benchmarks/bench_packed.py --out "$OUT" --workloads docs64 8x16k --rounds 4 --iters 5 2>&1 | tee "$OUT/packed_bench.log" | grep -v "^|" | tail -16
  date; timeout 45 python3 benchmarks/bench_paper.py --out "$OUT" --T 8192 --rounds 4 --iters 5 2>&1 | tee "$OUT/paper_bench.log" | grep -v "^|" | grep "T=\|check"
  date
fi
if [[ $what == tilesquick ]]; then   # the tiles pass on the paper config only, for a short device budget
  date; timeout 70 python3 -m pytest -q tests/test_ops.py -k "token_tile or (schedules and paper)" 2>&1 | tee "$OUT/selection_tests.log" | tail -6
  rc=${PIPESTATUS[0]}
  date; timeout 80 python3 -m pytest -q tests/test_ops_backward.py -k "(selection_dq and paper) or dq_token_tile" 2>&1 | tee "$OUT/dq_tests.log" | tail -6
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout ${PAPER_LIMIT:-150} python3 benchmarks/bench_paper.py --out "$OUT" ${PAPER_ARGS---backward} --T ${2:-65536 8192} --rounds 4 --iters 5 2>&1 | tee "$OUT/paper_bench.log" | grep -v "^|" | tail -40
  date
fi
if [[ $what == topnfix ]]; then   # the top-n row fix: its tests, the pack benchmark's pack vs loop, bench_paper's checks (~3.5 min)
  date; timeout 100 python3 -m pytest -q -x tests/test_ops.py -k "topn or pack or cu_seqlens" 2>&1 | tee "$OUT/ops_tests.log" | tail -6
  rc=${PIPESTATUS[0]}
  date; timeout 60 python3 benchmarks/bench_packed.py --out "$OUT" --workloads docs64 --rounds 3 --iters 3 2>&1 | tee "$OUT/packed_bench.log" | grep -v "^|" | tail -8
  date; timeout 50 python3 benchmarks/bench_paper.py --out "$OUT" --T 8192 --rounds 3 --iters 4 --no-kernels 2>&1 | tee "$OUT/paper_bench.log" | grep -v "^|" | grep "T=\|check\|Error"
  date
fi
if [[ $what == profile ]]; then   # where a paper-config training step spends its time, per kernel (~1 min)
  date; timeout 100 python3 benchmarks/profile_paper.py --out "$OUT" --T ${2:-65536} 2>&1 | tee "$OUT/profile.log" | tail -30
  rc=${PIPESTATUS[0]}
fi
if [[ $what == recall ]]; then   # learning quality: MQAR, NSA vs dense vs sliding window
  python3 benchmarks/bench_recall.py --out "$OUT" ${2:-} 2>&1 | tee "$OUT/recall.log" | grep -v "^|" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [[ $what == decodecold ]]; then
  timeout 300 python3 benchmarks/bench_decode_cold.py --out "$OUT" ${2:-} 2>&1 | tee "$OUT/decode_cold.log" | tail -20
  rc=${PIPESTATUS[0]}
fi
if [[ $what == sanitize ]]; then   # every kernel kind under compute-sanitizer (Firecracker machines only)
  for tool in memcheck racecheck synccheck; do
    date; timeout 170 compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/sanitize_kernels.py \
      > "$OUT/sanitize_$tool.log" 2>&1
    r=$?; echo "$tool: exit $r"; tail -4 "$OUT/sanitize_$tool.log"; [ $r -ne 0 ] && rc=1
  done
fi
if [[ $what == pending ]]; then
  date; timeout 160 python3 -m pytest -q tests/test_ops.py -k "pack or schedules or selection or nan or window or g6_h48 or g12_paper or g64 or win16 or window_sizes or seed_l256" 2>&1 | tee "$OUT/ops_tests.log" | tail -15
  rc=${PIPESTATUS[0]}
  date; timeout 240 python3 -m pytest -q tests/test_ops_backward.py 2>&1 | tee "$OUT/bwd_tests.log" | tail -15
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 120 python3 -m pytest -q tests/test_decode.py -m gpu 2>&1 | tee "$OUT/decode_tests.log" | tail -10
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 120 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T 8192 65536 --rounds 3 --iters 4 2>&1 | tee "$OUT/paper_bench.log" | grep "T=\|check"
  date
fi
if [[ $what == asyncmma ]]; then   # the paper config (async dK/dV configurations), every backward test, the decode tests (paged)
  date; timeout 200 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T ${2:-8192 65536} --rounds 5 --iters 4 2>&1 | tee "$OUT/paper_bench.log" | grep "T=\|check\|not timed"
  date; timeout 250 python3 -m pytest -q tests/test_ops_backward.py 2>&1 | tee "$OUT/bwd_tests.log" | tail -15
  rc=${PIPESTATUS[0]}
  date; timeout 90 python3 -m pytest -q tests/test_decode.py -m gpu 2>&1 | tee "$OUT/decode_tests.log" | tail -8
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date
fi
if [[ $what == round2 ]]; then   # compression dK/dV splits, paged decode, the backward tests the asyncmma pass left unrun, paged cold decode
  date; timeout 150 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T 8192 65536 --rounds 5 --iters 4 --configs cmp_async cmp_async_s8 2>&1 | tee "$OUT/paper_bench.log" | grep "T=\|not timed"
  date; timeout 60 python3 -m pytest -q tests/test_decode.py -m gpu -k paged 2>&1 | tee "$OUT/decode_tests.log" | tail -8
  rc=${PIPESTATUS[0]}
  date; timeout 200 python3 -m pytest -q tests/test_ops_backward.py -k "compiled_packed or block_units or gradients_of_a_pack or packs_block_map" 2>&1 | tee "$OUT/bwd_tail.log" | tail -8
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 150 python3 benchmarks/bench_decode_cold.py --out "$OUT" --contexts 65536 --batches 1 16 --rounds 5 --iters 8 2>&1 | tee "$OUT/decode_cold.log" | tail -14
  date
fi
if [[ $what == round3 ]]; then   # the compression dK/dV default (async, 16 splits) through the backward tests, then against the smem schedule
  date; timeout 240 python3 -m pytest -q tests/test_ops_backward.py -k "not compiled and (cmp or compression or nsa_attention_gradients or pack or block_units or layer or bit_identical)" 2>&1 | tee "$OUT/bwd_tests.log" | tail -8
  rc=${PIPESTATUS[0]}
  date; timeout 150 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T 8192 65536 --rounds 5 --iters 4 --configs cmp_smem 2>&1 | tee "$OUT/paper_bench.log" | grep "T=\|not timed"
  date
fi
if [[ $what == round3min ]]; then   # round3 in about 4 minutes: the compression backward tests (Dk = 256's fallback included), then the A/B
  date; timeout 100 python3 -m pytest -q tests/test_ops_backward.py -k "(cmp and not compiled) or compression_dkdv_schedules" 2>&1 | tee "$OUT/bwd_tests.log" | tail -6
  rc=${PIPESTATUS[0]}
  date; timeout 120 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T 8192 65536 --rounds 5 --iters 4 --no-kernels --configs cmp_smem 2>&1 | tee "$OUT/paper_bench.log" | grep "T=\|not timed"
  date
fi
if [[ $what == ncu ]]; then   # Nsight Compute over one paper-config step ($2: T, default 16384; $3: kernel regex; $4: a bench_paper config)
  # The first launch of each matching kernel (the warm-up step's: the same kernels), not a
  # cudaProfilerStart range: that attempt (2026-12-07) profiled nothing and said nothing.
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  date; timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none -k "regex:${3:-main_kernel|attention|gate_combine}" \
    --launch-count ${NCU_LAUNCHES:-12} \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
    --section WarpStateStats --section LaunchStats --section SchedulerStats \
    --csv --page details python3 benchmarks/ncu_paper.py --T ${2:-16384} ${4:+--config $4} \
    > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  rc=$?; echo "ncu rc $rc"; tail -5 "$OUT/ncu.err"; wc -l "$OUT/ncu.csv"
fi
if [[ $what == pending2 ]]; then   # what 2026-12-07 (afternoon) left unrun, about 8 minutes
  # 1. the window dK/dV rewrite (2afef27): its schedule tests, branch / pack / NaN tests
  date; timeout 150 python3 -m pytest -q tests/test_ops_backward.py -k "(win or window) and not compiled" 2>&1 \
    | tee "$OUT/window_tests.log" | tail -4
  rc=${PIPESTATUS[0]}
  # 2. the selection dK/dV async_mma schedule with LSE / Delta from the producer (7704e81)
  date; timeout 100 python3 -m pytest -q tests/test_ops_backward.py -k "(selection_dkdv_schedules and async and not pack) or nan_delta" 2>&1 \
    | tee "$OUT/sel_async_tests.log" | tail -3
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  # 3. both against the cp.async schedule and the earlier window numbers, one run
  date; timeout 150 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T 8192 65536 --rounds 5 --iters 4 \
    --configs sel_async sel_async_s4 2>&1 | tee "$OUT/paper_bench.log" | grep "T=.*_bwd\|T=.*ours\|not timed"
  # 4. where the selection dK/dV time goes (both schedules)
  NCU_TIMEOUT=50 NCU_LAUNCHES=1 bash "$0" ncu 16384 selection_attention_bwd_dkdv 2>&1 | tail -3
  cp "$OUT/ncu.csv" "$OUT/ncu_sel_dkdv.csv"
  NCU_TIMEOUT=50 NCU_LAUNCHES=1 bash "$0" ncu 16384 selection_attention_bwd_dkdv sel_async 2>&1 | tail -3
  cp "$OUT/ncu.csv" "$OUT/ncu_sel_dkdv_async.csv"
  date
fi
if [[ $what == trained ]]; then   # about 6 minutes
  date; timeout 200 python3 benchmarks/trained_selections.py --out "$OUT" --max-train-seconds 120 ${2:-} 2>&1 \
    | tee "$OUT/trained.log" | tail -14
  rc=${PIPESTATUS[0]}
  lists=$(ls "$OUT"/*-trained_selections-lists.pt 2>/dev/null | head -1)
  if [ -n "$lists" ]; then   # the paper config end to end, its selection kernels on those lists too
    mv "$lists" /tmp/trained-lists.pt   # not brought back (tens of MB); the json / md hold the union sizes
    date; timeout 200 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T 8192 65536 --rounds 5 --iters 4 \
      --configs tile8 ws4 ws4_mb1 ws8 --lists-file /tmp/trained-lists.pt 2>&1 | tee "$OUT/paper_bench.log" | grep "^T=\|^- T="
  fi
  date
fi
if [[ $what == probe ]]; then
  date; timeout 300 python3 benchmarks/probe_matrix.py --run --out "$OUT" ${2:-} 2>&1 | tee "$OUT/probe.log" | tail -12
  rc=${PIPESTATUS[0]}
fi
if [[ $what == pending3 ]]; then
  date; timeout 150 python3 -m pytest -q tests/test_ops_backward.py -k "selection_dkdv_schedules or nan_delta" 2>&1 \
    | tee "$OUT/sel_dkdv_tests.log" | tail -6
  rc=${PIPESTATUS[0]}
  date; timeout 150 python3 benchmarks/probe_matrix.py --run --out "$OUT" 2>&1 | tee "$OUT/probe.log" | tail -6
  date; timeout 170 python3 benchmarks/bench_paper.py --out "$OUT" --backward --T 8192 65536 --rounds 5 --iters 4 \
    --configs sel_async sel_async_s4 2>&1 | tee "$OUT/paper_bench.log" | grep "T=.*_bwd\|T=.*ours\|not timed"
  date
fi
if [[ $what == pending4 ]]; then   # the top-n overlap schedule, then what pending3 verified (about 9 minutes)
  date; timeout 150 python3 -m pytest -q tests/test_ops.py -k "topn or compression_attention" 2>&1 | tee "$OUT/overlap_tests.log" | tail -6
  rc=${PIPESTATUS[0]}
  date; timeout 100 python3 benchmarks/bench_paper.py --out "$OUT" --T 8192 65536 --rounds 5 --iters 4 \
    --configs topn_sync cmp_overlap 2>&1 | tee "$OUT/paper_bench.log" | grep "T=.*topn\|T=.*compression\|T=.*ours\|not timed"
  date; timeout 150 python3 -m pytest -q tests/test_ops_backward.py -k "selection_dkdv_schedules or nan_delta" 2>&1 \
    | tee "$OUT/sel_dkdv_tests.log" | tail -6
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  if [ -z "${SKIP_PROBE:-}" ]; then
    date; timeout 150 python3 benchmarks/probe_matrix.py --run --out "$OUT" 2>&1 | tee "$OUT/probe.log" | tail -6
  fi
  date
fi
if [[ $what == pending5 ]]; then   # the selection token tile's warp_skip schedule (about 9 minutes)
  date; timeout 200 python3 -m pytest -q tests/test_ops.py \
    -k "selection_attention_schedules or token_tile_masks or nan_value or keeps_a_nan or topn" 2>&1 \
    | tee "$OUT/sel_fwd_tests.log" | tail -6
  rc=${PIPESTATUS[0]}
  date; timeout 200 python3 -m pytest -q tests/test_ops_backward.py -k "selection_dq_schedules or nan_key_after or nan_delta" \
    2>&1 | tee "$OUT/sel_dq_tests.log" | tail -6
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date; timeout 190 python3 benchmarks/bench_paper.py --out "$OUT" --T 8192 65536 --rounds 5 --iters 4 \
    --configs tile8 ws4 ws4_mb1 ws8 topn_ring topn_ring_sync topn_t512 topn_t512_ring 2>&1 | tee "$OUT/paper_bench.log" \
    | grep "T=.*selection\|T=.*ours\|not timed"
  date
fi
if [[ $what == pytest ]]; then   # any GPU tests: $2 = pytest arguments
  date; timeout 300 python3 -m pytest -q $2 ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest.log" | tail -15
  rc=${PIPESTATUS[0]}
fi
if [[ $what == ab ]]; then   # the same benchmark on an older commit and on this tree, one machine
  mkdir -p /tmp/baseline && tar -C /tmp/baseline -xJf .ab/baseline.tar.xz
  rev=$(cat /tmp/baseline/REV)
  args=${2:---backward --T 8192 65536 --rounds 3 --iters 4}
  mkdir -p "$OUT/baseline"
  date; echo "baseline $rev"
  (cd /tmp/baseline/src && PYTHONPATH=/tmp/site:/tmp/baseline/src NSA_CODEGEN_GENERATED_DIR=/tmp/baseline/gen \
    NSA_CODEGEN_CACHE_DIR=/tmp/nsacache_baseline NSA_GIT_SHA=$rev NSA_GIT_DIRTY=0 \
    timeout 240 python3 benchmarks/bench_paper.py --out "$OUT/baseline" $args) 2>&1 | tee "$OUT/ab_baseline.log" | grep "T="
  rc=${PIPESTATUS[0]}
  date; echo "this tree"
  timeout 240 python3 benchmarks/bench_paper.py --out "$OUT" $args 2>&1 | tee "$OUT/ab_head.log" | grep "T="
  [ ${PIPESTATUS[0]} -ne 0 ] && rc=1
  date
fi
if [[ $what == decodetests ]]; then
  python3 -m pytest -q tests/test_kv_cache.py tests/test_decode.py tests/test_layer.py -m gpu 2>&1 | tee "$OUT/decodetests.log" | tail -30
  rc=${PIPESTATUS[0]}
fi
if [[ $what == decodebench ]]; then
  python3 benchmarks/bench_decode.py ${2:+$2} 2>&1 | grep -v INFO | tee "$OUT/decodebench.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [[ $what == tune ]]; then
  mkdir -p "$OUT/tuning_logs/sm90"
  [ -f "$OUT/tuning_logs/sm90/NVIDIA_H100_80GB_HBM3.jsonl" ] || cp tuning_logs/sm90/*.jsonl "$OUT/tuning_logs/sm90/" 2>/dev/null
  NSA_CODEGEN_TUNING_DIR="$OUT/tuning_logs" python3 -m nsa_codegen tune --arch sm90 --budget-minutes "${2:-8}" ${3:-} \
    2>&1 | grep -v "INFO\|Warning\|hoisted\|Hoisting" | tee -a "$OUT/tune.log" | tail -25
  NSA_CODEGEN_TUNING_DIR="$OUT/tuning_logs" python3 -m nsa_codegen tune --arch sm90 --report > "$OUT/tune_report.txt"
fi
if [[ $what == bwdbench ]]; then
  python3 benchmarks/bench_backward.py --out "$OUT" 2>&1 | tee "$OUT/bwdbench.log" | grep -v "^\s*$" | tail -60
fi
if [[ $what == train ]]; then
  python3 benchmarks/train_tiny.py --out "$OUT" 2>&1 | tee "$OUT/train.log" | tail -30
  rc=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/bench_forward.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -60
fi
if [[ $what == first || $what == all ]]; then
  python3 benchmarks/bench_first_call.py --out "$OUT" 2>&1 | grep -v INFO | tee "$OUT/first_call.log" | tail -15
fi
exit $rc
