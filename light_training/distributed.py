"""Device choice and PyTorch DDP set-up for processes started by ``torchrun``.

Multi-GPU training is launched with ``torchrun --nproc_per_node N 3_train.py ...``; every process reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from its environment and joins the process group (NCCL on CUDA,
gloo on CPU). There is no launcher of our own: asking a single process for several GPUs is refused with the
exact ``torchrun`` command to use instead.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist


class DeviceRequestError(RuntimeError):
    """The requested device / number of GPUs does not exist on this machine."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs and which part of the job it owns."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        """Rank 0 writes every file (checkpoints, logs, plots); the other ranks only compute."""
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def resolve_device(requested: str = "auto", num_gpus: int = 1, local_rank: int = 0) -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a device, refusing impossible requests.

    ``num_gpus`` is the number of GPUs the job wants; more than ``torch.cuda.device_count()`` is an error
    (``auto`` with ``num_gpus == 1`` on a machine without GPU quietly means CPU).
    """
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    requested = (requested or "auto").strip().lower()
    if num_gpus < 0:
        raise DeviceRequestError(f"--num_gpus must be >= 0, got {num_gpus}")
    if num_gpus > max(available, 1):  # one 'GPU' on a CPU-only machine means the CPU
        raise DeviceRequestError(
            f"asked for {num_gpus} GPU(s) but this machine has {available} visible CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            "lower --num_gpus or run on a machine with more GPUs")
    if requested == "auto":
        if available == 0 or num_gpus == 0:
            return torch.device("cpu")
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if available == 0:
            raise DeviceRequestError(f"--device {requested} requested but no CUDA device is available "
                                     "(use --device cpu or --device auto)")
        index = int(requested.split(":", 1)[1]) if ":" in requested else local_rank
        if index >= available:
            raise DeviceRequestError(f"--device {requested}: only {available} CUDA device(s) visible "
                                     f"(indices 0..{available - 1})")
        return torch.device("cuda", index)
    raise DeviceRequestError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N")


def torchrun_command(num_processes: int, argv: Optional[List[str]] = None) -> str:
    """The command line that starts this script with ``num_processes`` DDP processes."""
    argv = list(sys.argv if argv is None else argv)
    kept: List[str] = []
    skip_next = False
    for argument in argv[1:]:  # drop --num_gpus: under torchrun the world size says how many
        if skip_next:
            skip_next = False
            continue
        if argument == "--num_gpus":
            skip_next = True
            continue
        if argument.startswith("--num_gpus="):
            continue
        kept.append(argument)
    return " ".join(["torchrun", "--standalone", f"--nproc_per_node {num_processes}", shlex.quote(argv[0])]
                    + [shlex.quote(a) for a in kept])


def setup_distributed(requested_device: str = "auto", num_gpus: int = 1) -> DistributedContext:
    """Pick the device and, under ``torchrun``, join the process group.

    * Not under torchrun: ``num_gpus > 1`` is refused (with the torchrun command to use), so no process
      silently trains on one GPU when the user asked for several.
    * Under torchrun: ``WORLD_SIZE`` processes; on CUDA each takes GPU ``LOCAL_RANK`` and a world size above
      the visible device count is refused. Backend NCCL on CUDA, gloo on CPU.
    """
    if not _launched_by_torchrun():
        if num_gpus > 1:
            resolve_device(requested_device, num_gpus)  # refuses first if the GPUs do not even exist
            raise DeviceRequestError(
                f"--num_gpus {num_gpus} needs one process per GPU, started by torchrun:\n    "
                + torchrun_command(num_gpus))
        return DistributedContext(device=resolve_device(requested_device, num_gpus))

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size > 1 and num_gpus > 1 and num_gpus != world_size:
        raise DeviceRequestError(f"--num_gpus {num_gpus} disagrees with torchrun's WORLD_SIZE={world_size}; "
                                 "leave --num_gpus at 1 under torchrun (the process count decides)")
    wants_cuda = requested_device.lower() != "cpu" and torch.cuda.is_available()
    if wants_cuda:
        available = torch.cuda.device_count()
        if world_size > available:
            raise DeviceRequestError(f"torchrun started {world_size} processes but only {available} CUDA "
                                     "device(s) are visible; use --nproc_per_node <= the GPU count")
        device = resolve_device(f"cuda:{local_rank}", 1, local_rank)
        torch.cuda.set_device(device)
    else:
        device = resolve_device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistributedContext(device=device, rank=rank, local_rank=local_rank, world_size=world_size)


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_training_script(args: Any, check_settings: Callable[[Any], None],
                        train: Callable[[Any, DistributedContext], int],
                        exit_bad_settings: int = 2, exit_failed: int = 1) -> int:
    """The shared frame of the training scripts: ``check_settings(args)`` (a ValueError prints ``error: ...``
    and returns ``exit_bad_settings``), set up the device / process group from ``args.device`` and
    ``args.num_gpus`` (a request that cannot be met: the same), return ``train(args, context)``, turn a
    FileNotFoundError / ValueError / RuntimeError into ``error (rank N): ...`` and ``exit_failed``, and always
    leave the process group."""
    try:
        check_settings(args)
        context = setup_distributed(args.device, args.num_gpus)
    except (ValueError, DeviceRequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_bad_settings
    try:
        return train(args, context)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error{f' (rank {context.rank})' if context.is_distributed else ''}: {error}", file=sys.stderr)
        return exit_failed
    finally:
        cleanup_distributed()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op without DDP)."""
    if context.is_distributed:
        dist.barrier()


def all_gather_objects(item: Any, context: DistributedContext) -> List[Any]:
    """Every rank's ``item`` (picklable, small) in rank order; ``[item]`` without DDP."""
    if not context.is_distributed:
        return [item]
    gathered: List[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, item)
    return gathered


def broadcast_object(item: Any, context: DistributedContext, source_rank: int = 0) -> Any:
    """``item`` from ``source_rank`` on every rank."""
    if not context.is_distributed:
        return item
    holder = [item]
    dist.broadcast_object_list(holder, src=source_rank)
    return holder[0]


def all_reduce_mean(value: float, context: DistributedContext) -> float:
    """Mean of a float over ranks (identity without DDP)."""
    if not context.is_distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64,
                          device=context.device if context.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / context.world_size
