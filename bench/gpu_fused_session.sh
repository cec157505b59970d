#!/usr/bin/env bash
# GPU session (one H100/H200, one device call of <= 10 min) for the fused three-direction Mamba function:
# build both extensions (in parallel), its GPU tests and the block tests, then the training-step benchmark of
# the default configuration with the fused function against the composed one and SwinUNETR (MONAI from .whl),
# then whatever GPU tests fit in the time left (TESTS).
#   OUT=$OUT bash bench/gpu_fused_session.sh
#   OUT=$OUT MODELS=segmamba+compile+cl+tgraph,swinunetr TESTS="tests/test_training_graphs.py" bash bench/gpu_fused_session.sh
source bench/gpu_session_env.sh
build_extensions
timeout 150 python -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda_kernels.py \
  -k "mamba_block or small_case or slice_of_z" > "$OUT/tests_block.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/tests_block.txt" | tail -6
echo "block tests done after $(( $(date +%s) - start )) s"
left=$(( ${BENCH_END:-470} - $(date +%s) + start ))
timeout $left python bench/bench_model.py \
  --models "${MODELS:-segmamba+compile+cl+tgraph,segmamba+compile+cl+tgraph+composed,swinunetr}" \
  --no_sliding_window --out "$OUT/bench_model_fused.json" 2>&1 | grep -vE "^\s*$|[Ww]arn" | tail -12
echo "bench done after $(( $(date +%s) - start )) s"
left=$(( 585 - $(date +%s) + start ))
if [ -n "${TESTS:-}" ] && [ $left -gt 20 ]; then
  timeout $left python -m pytest -q -p no:cacheprovider --tb=short $TESTS > "$OUT/tests_more.txt" 2>&1
  grep -E "passed|failed|Error" "$OUT/tests_more.txt" | tail -6
fi
echo "end after $(( $(date +%s) - start )) s"
