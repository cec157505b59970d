#!/usr/bin/env bash
# One GPU session for the kernels: build, correctness tests (table of errors), compute-sanitizer, benchmark.
# Usage (on the GPU machine, repo root): OUT=/some/dir bash bench/gpu_kernels_session.sh
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
( time python -m pip install -q --no-build-isolation --no-deps -e ./causal-conv1d -e ./mamba ) > "$OUT/build.log" 2>&1
tail -3 "$OUT/build.log"
mkdir -p "$OUT/so"; cp mamba/mamba_ssm/_selective_scan_cuda*.so causal-conv1d/causal_conv1d/_causal_conv1d_cuda*.so "$OUT/so/" && strip --strip-debug "$OUT"/so/*.so
python -c "from mamba_ssm.ops import cuda_backend as s; from causal_conv1d import cuda_backend as c; print('kernels built:', s.available(), c.available())"
SEGMAMBA_KERNEL_REPORT="$OUT/kernel_errors.json" timeout ${TEST_TIMEOUT:-300} python -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
for tool in memcheck racecheck; do
  timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $tool --print-limit 20 python bench/sanitize_kernels.py > "$OUT/sanitizer_$tool.txt" 2>&1
  echo "compute-sanitizer $tool: exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid" "$OUT/sanitizer_$tool.txt" | head -5
done
timeout ${BENCH_TIMEOUT:-200} python bench/bench_kernels.py --no_pytorch --out "$OUT/bench_kernels.json" 2>&1 | tail -15
