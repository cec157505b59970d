"""One rank of the GPU DDP smoke test (started by bench/ddp_smoke.sh through torchrun).

Two SGD steps of a small SegMamba on random data that differs per rank, through the shared Trainer; then
every rank reports its device and a parameter checksum, and rank 0 checks that all ranks hold identical
weights (DDP averaged the gradients) and that only it wrote checkpoints. Exit code 0 when all holds.
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from light_training.distributed import all_gather_objects, cleanup_distributed, setup_distributed
from light_training.trainer import Trainer, TrainerConfig
from model_segmamba import SegMamba


def batches(start_batch, rank, roi):
    index = start_batch
    while True:
        generator = torch.Generator().manual_seed(1000 * rank + index)  # each rank draws its own data
        data = torch.randn(2, 4, *roi, generator=generator)
        yield {"data": data, "seg": (data[:, :1] > 0.5).long() + (data[:, 1:2] > 1.0).long()}
        index += 1


def main() -> int:
    context = setup_distributed("cuda", num_gpus=1)
    rank, world = context.rank, context.world_size
    roi = (64, 64, 64)
    logdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "segmamba_ddp_smoke")
    torch.manual_seed(0)
    model = SegMamba(4, 4)
    config = TrainerConfig(logdir=logdir, max_epochs=1, iterations_per_epoch=2 * world, val_every=1,
                           progress_bar=False, tensorboard=False)
    trainer = Trainer(model, config, lambda start_batch: batches(start_batch, rank, roi), context=context)
    trainer.fit(overwrite=True)
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    report = {"rank": rank, "local_rank": context.local_rank, "device": str(context.device),
              "gpu": torch.cuda.get_device_name(context.device), "steps": trainer.global_step, "checksum": checksum,
              "peak_memory_GiB": round(torch.cuda.max_memory_allocated(context.device) / 2**30, 2)}
    print(f"[rank {rank}/{world}] {report}", flush=True)
    reports = all_gather_objects(report, context)
    ok = True
    if rank == 0:
        checksums = {r["checksum"] for r in reports}
        files = sorted(os.listdir(os.path.join(logdir, "model")))
        ok = len(checksums) == 1 and world >= 2 and files == ["final_model.pt"]
        print(f"world size {world}; identical parameters on all ranks: {len(checksums) == 1}; "
              f"checkpoints written: {files}; {'OK' if ok else 'FAILED'}", flush=True)
    ok = all_gather_objects(ok, context)[0]
    cleanup_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
