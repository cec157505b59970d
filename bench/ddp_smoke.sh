#!/usr/bin/env bash
# Multi-GPU smoke test of DDP training (run on a machine with >= 2 GPUs; not part of the CPU test suite).
#   bash bench/ddp_smoke.sh            # 2 GPUs
#   NGPU=4 bash bench/ddp_smoke.sh     # 4 GPUs
# 1. the shared Trainer under torchrun: per-rank report, identical weights after the steps, only rank 0 writes;
# 2. 3_train.py under torchrun on a few synthetic preprocessed cases (2 epochs, validation on whole volumes);
# 3. 3_train.py --num_gpus <more than exist> must refuse with a non-zero exit code.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU="${NGPU:-2}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/segmamba_ddp_smoke.XXXXXX")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== visible GPUs: $(python -c 'import torch; print(torch.cuda.device_count())'), using $NGPU; work dir $WORK"

echo "== 1/3 Trainer under torchrun"
torchrun --standalone --nproc_per_node "$NGPU" bench/ddp_smoke.py "$WORK/trainer_run"

echo "== 2/3 3_train.py under torchrun on synthetic data"
python tools/make_brats_demo.py --out "$WORK/raw" --n_cases 8 --shape 80 96 96
python 1_rename_mri_data.py --data_dir "$WORK/raw" --quiet
python 2_preprocessing_mri.py --data_dir "$WORK/raw" --output_dir "$WORK/fullres" --num_processes 4 --no_progress
torchrun --standalone --nproc_per_node "$NGPU" 3_train.py --data_dir "$WORK/fullres/train" \
    --splits "$WORK/fullres/splits.json" --logdir "$WORK/logs" --max_epoch 2 --iterations_per_epoch $((4 * NGPU)) \
    --val_every 1 --roi 64 64 64 --num_workers 2 --no_progress
test -f "$WORK/logs/model/best_model.pt" && test -f "$WORK/logs/model/final_model.pt"

echo "== 3/3 asking for more GPUs than exist"
TOO_MANY=$(( $(python -c 'import torch; print(torch.cuda.device_count())') + 1 ))
set +e
python 3_train.py --num_gpus "$TOO_MANY" --data_dir "$WORK/fullres/train" --logdir "$WORK/refused" 2> "$WORK/refused.txt"
CODE=$?
set -e
cat "$WORK/refused.txt"
if [ "$CODE" -eq 0 ]; then echo "FAILED: --num_gpus $TOO_MANY exited 0"; exit 1; fi
echo "== DDP smoke test passed (work dir $WORK)"
