#!/usr/bin/env bash
# GPU session for scan-kernel work (one device call): build, the kernel test module (error table), the kernel
# benchmark, Nsight Compute stall reasons and pipe use of the walk kernels at the benchmark shape (fp32), and
# the SASS of the float32 walk kernels (instruction counts per kernel, archived).
#   OUT=$OUT bash bench/gpu_scan_probe_session.sh
# env: TESTS=0 skips the tests, TEST_VARIANTS="0" repeats them per backward main kernel, SANITIZE=1 runs
# compute-sanitizer memcheck and racecheck, BENCH_ARGS, NCU=0, NCU_KERNELS (regex), NCU_METRICS (comma-joined
# Nsight Compute metrics added to the stall section's, e.g. shared-memory wavefronts), SASS_KERNELS (mangled-name
# fragments), PROFILE_ENVS="SEGMAMBA_SCAN_CPG=2 ..." times each kernel (bench/profile_scan.py --kernels) once per
# space-separated (comma-joined) environment setting. SRC_NCU (regex) exports the per-instruction stall samples
# (Nsight Compute source page, SASS) of the first matching launch as ncu_src.csv.gz (SRC_NCU_ARGS="--launch-skip 1"
# takes the second: e.g. SRC_NCU=fwd_lane matches the first walk, then the output walk).
source bench/gpu_session_env.sh
build_extensions
if [ "${TESTS:-1}" != 0 ]; then
  SEGMAMBA_KERNEL_REPORT="$OUT/kernel_errors.json" timeout ${TEST_TIMEOUT:-240} python -m pytest -q -p no:cacheprovider \
    --tb=short -x tests/test_cuda_kernels.py ${TEST_ARGS:-} > "$OUT/tests_kernels.txt" 2>&1
  grep -E "passed|failed|Error" "$OUT/tests_kernels.txt" | tail -4
  echo "kernel tests done after $(( $(date +%s) - start )) s"
  for v in ${TEST_VARIANTS:-}; do  # the other backward main kernels, on the same tests
    SEGMAMBA_SCAN_BWD_MAIN=$v timeout ${TEST_TIMEOUT:-240} python -m pytest -q -p no:cacheprovider --tb=short -x \
      tests/test_cuda_kernels.py ${TEST_ARGS:-} > "$OUT/tests_kernels_bwd$v.txt" 2>&1
    echo "backward main variant $v: $(grep -E 'passed|failed' "$OUT/tests_kernels_bwd$v.txt" | tail -1)"
  done
fi
if [ "${SANITIZE:-0}" != 0 ]; then  # compute-sanitizer on bench/sanitize_kernels.py
  for tool in memcheck racecheck; do
    timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $tool --print-limit 20 python bench/sanitize_kernels.py \
      > "$OUT/sanitizer_$tool.txt" 2>&1
    echo "$tool: $(grep -E 'SUMMARY|finished' "$OUT/sanitizer_$tool.txt" | tr '\n' ' ')"
  done
fi
timeout ${BENCH_TIMEOUT:-150} python bench/bench_kernels.py --no_pytorch --out "$OUT/bench_kernels.json" ${BENCH_ARGS:-} 2>&1 | tail -16
echo "bench done after $(( $(date +%s) - start )) s"
for e in ${PROFILE_ENVS:-}; do  # per-kernel times under comma-separated environment settings, e.g. SEGMAMBA_SCAN_CPG=4
  env ${e//,/ } timeout 90 python bench/profile_scan.py --kernels > "$OUT/profile_${e//[=,]/_}.txt" 2>&1
  echo "profile $e:"
  print_scan_profile "$OUT/profile_${e//[=,]/_}.txt"
done
if [ "${NCU:-1}" != 0 ]; then
  timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k regex:"${NCU_KERNELS:-lane|bwd_main}" --launch-count 4 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
    --metrics "regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__warps_active.avg.per_cycle_active${NCU_METRICS:+,$NCU_METRICS}" \
    python bench/ncu_scan.py float32 > "$OUT/ncu_stalls.txt" 2>&1
  echo "ncu exit $? after $(( $(date +%s) - start )) s"
fi
if [ -n "${SRC_NCU:-}" ]; then  # per-instruction stall samples (SourceCounters) of the kernels matching $SRC_NCU
  timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k regex:"$SRC_NCU" ${SRC_NCU_ARGS:-} --launch-count 1 --section SourceCounters \
    --section WarpStateStats -f -o /tmp/src_rep python bench/ncu_scan.py float32 > "$OUT/ncu_src_run.txt" 2>&1
  ncu -i /tmp/src_rep.ncu-rep --page source --csv --print-source sass > /tmp/ncu_src.csv 2> "$OUT/ncu_src_err.txt"
  echo "source page exit $? ($(wc -l < /tmp/ncu_src.csv) lines)"
  gzip -c /tmp/ncu_src.csv > "$OUT/ncu_src.csv.gz"
fi
so=$(ls mamba/mamba_ssm/_selective_scan_cuda*.so | head -1)
if command -v cuobjdump >/dev/null; then
  mkdir -p /tmp/sass
  for k in ${SASS_KERNELS:-fwd_lane_kernelIfLb1 fwd_lane_kernelIfLb0 bwd_lane_local_kernelIf bwd_main_kernelIfLi16}; do
    cuobjdump -sass "$so" | awk -v k="$k" '/Function :/ {on = index($0, k) > 0} on' > /tmp/sass/$k.sass
    printf "%-28s %6d instructions\n" $k $(grep -cE '^\s+/\*[0-9a-f]{4}\*/' /tmp/sass/$k.sass)
  done
  tar -czf "$OUT/sass.tgz" -C /tmp/sass .
fi
echo "end after $(( $(date +%s) - start )) s"
