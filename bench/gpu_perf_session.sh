#!/usr/bin/env bash
# GPU session for the whole-model speed work: build (or reuse carried .so files), optional kernel tests
# with the scan's prefetch switched off, then bench_model.py on the variants given in $MODELS.
# Usage (repo root on the GPU machine): OUT=dir [TESTS=...] [BENCH_KERNELS=1 KERNEL_ARGS=--cpg=4,8] [SCAN_PROFILE=1] [PROFILE=--compile]
#   [MODELS=segmamba,segmamba+compile MODEL_ARGS=...] bash bench/gpu_perf_session.sh
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
if ls mamba/mamba_ssm/_selective_scan_cuda*.so causal-conv1d/causal_conv1d/_causal_conv1d_cuda*.so >/dev/null 2>&1 && [ "${REBUILD:-0}" = 0 ]; then
  echo "using carried extension builds"; export PYTHONPATH=$PYTHONPATH:$PWD/mamba:$PWD/causal-conv1d
else
  ( time python -m pip install -q --no-build-isolation --no-deps -e ./causal-conv1d -e ./mamba ) > "$OUT/build.log" 2>&1; tail -3 "$OUT/build.log"
  mkdir -p "$OUT/so"; cp mamba/mamba_ssm/_selective_scan_cuda*.so causal-conv1d/causal_conv1d/_causal_conv1d_cuda*.so "$OUT/so/"; strip --strip-debug "$OUT"/so/*.so; ls -la "$OUT/so"
fi
python -c "from mamba_ssm.ops import cuda_backend as s; from causal_conv1d import cuda_backend as c; print('kernels built:', s.available(), c.available())"
echo "setup $(( $(date +%s) - start )) s"
if [ -n "${TESTS:-}" ]; then
  env ${TEST_ENV:-} timeout ${TEST_TIMEOUT:-150} python -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tail -6 | tee "$OUT/tests.txt"
  echo "tests done at $(( $(date +%s) - start )) s"
fi
if [ -n "${BENCH_KERNELS:-}" ]; then
  timeout 150 python bench/bench_kernels.py --no_pytorch --out "$OUT/bench_kernels.json" ${KERNEL_ARGS:-} 2>&1 | tail -22
fi
if [ -n "${SCAN_PROFILE:-}" ]; then
  timeout 120 python bench/profile_scan.py --kernels 2>&1 | tee "$OUT/profile_scan.txt" | tail -24
fi
if [ -n "${PROFILE:-}" ]; then
  timeout 300 python bench/profile_model.py $PROFILE --out "$OUT/profile_model.json" 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -40
fi
if [ -n "${MODELS:-}" ]; then
  timeout ${MODEL_TIMEOUT:-400} python bench/bench_model.py --models "$MODELS" --out "$OUT/bench_model.json" ${MODEL_ARGS:-} 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -20
fi
echo "end $(( $(date +%s) - start )) s"
