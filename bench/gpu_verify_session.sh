#!/usr/bin/env bash
# Short GPU check of the committed state: build, the GPU test module, SegMamba model benchmark.
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
( time python -m pip install -q --no-build-isolation --no-deps -e ./causal-conv1d -e ./mamba ) > "$OUT/build.log" 2>&1; tail -2 "$OUT/build.log"
SEGMAMBA_KERNEL_REPORT="$OUT/kernel_errors.json" timeout 90 python -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tail -4
timeout 60 python bench/bench_model.py --models segmamba --repeat 5 --no_sliding_window --out "$OUT/bench_model.json" 2>&1 | tail -2
