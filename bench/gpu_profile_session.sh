#!/usr/bin/env bash
# GPU session: build, profile the scan kernels with Nsight Compute, baseline whole-model benchmark.
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
( time python -m pip install -q --no-build-isolation --no-deps -e ./causal-conv1d -e ./mamba ) > "$OUT/build.log" 2>&1; tail -3 "$OUT/build.log"
cp mamba/mamba_ssm/_selective_scan_cuda*.so causal-conv1d/causal_conv1d/_causal_conv1d_cuda*.so "$OUT/" 2>/dev/null
timeout 150 ncu --clock-control none -k regex:"fwd_local|fwd_out|bwd_local|bwd_main" --launch-count 8 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis python bench/profile_scan.py > "$OUT/ncu.txt" 2>&1
echo "ncu exit $?"; grep -E "^  [a-z_]+kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Stall|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -80
timeout ${MODEL_TIMEOUT:-240} python bench/bench_model.py --out "$OUT/bench_model.json" ${MODEL_ARGS:-} 2>&1 | tail -12
