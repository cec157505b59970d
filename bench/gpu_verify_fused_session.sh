#!/usr/bin/env bash
# GPU session (one device call of <= 10 min) after the fused three-direction Mamba function: build, the whole
# kernel test module (error table), the torch.compile and CUDA-graph GPU tests, and the demo's BraTS training
# (3_train.py with run_demo.py's settings, on data preprocessed elsewhere and carried in .demo_data) with the
# fused function and with the composed one (SEGMAMBA_FUSED_MAMBA=0), to compare validation Dice.
#   OUT=$OUT bash bench/gpu_verify_fused_session.sh      (carry .whl with MONAI, and .demo_data)
source bench/gpu_session_env.sh
build_extensions
SEGMAMBA_KERNEL_REPORT="$OUT/kernel_errors.json" timeout 200 python -m pytest -q -p no:cacheprovider --tb=short \
  tests/test_cuda_kernels.py > "$OUT/tests_kernels.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/tests_kernels.txt" | tail -4
echo "kernel tests done after $(( $(date +%s) - start )) s"
left=$(( 470 - $(date +%s) + start ))
timeout $left python -m pytest -q -p no:cacheprovider --tb=short tests/test_compile.py tests/test_cuda_graphs.py \
  > "$OUT/tests_compile_graphs.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/tests_compile_graphs.txt" | tail -4
if [ -d .demo_data ]; then
  for mode in 1 0; do
    rm -rf /tmp/demo_logs
    SEGMAMBA_FUSED_MAMBA=$mode timeout $(( (585 - $(date +%s) + start) / (mode + 1) )) python 3_train.py --data_dir .demo_data/train \
      --splits /tmp/demo_splits.json --logdir /tmp/demo_logs --max_epoch 6 --iterations_per_epoch 10 \
      --val_every 2 --batch_size 1 --roi 32 32 32 --loss dice_ce --oversample_foreground 1.0 \
      --feat_size 16 32 64 128 --hidden_size 128 --num_workers 1 --device cuda --compile off --no_progress \
      > "$OUT/demo_train_fused$mode.txt" 2>&1
    grep -E "done:|Error" "$OUT/demo_train_fused$mode.txt" | tail -2
  done
fi
echo "demo trainings done after $(( $(date +%s) - start )) s"
echo "end after $(( $(date +%s) - start )) s"
