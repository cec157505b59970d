#!/usr/bin/env bash
# GPU session (one H100/H200, one device call of <= 10 min): build (or use carried .so files), the GPU tests of
# training-step CUDA graphs and of torch.compile, then the training-step benchmark at several Inductor
# activation memory budgets (each budget compiles afresh, ~2 min on a cold machine; pick with BUDGETS).
#   OUT=$OUT BUDGETS="70 80" bash bench/gpu_graphs_session.sh
source bench/gpu_session_env.sh
build_extensions
timeout 300 python -m pytest -q -p no:cacheprovider --tb=short tests/test_training_graphs.py tests/test_cuda_graphs.py \
  tests/test_compile.py > "$OUT/tests.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -8
echo "tests done after $(( $(date +%s) - start )) s"
models=""
for b in ${BUDGETS:-70}; do models="$models,segmamba+compile+cl+tgraph+amb$b"; done
timeout $(( 580 - $(date +%s) + start )) python bench/bench_model.py --models "${models#,}" --no_sliding_window \
  --out "$OUT/bench_memory_budgets.json" 2>&1 | grep -vE "^\s*$|[Ww]arn" | tail -8
echo "end after $(( $(date +%s) - start )) s"
