#!/usr/bin/env bash
# GPU session on a 2-GPU machine: build, kernel tests, DDP smoke test (2 GPUs, data preprocessed beforehand and
# carried in .ddpdata/), kernel benchmark, compute-sanitizer, training-step profile, model benchmark.
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=32 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
( time python -m pip install -q --no-build-isolation --no-deps -e ./causal-conv1d -e ./mamba ) > "$OUT/build.log" 2>&1; tail -2 "$OUT/build.log"
SEGMAMBA_KERNEL_REPORT="$OUT/kernel_errors.json" timeout 100 python -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
echo "== DDP (2 GPUs): Trainer"
timeout 90 torchrun --standalone --nproc_per_node 2 bench/ddp_smoke.py /tmp/ddp_trainer > "$OUT/ddp_trainer.txt" 2>&1; echo "exit $?"; grep -vE "^\s*$|[Ww]arn" "$OUT/ddp_trainer.txt" | tail -6
echo "== DDP (2 GPUs): 3_train.py"
timeout 120 torchrun --standalone --nproc_per_node 2 3_train.py --data_dir .ddpdata/fullres/train --splits .ddpdata/fullres/splits.json \
  --logdir /tmp/ddp_logs --max_epoch 2 --iterations_per_epoch 8 --val_every 1 --roi 64 64 64 --num_workers 2 --no_progress > "$OUT/ddp_train.txt" 2>&1; echo "exit $?"
tail -6 "$OUT/ddp_train.txt"; ls /tmp/ddp_logs/model 2>&1; cp /tmp/ddp_logs/progress.png "$OUT/ddp_progress.png" 2>/dev/null
echo "== refuse more GPUs than exist"; python 3_train.py --num_gpus 3 --data_dir .ddpdata/fullres/train --logdir /tmp/refused > /tmp/refused.txt 2>&1; code=$?; tail -2 /tmp/refused.txt; echo "exit code $code"
timeout 80 python bench/bench_kernels.py --no_pytorch --out "$OUT/bench_kernels.json" 2>&1 | tail -12
timeout 60 compute-sanitizer --tool memcheck python bench/sanitize_kernels.py 2>&1 | grep -E "SUMMARY"
timeout 60 compute-sanitizer --tool racecheck python bench/sanitize_kernels.py 2>&1 | grep -E "SUMMARY"
timeout 90 python bench/profile_model.py --out "$OUT/profile_model.json" 2>&1 | tail -36
timeout 150 python bench/bench_model.py --models segmamba,swinunetr,unetr --out "$OUT/bench_model.json" 2>&1 | tail -6
