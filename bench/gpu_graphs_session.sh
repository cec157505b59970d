#!/usr/bin/env bash
# GPU session (one H100/H200, one device call of <= 10 min): build (or use carried .so files), the GPU tests of
# training-step CUDA graphs and of torch.compile, then the training-step benchmark at several Inductor
# activation memory budgets (each budget compiles afresh, ~2 min on a cold machine; pick with BUDGETS).
#   OUT=$OUT BUDGETS="70 80" bash bench/gpu_graphs_session.sh
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/mamba:$PWD/causal-conv1d
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
if ! ls mamba/mamba_ssm/_selective_scan_cuda*.so >/dev/null 2>&1; then
  ( time python -m pip install -q --no-build-isolation --no-deps -e ./causal-conv1d -e ./mamba ) > "$OUT/build.log" 2>&1
  tail -3 "$OUT/build.log"
fi
timeout 300 python -m pytest -q -p no:cacheprovider --tb=short tests/test_training_graphs.py tests/test_cuda_graphs.py \
  tests/test_compile.py > "$OUT/tests.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -8
echo "tests done after $(( $(date +%s) - start )) s"
models=""
for b in ${BUDGETS:-70}; do models="$models,segmamba+compile+cl+tgraph+amb$b"; done
timeout $(( 580 - $(date +%s) + start )) python bench/bench_model.py --models "${models#,}" --no_sliding_window \
  --out "$OUT/bench_memory_budgets.json" 2>&1 | grep -vE "^\s*$|[Ww]arn" | tail -8
echo "end after $(( $(date +%s) - start )) s"
