"""Optional ``torch.compile`` of a segmentation network, for speed on CUDA.

On an H200 (SegMamba 4→4, batch 2 × 128³, fp16 autocast) compiling the network cut a training step from
274 ms to 201 ms and a 1 × 4 × 128³ inference pass from 63 ms to 36 ms (``bench/bench_model.py``,
``bench/bench_infer_compile.py``): Inductor
fuses each instance norm with its activation, the residual additions and the autocast casts around them,
which the eager model runs as separate memory-bound kernels. The first step pays for the compilation
(about 1–2 minutes), and each new input shape or train/eval switch compiles once more.

What is compiled: the network's ``forward`` in place (``module.compile()``), so ``state_dict`` keys, DDP and
checkpoints are untouched. Mamba blocks stay eager (their conv1d and selective scan are CUDA extension
calls that Dynamo cannot trace); the compiled graphs stop and resume around them. If compilation fails at run time, Dynamo
falls back to running that part eagerly and logs why (``suppress_errors``), so a broken compiler toolchain
costs speed, never the run.

Memory: ``memory_budget`` below 1 sets Inductor's activation memory budget (the fraction of the activations
the compiled regions may keep for the backward pass; the partitioner recomputes the cheapest operations,
norms and activations, instead of keeping their outputs). Measured on an H200 (batch 2 × 128³, fp16,
compiled, channels-last, CUDA-graphed training step, ``bench/bench_model.py`` ``+amb50``): 0.5 took the peak
from 13.7 to 11.6 GiB for 146.5 instead of 142.6 ms per step, a cheaper way under 12 GiB than activation
checkpointing of the Mamba layers (10.1 GiB at 161.5 ms). It is a process-wide Inductor setting, read when a
graph is compiled; each :func:`compile_network` call sets it (1 included), so a network compiled later in the
same process does not inherit an earlier network's budget.

Settings: ``"auto"`` compiles on CUDA and not on the CPU (Inductor's CPU compile of this network takes
minutes and gains little there), ``"on"`` always, ``"off"`` never. The environment variable
``SEGMAMBA_COMPILE=0`` turns ``"auto"`` off.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

CHOICES = ("auto", "on", "off")
RECOMPILE_LIMIT = 64  # SegMamba reuses each block class at 4-5 shapes, × train/eval


def should_compile(setting: str, device: torch.device) -> bool:
    """Resolve ``auto``/``on``/``off`` for ``device``; ValueError for anything else."""
    if setting not in CHOICES:
        raise ValueError(f"compile setting must be one of {', '.join(CHOICES)}; got {setting!r}")
    if setting == "off" or not hasattr(torch, "compile"):
        return False
    if setting == "on":
        return True
    return torch.device(device).type == "cuda" and os.environ.get("SEGMAMBA_COMPILE", "1") != "0"


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # name changed across torch releases
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), RECOMPILE_LIMIT))


def check_memory_budget(memory_budget: float) -> float:
    """``memory_budget`` as a float in (0, 1]; ValueError otherwise."""
    budget = float(memory_budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"compile memory budget must be in (0, 1] (1 = keep every activation Inductor would "
                         f"keep); got {memory_budget!r}")
    return budget


def compile_network(model: torch.nn.Module, setting: str, device: torch.device,
                    say: Optional[Callable[[str], None]] = None, eager: str = "block",
                    memory_budget: float = 1.0) -> bool:
    """Compile ``model`` in place when :func:`should_compile` says so; returns whether it did.

    ``eager`` says what of each Mamba block inside ``model`` stays eager: ``"block"`` (default) the whole
    block; ``"scan"`` only the per-direction conv1d + selective scan (the CUDA extension calls), so the glue
    around them (flips, slice reorderings, the sum of the three directions) is compiled too; with the fused
    three-direction function of the CUDA path, that function stays eager and in_proj / out_proj are compiled.
    Measured on an H200 before the fused function (``bench/bench_infer_compile.py``, 1 × 4 × 128³ fp16
    inference): eager 62.8 ms, ``"scan"`` 53.0 ms, ``"block"`` 35.7 ms; training steps were the same (200.5 vs
    200.9 ms).

    ``memory_budget`` (0, 1]: Inductor's activation memory budget for the compiled regions (module docstring);
    1 is Inductor's default (keep what its partitioner would keep).

    ``say`` receives one line describing what happened (default: the ``light_training`` logger)."""
    say = say or logging.getLogger("light_training").info
    if eager not in ("scan", "block"):
        raise ValueError(f"eager must be 'scan' or 'block'; got {eager!r}")
    budget = check_memory_budget(memory_budget)
    if not should_compile(setting, device):
        if budget < 1.0:
            say(f"compile memory budget {budget:g} ignored: the network is not compiled")
        return False
    try:
        from mamba_ssm import Mamba
    except ImportError:  # pragma: no cover - the package is a hard dependency of the models
        Mamba = ()
    eager_blocks = 0
    # "scan": the per-direction functions of the composed path and the fused three-direction function
    attributes = ("_scan_direction", "_tri_inner") if eager == "scan" else ("forward",)
    for module in model.modules():
        if isinstance(module, Mamba) and not getattr(module, "_segmamba_eager", False):
            for attribute in attributes:
                setattr(module, attribute, torch.compiler.disable(getattr(module, attribute)))
            module._segmamba_eager = eager
            eager_blocks += 1
    _raise_recompile_limit()
    torch._dynamo.config.suppress_errors = True
    budget_note = ""
    import torch._functorch.config as functorch_config
    if hasattr(functorch_config, "activation_memory_budget"):
        functorch_config.activation_memory_budget = budget
        if budget < 1.0:
            budget_note = f"; activation memory budget {budget:g} (cheap operations recomputed in the backward pass)"
    elif budget < 1.0:  # pragma: no cover - torch < 2.4
        say(f"compile memory budget {budget:g} ignored: this torch has no activation memory budget")
    model.compile()
    what = "their scans" if eager == "scan" else "they"
    say(f"torch.compile: network compiled in place ({eager_blocks} Mamba blocks; {what} stay eager{budget_note}); "
        "the first pass in training mode and the first in evaluation mode each take 1-2 minutes longer while "
        "kernels compile (--compile off to skip)")
    return True
