#!/usr/bin/env python
"""The main job: every pipeline of the repository end to end on small synthetic data.

BraTS: 0_inference.py (model smoke test), synthetic raw BraTS cases (tools/make_brats_demo.py), then the
numbered scripts 1 -> 5 with a small patch size and a narrow SegMamba so that it finishes in minutes on a
CPU, and finally a PNG with an image slice, its ground truth and the prediction. A GPU is used when present.

Everything is written under a separate workspace (default ``./demo_output``), never into ``./data``,
``./logs`` or ``./prediction_results``: a user's real data and runs are not touched. The workspace holds a
marker file; a folder without it is never deleted or written into.

Each step prints its command and elapsed time; the demo stops at the first failing step with its exit code.
Pipelines are lists of :class:`DemoStep` registered in ``PIPELINES`` (``--only`` picks one).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parent

# Defaults (edit here or pass the flags). Sized for a 2-core CPU; a GPU runs the same settings faster.
WORKSPACE = "./demo_output"
DEVICE = "auto"
BRATS_CASES = 8                         # 5 train / 1 val / 2 test with the 70/10/20 split
BRATS_SHAPE = (48, 64, 64)              # Z Y X voxels of the synthetic raw volumes
BRATS_ROI = (32, 32, 32)                # training patch and sliding window (multiple of 16, >= 32)
BRATS_FEAT_SIZE = (16, 32, 64, 128)     # a narrow SegMamba (the real one is 48 96 192 384) for CPU speed
BRATS_HIDDEN_SIZE = 128                 # (narrower still, 8 16 32 64, often never learns the tumour core)
BRATS_EPOCHS = 6
BRATS_ITERATIONS = 10                   # per epoch: 60 optimiser steps in all
BRATS_VAL_EVERY = 2
BRATS_BATCH_SIZE = 1
# With only 60 steps, CE alone learns the whole tumour but not its small core; Dice+CE on tumour-centred
# patches learns all three regions (the scripts' defaults stay the reference's: ce, 0.33).
BRATS_LOSS = "dice_ce"
BRATS_OVERSAMPLE_FOREGROUND = 1.0
NUM_WORKERS = 1                         # background patch-loading processes

WORKSPACE_MARKER = ".segmamba_demo_workspace"
WORKSPACE_LOCK = ".demo_running.lock"


@dataclass
class DemoSettings:
    """What the step builders need; ``workspace`` is the demo's root folder."""

    workspace: Path
    device: str = DEVICE
    python: str = sys.executable
    brats_cases: int = BRATS_CASES
    brats_shape: tuple = BRATS_SHAPE
    brats_roi: tuple = BRATS_ROI
    brats_feat_size: tuple = BRATS_FEAT_SIZE
    brats_hidden_size: int = BRATS_HIDDEN_SIZE
    brats_epochs: int = BRATS_EPOCHS
    brats_iterations: int = BRATS_ITERATIONS
    brats_val_every: int = BRATS_VAL_EVERY
    brats_batch_size: int = BRATS_BATCH_SIZE
    brats_loss: str = BRATS_LOSS
    brats_oversample_foreground: float = BRATS_OVERSAMPLE_FOREGROUND
    num_workers: int = NUM_WORKERS
    show_progress: bool = True


@dataclass
class DemoStep:
    """One step: a command run from the repository root, or an in-process ``action`` returning a message."""

    title: str
    command: Optional[List[str]] = None
    action: Optional[Callable[[], str]] = None
    outputs: List[str] = field(default_factory=list)  # paths worth showing in the final summary


class DemoStepError(RuntimeError):
    """A step failed; the message says which and how."""


# ----------------------------------------------------------------------------------------------- BraTS
def brats_paths(settings: DemoSettings) -> Dict[str, Path]:
    root = settings.workspace / "brats"
    return {"root": root, "raw": root / "raw_data" / "BraTS2023" / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
            "fullres": root / "data" / "fullres", "train": root / "data" / "fullres" / "train",
            "splits": root / "data" / "fullres" / "splits.json", "logdir": root / "logs" / "segmamba",
            "predictions": root / "prediction_results", "overlay": root / "overlay.png"}


def brats_steps(settings: DemoSettings) -> List[DemoStep]:
    """The BraTS 2023 pipeline on synthetic cases."""
    paths = {k: str(v) for k, v in brats_paths(settings).items()}
    py = settings.python
    roi = [str(s) for s in settings.brats_roi]
    quiet = [] if settings.show_progress else ["--no_progress"]
    on_gpu = _cuda_available() and settings.device != "cpu"
    return [
        # one forward pass of the full-size model: 128^3 on a GPU, a 32^3 input on the CPU (seconds, not minutes)
        DemoStep("model smoke test (0_inference.py)",
                 [py, "0_inference.py", "--device", settings.device] + ([] if on_gpu else ["--size", "32"])),
        DemoStep("synthetic BraTS raw data", [py, "tools/make_brats_demo.py", "--out", paths["raw"],
                                              "--n_cases", str(settings.brats_cases),
                                              "--shape", *[str(s) for s in settings.brats_shape]]),
        DemoStep("1: short file names", [py, "1_rename_mri_data.py", "--data_dir", paths["raw"], "--quiet"]),
        DemoStep("2: preprocessing", [py, "2_preprocessing_mri.py", "--data_dir", paths["raw"],
                                      "--output_dir", paths["fullres"], "--num_processes", "2", *quiet]),
        DemoStep("3: training", [py, "3_train.py", "--data_dir", paths["train"], "--splits", paths["splits"],
                                 "--logdir", paths["logdir"], "--max_epoch", str(settings.brats_epochs),
                                 "--iterations_per_epoch", str(settings.brats_iterations),
                                 "--val_every", str(settings.brats_val_every),
                                 "--batch_size", str(settings.brats_batch_size), "--roi", *roi,
                                 "--loss", settings.brats_loss,
                                 "--oversample_foreground", str(settings.brats_oversample_foreground),
                                 "--feat_size", *[str(s) for s in settings.brats_feat_size],
                                 "--hidden_size", str(settings.brats_hidden_size),
                                 "--num_workers", str(settings.num_workers), "--device", settings.device,
                                 "--compile", "off", *quiet],  # compiling costs more than 60 demo steps gain
                 outputs=[os.path.join(paths["logdir"], "progress.png"),
                          os.path.join(paths["logdir"], "model", "best_model.pt")]),
        # mirror TTA multiplies inference by 8: on for a GPU, off for the CPU demo
        DemoStep("4: prediction", [py, "4_predict.py", "--data_dir", paths["train"], "--splits", paths["splits"],
                                   "--checkpoint", os.path.join(paths["logdir"], "model", "best_model.pt"),
                                   "--output_dir", os.path.join(paths["predictions"], "segmamba"), "--roi", *roi,
                                   "--mirror_tta" if on_gpu else "--no-mirror_tta", "--device", settings.device,
                                   "--compile", "off", *quiet],
                 outputs=[os.path.join(paths["predictions"], "segmamba")]),
        DemoStep("5: metrics", [py, "5_compute_metrics.py", "--pred_name", "segmamba", "--data_dir", paths["raw"],
                                "--prediction_root", paths["predictions"], "--splits", paths["splits"], *quiet],
                 outputs=[os.path.join(paths["predictions"], "result_metrics", "segmamba.csv")]),
        DemoStep("overlay picture", action=lambda: write_brats_overlay(settings), outputs=[paths["overlay"]]),
    ]


def write_brats_overlay(settings: DemoSettings) -> str:
    """Overlay of ground truth and prediction on the FLAIR of the first test case with a tumour."""
    from light_training.io import read_image
    from light_training.progress import plot_segmentation_overlay
    from light_training.splits import load_splits

    paths = brats_paths(settings)
    for name in load_splits(paths["splits"])["test"]:
        prediction_path = paths["predictions"] / "segmamba" / f"{name}.nii.gz"
        ground_truth, _ = read_image(paths["raw"] / name / "seg.nii.gz")
        if not prediction_path.is_file() or not ground_truth.any():
            continue
        flair, _ = read_image(paths["raw"] / name / "t2f.nii.gz")
        prediction, _ = read_image(prediction_path)
        plot_segmentation_overlay(flair, ground_truth, prediction, paths["overlay"], title=f"{name} (FLAIR)")
        return f"wrote {paths['overlay']} ({name})"
    raise DemoStepError("no test case with a prediction and a tumour to draw")


def brats_report(settings: DemoSettings) -> str:
    """The test-set metrics table (mean ± std over cases) written by 5_compute_metrics.py."""
    from light_training.evaluation import format_summary
    from light_training.utils.files import load_json

    paths = brats_paths(settings)
    metrics = load_json(paths["predictions"] / "result_metrics" / "segmamba.json")
    return (f"BraTS test split: {metrics['n_evaluated']} of {metrics['n_cases_in_split']} case(s), regions TC/WT/ET\n"
            + format_summary(metrics["summary"]) + f"\noverlay: {paths['overlay']}")


# ------------------------------------------------------------------------------------- the step runner
# Pipelines run in this order; the ABUS pipeline registers itself here as "abus" (steps and report).
PIPELINES: Dict[str, Callable[[DemoSettings], List[DemoStep]]] = {"brats": brats_steps}
PIPELINE_REPORTS: Dict[str, Callable[[DemoSettings], str]] = {"brats": brats_report}


# ------------------------------------------------------------------------------------------------ ABUS
def abus_steps(settings: DemoSettings) -> List[DemoStep]:
    """The ABUS pipeline 1 -> 5 plus the Seg -> Box baseline on synthetic ultrasound volumes (the steps and
    their sizes live in tools/make_abus_demo.py)."""
    from tools.make_abus_demo import demo_steps
    return demo_steps(settings, DemoStep)


def abus_report(settings: DemoSettings) -> str:
    """Segmentation and detection summaries of the ABUS test split (detector vs Seg -> Box)."""
    from tools.make_abus_demo import demo_report
    return demo_report(settings)


PIPELINES["abus"] = abus_steps
PIPELINE_REPORTS["abus"] = abus_report


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def prepare_workspace(workspace: Path, pipelines: List[str]) -> Path:
    """Create the workspace (with its marker), take its lock and empty the folders of the pipelines about to
    run; returns the lock file (delete it when done).

    A non-empty folder without the marker is refused: it is not ours to overwrite.
    """
    marker = workspace / WORKSPACE_MARKER
    if workspace.exists() and any(workspace.iterdir()) and not marker.is_file():
        raise DemoStepError(f"{workspace} exists and is not a demo workspace (no {WORKSPACE_MARKER} inside); "
                            "choose another --workspace or remove it yourself")
    workspace.mkdir(parents=True, exist_ok=True)
    marker.write_text("created by run_demo.py; everything in this folder may be deleted by the next demo run\n")
    lock = acquire_workspace_lock(workspace)
    for name in pipelines:
        shutil.rmtree(workspace / name, ignore_errors=True)
    return lock


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_workspace_lock(workspace: Path) -> Path:
    """One demo at a time per workspace: a second run would delete the first one's files mid-way.

    A lock left by a process that no longer exists is taken over.
    """
    workspace.mkdir(parents=True, exist_ok=True)
    lock = workspace / WORKSPACE_LOCK
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and _process_alive(holder):
                raise DemoStepError(f"another demo (process {holder}) is running in {workspace}; wait for it or "
                                    "use another --workspace")
            lock.unlink(missing_ok=True)  # stale lock of a killed run
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return lock
    raise DemoStepError(f"cannot take the demo lock {lock}")


def run_step(step: DemoStep, index: int, total: int) -> float:
    """Run one step, streaming its output; returns the elapsed seconds or raises DemoStepError."""
    print(f"\n{'=' * 100}\n[{index}/{total}] {step.title}", flush=True)
    started = time.time()
    if step.command is not None:
        print("$ " + " ".join(shlex.quote(part) for part in step.command), flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = subprocess.call(step.command, cwd=REPO_ROOT, env=env)
        if code != 0:
            raise DemoStepError(f"step {index} '{step.title}' failed with exit code {code} after "
                                f"{time.time() - started:.1f} s; its output above says why. Command:\n  "
                                + " ".join(shlex.quote(part) for part in step.command))
    if step.action is not None:
        try:
            message = step.action()
        except Exception as error:  # report any failure of an in-process step the same way
            raise DemoStepError(f"step {index} '{step.title}' failed: {type(error).__name__}: {error}") from error
        print(message, flush=True)
    elapsed = time.time() - started
    print(f"[{index}/{total}] {step.title}: done in {elapsed:.1f} s", flush=True)
    return elapsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--only", choices=["brats", "abus"], default=None, help="run one pipeline (default: all registered)")
    add("--workspace", default=WORKSPACE, help=f"demo root, separate from ./data (default: {WORKSPACE})")
    add("--device", default=DEVICE, help=f"auto, cpu, cuda (default: {DEVICE})")
    add("--brats_epochs", type=int, default=BRATS_EPOCHS, help=f"(default: {BRATS_EPOCHS})")
    add("--brats_iterations", type=int, default=BRATS_ITERATIONS, help=f"per epoch (default: {BRATS_ITERATIONS})")
    add("--brats_cases", type=int, default=BRATS_CASES, help=f"(default: {BRATS_CASES})")
    add("--num_workers", type=int, default=NUM_WORKERS, help=f"(default: {NUM_WORKERS})")
    add("--no_progress", action="store_true", help="no progress bars")
    add("--list", action="store_true", help="print the steps and their commands without running them")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    selected = [args.only] if args.only else list(PIPELINES)
    missing = [name for name in selected if name not in PIPELINES]
    if missing:
        print(f"error: no demo steps registered for {missing} yet (available: {sorted(PIPELINES)})", file=sys.stderr)
        return 2
    settings = DemoSettings(workspace=Path(args.workspace).resolve(), device=args.device,
                            brats_epochs=args.brats_epochs, brats_iterations=args.brats_iterations,
                            brats_cases=args.brats_cases, num_workers=args.num_workers,
                            show_progress=not args.no_progress)
    steps = [(name, step) for name in selected for step in PIPELINES[name](settings)]
    if args.list:
        for index, (name, step) in enumerate(steps, 1):
            shown = " ".join(shlex.quote(p) for p in step.command) if step.command else "(in-process)"
            print(f"[{index}] {name}: {step.title}\n    {shown}")
        return 0
    device = "GPU (CUDA)" if _cuda_available() and args.device != "cpu" else "CPU"
    print(f"SegMamba demo: pipelines {', '.join(selected)} on the {device}; workspace {settings.workspace}")
    timings = []
    started = time.time()
    lock = None
    try:
        lock = prepare_workspace(settings.workspace, selected)
        for index, (name, step) in enumerate(steps, 1):
            timings.append((f"{name}: {step.title}", run_step(step, index, len(steps))))
    except DemoStepError as error:
        print(f"\nDEMO STOPPED: {error}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
    print(f"\n{'=' * 100}\nDemo finished in {time.time() - started:.0f} s.")
    for title, seconds in timings:
        print(f"  {seconds:7.1f} s  {title}")
    print("Outputs:")
    for _, step in steps:
        for output in step.outputs:
            print(f"  {output}")
    for name in selected:
        if name in PIPELINE_REPORTS:
            print(f"\n{PIPELINE_REPORTS[name](settings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
