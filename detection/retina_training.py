"""Training SegMamba-Retina with the shared :class:`light_training.trainer.Trainer`.

* :class:`RetinaPatchStream` — reproducible batches of patches with their ground-truth boxes. With probability
  ``fg_ratio`` a patch is centred on a random lesion box (plus a uniform jitter of up to a quarter patch per
  axis), otherwise placed uniformly. Case boxes are the 6-connected components of ``seg > 0`` (computed once
  per case); in the patch they are clipped, and kept when every side is at least ``min_box_side`` voxels.
  Optional mirror augmentation flips image, mask and boxes together.
* :class:`RetinaTrainer` — AdamW over the trainable parameters, poly LR per iteration, loss =
  ``seg_weight`` · (CE + Dice) + ramp · ``det_weight`` · (focal + L1 + 2 GIoU) where the detection ramp is
  ``min(1, epoch / det_warmup_epochs)`` (epoch counted from 1). With a frozen backbone the segmentation branch
  is not run during training (it could not learn anything).
* :class:`RetinaValidator` — whole-volume sliding-window validation (``mode="volume"``) or a fixed, seeded set of
  lesion-centred patches per case (``mode="patch"``, cheaper). Metrics pooled over the validation cases: Dice,
  AP at IoU 0.1/0.25/0.5, lesion recall at 0.25 and the FROC score at IoU 0.3 and 0.1.

Model selection (``selection_key``): ``froc_iou0.3`` (mean sensitivity at 1/8 … 8 false positives per volume,
TDSC-ABUS 2023) when the backbone is frozen — the Dice cannot change then — and ``combined`` =
(Dice + FROC@0.3) / 2 when the whole model trains.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from light_training.dataloading import (CaseDataset, PatchBatchStream, PatchLoader, choose_patch_start,
                                        crop_with_padding, patch_start_bounds)
from light_training.trainer import SegmentationLoss, Trainer

from .boxes import FILE_FORMAT, INTERNAL_FORMAT, convert_boxes, mask_to_boxes
from .losses import RetinaDetectionLoss
from .metrics import CaseDetections, average_precision, froc, lesion_recall_precision
from .retina_head import flatten_level_outputs
from .sliding_window import RetinaInferenceConfig, predict_volume

SELECTION_KEYS = ("froc_iou0.3", "ap_iou0.25", "dice", "combined")


def case_boxes_from_seg(seg: np.ndarray, connectivity: int = 6) -> np.ndarray:
    """Lesion boxes of a preprocessed ``seg`` ``(1, Z, Y, X)`` or ``(Z, Y, X)`` (``-1`` counts as background),
    file format ``[z1, y1, x1, z2, y2, x2]`` int64."""
    seg = np.asarray(seg)
    return mask_to_boxes(seg[0] if seg.ndim == 4 else seg, connectivity=connectivity)[0]


def boxes_in_patch(case_boxes: np.ndarray, start_zyx: Sequence[int], patch_zyx: Sequence[int],
                   min_box_side: float = 2.0) -> np.ndarray:
    """File-format case boxes → file-format boxes of the patch at ``start_zyx``: shifted, clipped to the patch,
    kept when every clipped side is ``>= min_box_side`` voxels. Returns float32 ``(M, 6)``."""
    if case_boxes.size == 0:
        return np.zeros((0, 6), np.float32)
    start = np.asarray(start_zyx, dtype=np.float64)
    patch = np.asarray(patch_zyx, dtype=np.float64)
    lo = np.clip(case_boxes[:, :3] - start, 0, patch)
    hi = np.clip(case_boxes[:, 3:] - start, 0, patch)
    keep = np.all(hi - lo >= min_box_side, axis=1)
    return np.concatenate([lo, hi], axis=1)[keep].astype(np.float32)


def flip_boxes(boxes_file: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Mirror file-format boxes along array axis ``axis`` (0 = z, 1 = y, 2 = x) of a patch of ``size`` voxels."""
    out = boxes_file.copy()
    out[:, axis] = size - boxes_file[:, axis + 3]
    out[:, axis + 3] = size - boxes_file[:, axis]
    return out


class RetinaPatchStream(PatchBatchStream):
    """Patch batches with boxes; batch ``g`` is a pure function of ``(seed, rank, g)`` (see
    :class:`light_training.dataloading.PatchBatchStream`).

    Batch: ``{"data": float32 (B, C, *patch), "seg": int64 (B, 1, *patch) (0/1), "boxes": list of B float32
    tensors (M_b, 6) in the internal format [x1, y1, x2, y2, z1, z2], "keys": names}``.
    """

    def __init__(self, dataset: CaseDataset, patch_size: Sequence[int], batch_size: int, fg_ratio: float = 0.5,
                 mirror: bool = True, min_box_side: float = 2.0, connectivity: int = 6, seed: int = 0,
                 rank: int = 0, start_batch: int = 0, num_batches: Optional[int] = None) -> None:
        super().__init__(dataset, patch_size, batch_size, oversample_foreground=0.0, transform=None, seed=seed,
                         rank=rank, start_batch=start_batch, num_batches=num_batches)
        if not 0.0 <= fg_ratio <= 1.0:
            raise ValueError(f"fg_ratio must be in [0, 1], got {fg_ratio}")
        self.fg_ratio = float(fg_ratio)
        self.mirror = bool(mirror)
        self.min_box_side = float(min_box_side)
        self.connectivity = int(connectivity)
        self._case_boxes: Dict[int, np.ndarray] = {}

    def case_boxes(self, index: int) -> np.ndarray:
        if index not in self._case_boxes:
            _, seg = self.dataset.arrays(index)
            if seg is None:
                raise ValueError(f"{self.dataset.paths[index]}: no 'seg' array; detection training needs labels")
            self._case_boxes[index] = case_boxes_from_seg(seg, self.connectivity)
        return self._case_boxes[index]

    def patch_start(self, shape: Sequence[int], boxes: np.ndarray, rng: np.random.Generator) -> Tuple[int, ...]:
        """Lesion-centred (probability ``fg_ratio``, jitter ≤ patch/4 per axis) or uniform patch start."""
        if boxes.shape[0] and rng.random() < self.fg_ratio:
            box = boxes[int(rng.integers(boxes.shape[0]))]
            centre = (box[:3] + box[3:]) // 2
            jitter = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in self.patch_size]
            lower, upper = patch_start_bounds(shape, self.patch_size)
            return tuple(int(min(hi, max(lo, c + j - p // 2)))
                         for c, j, p, lo, hi in zip(centre, jitter, self.patch_size, lower, upper))
        return choose_patch_start(shape, self.patch_size, rng)

    def make_batch(self, batch_index: int) -> Dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.rank, int(batch_index)])
        datas, segs, boxes_out, keys = [], [], [], []
        for case_index in rng.integers(len(self.dataset), size=self.batch_size):
            case_index = int(case_index)
            data, seg = self.dataset.arrays(case_index)
            case_boxes = self.case_boxes(case_index)
            start = self.patch_start(data.shape[1:], case_boxes, rng)
            data_patch = crop_with_padding(data, start, self.patch_size, 0.0)
            seg_patch = crop_with_padding(seg, start, self.patch_size, -1)
            patch_boxes = boxes_in_patch(case_boxes, start, self.patch_size, self.min_box_side)
            if self.mirror:
                for axis in range(3):
                    if rng.random() < 0.5:
                        data_patch = np.flip(data_patch, axis + 1)
                        seg_patch = np.flip(seg_patch, axis + 1)
                        patch_boxes = flip_boxes(patch_boxes, axis, self.patch_size[axis])
            datas.append(torch.from_numpy(np.ascontiguousarray(data_patch, dtype=np.float32)))
            segs.append(torch.from_numpy(np.ascontiguousarray(seg_patch > 0).astype(np.int64)))
            boxes_out.append(convert_boxes(torch.from_numpy(patch_boxes), FILE_FORMAT, INTERNAL_FORMAT).contiguous())
            keys.append(self.dataset.keys[case_index])
        return {"data": torch.stack(datas), "seg": torch.stack(segs), "boxes": boxes_out, "keys": keys}


def make_retina_patch_loader(dataset: CaseDataset, patch_size: Sequence[int], batch_size: int, *,
                             fg_ratio: float = 0.5, mirror: bool = True, seed: int = 0, rank: int = 0,
                             num_workers: int = 0, pin_memory: bool = False, start_batch: int = 0) -> PatchLoader:
    """Endless loader of :class:`RetinaPatchStream` batches starting at global batch ``start_batch``.

    Meant as the trainer's data factory (``functools.partial`` of everything but ``start_batch``): a resumed run
    asks for ``start_batch = global_step`` and continues the exact batch sequence of an uninterrupted run.
    """
    stream = RetinaPatchStream(dataset, patch_size, batch_size, fg_ratio=fg_ratio, mirror=mirror, seed=seed,
                               rank=rank, start_batch=start_batch, num_batches=None)
    return PatchLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------- validation

class RetinaValidator:
    """Validation cases → per-case Dice and detections (pooled by :meth:`RetinaTrainer.validate`).

    Args:
        dataset: validation cases (with segmentations).
        inference: sliding-window / post-processing settings (its ``patch_size`` is the window).
        mode: ``"volume"`` (whole volumes, sliding window) or ``"patch"`` (up to ``patches_per_case``
            lesion-centred windows per case, fixed by ``seed``, each scored as a small volume).
        selection_key: one of ``SELECTION_KEYS``.
    """

    def __init__(self, dataset: CaseDataset, inference: RetinaInferenceConfig, mode: str = "volume",
                 selection_key: str = "froc_iou0.3", patches_per_case: int = 2, seed: int = 0,
                 connectivity: int = 6) -> None:
        if mode not in ("volume", "patch"):
            raise ValueError(f"mode must be 'volume' or 'patch', got {mode!r}")
        if selection_key not in SELECTION_KEYS:
            raise ValueError(f"selection_key must be one of {SELECTION_KEYS}, got {selection_key!r}")
        self.dataset = dataset
        self.inference = inference
        self.mode = mode
        self.selection_key = selection_key
        self.patches_per_case = patches_per_case
        self.seed = seed
        self.connectivity = connectivity

    def num_cases(self) -> int:
        return len(self.dataset)

    def _dice(self, probabilities: torch.Tensor, seg: np.ndarray) -> float:
        from light_training.evaluation import dice

        prediction = probabilities.argmax(dim=0).numpy() > 0
        return dice(prediction, np.asarray(seg) > 0, empty="brats")

    def evaluate_case(self, model: torch.nn.Module, index: int, device: torch.device
                      ) -> Tuple[List[float], List[CaseDetections]]:
        """Dice values and detections of one case (one entry per volume or per patch)."""
        data, seg = self.dataset.arrays(index)
        seg3 = seg[0]
        key = self.dataset.keys[index]
        gt_boxes = case_boxes_from_seg(seg3, self.connectivity)
        if self.mode == "volume":
            regions = [(data, seg3, gt_boxes, key)]
        else:
            rng = np.random.default_rng([self.seed, index])
            patch = tuple(int(p) for p in self.inference.patch_size)
            lower, upper = patch_start_bounds(seg3.shape, patch)
            order = rng.permutation(gt_boxes.shape[0])[:self.patches_per_case] if gt_boxes.shape[0] else []
            starts = [tuple(int(min(hi, max(lo, c - p // 2))) for c, p, lo, hi in
                            zip((gt_boxes[i, :3] + gt_boxes[i, 3:]) // 2, patch, lower, upper)) for i in order]
            if not starts:
                starts = [choose_patch_start(seg3.shape, patch, rng)]
            regions = []
            for n, start in enumerate(starts):
                regions.append((crop_with_padding(data, start, patch, 0.0),
                                crop_with_padding(seg, start, patch, -1)[0],
                                boxes_in_patch(gt_boxes, start, patch, 1.0), f"{key}#{n}"))
        dices, detections = [], []
        config = self.inference
        for volume, labels, boxes, name in regions:
            result = predict_volume(model, volume, config, device)
            if result.probabilities is not None:
                dices.append(self._dice(result.probabilities, labels))
            pred_file = convert_boxes(result.boxes.double(), INTERNAL_FORMAT, FILE_FORMAT).numpy()
            detections.append(CaseDetections(name, pred_file, result.scores.double().numpy(), boxes))
        return dices, detections


def pooled_validation_metrics(dices: Sequence[float], cases: Sequence[CaseDetections]) -> Dict[str, float]:
    """Dice mean and detection metrics pooled over cases (see module docstring for the keys)."""
    metrics: Dict[str, float] = {"dice": float(np.mean(dices)) if len(dices) else math.nan}
    for threshold in (0.1, 0.25, 0.5):
        metrics[f"ap_iou{threshold:g}"] = average_precision(cases, threshold)
    metrics["recall_iou0.25"] = lesion_recall_precision(cases, 0.25)[0]
    metrics["froc_iou0.3"] = froc(cases, 0.3).score
    metrics["froc_iou0.1"] = froc(cases, 0.1).score
    dice_value = metrics["dice"] if math.isfinite(metrics["dice"]) else 0.0
    metrics["combined"] = 0.5 * (dice_value + metrics["froc_iou0.3"])
    metrics["num_predictions"] = float(sum(c.pred_boxes.shape[0] for c in cases))
    return metrics


# ----------------------------------------------------------------------------------------------- trainer

class RetinaTrainer(Trainer):
    """:class:`~light_training.trainer.Trainer` with the SegMamba-Retina loss, AdamW and pooled detection
    validation.

    Args (besides the Trainer's; ``train_data`` is best a factory ``start_batch -> loader`` such as a partial of
    :func:`make_retina_patch_loader`, for exact resume):
        detection_loss: the RetinaNet loss (focal alpha/gamma, ATSS, sampler).
        seg_weight, det_weight: loss weights.
        det_warmup_epochs: linear ramp of the detection weight over the first epochs (0 = none).
        train_segmentation: run the segmentation branch and its loss (False with a frozen backbone).
        inference_settings: stored in checkpoints (key ``inference``) so prediction uses the training window.
        run_settings: the script's flags, stored for provenance (key ``run_settings``).
    """

    def __init__(self, model: torch.nn.Module, config, train_data,
                 detection_loss: RetinaDetectionLoss, validator: Optional[RetinaValidator] = None,
                 context=None, model_config: Optional[Dict[str, Any]] = None, seg_weight: float = 1.0,
                 det_weight: float = 1.0, det_warmup_epochs: int = 50, train_segmentation: bool = True,
                 inference_settings: Optional[Dict[str, Any]] = None,
                 run_settings: Optional[Dict[str, Any]] = None) -> None:
        self.detection_loss = detection_loss
        self.seg_weight = float(seg_weight)
        self.det_weight = float(det_weight)
        self.det_warmup_epochs = int(det_warmup_epochs)
        self.train_segmentation = bool(train_segmentation)
        self.inference_settings = dict(inference_settings or {})
        super().__init__(model, config, train_data, loss_fn=SegmentationLoss("dice_ce"), validator=validator,
                         context=context, model_config=model_config, run_settings=run_settings)

    def build_optimizer(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW over the parameters that train (a frozen backbone is left out)."""
        trainable = [p for p in parameters if p.requires_grad]
        if not trainable:
            raise ValueError("no trainable parameters")
        return torch.optim.AdamW(trainable, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)

    def detection_scale(self, epoch_index: int) -> float:
        """Detection-loss ramp for the 0-based epoch ``epoch_index``: min(1, (epoch_index + 1) / warmup)."""
        if self.det_warmup_epochs <= 0:
            return 1.0
        return min(1.0, (epoch_index + 1) / self.det_warmup_epochs)

    def training_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        data = torch.as_tensor(batch["data"]).to(self.device, non_blocking=True).float()
        out = self.network(data, return_seg=self.train_segmentation, return_det=True)
        model = self.model
        cls = flatten_level_outputs(out["cls_logits"], model.num_classes)
        deltas = flatten_level_outputs(out["box_deltas"], 6)
        det = self.detection_loss(cls, deltas, out["anchors"], out["num_anchors_per_level"],
                                  model.anchor_generator.num_anchors_per_location, list(batch["boxes"]))
        scale = self.detection_scale(self.epoch + 1)
        loss = scale * self.det_weight * det.total
        step = self.global_step
        self._scalar("train/det_cls", float(det.cls.detach()), step)
        self._scalar("train/det_reg", float(det.reg.detach()), step)
        self._scalar("train/det_positives", float(det.num_positives), step)
        self._scalar("train/det_scale", scale, step)
        if self.train_segmentation and self.seg_weight > 0:
            target = torch.as_tensor(batch["seg"]).to(self.device, non_blocking=True)
            seg_loss = self.loss_fn(out["seg_logits"], target)
            self._scalar("train/seg_loss", float(seg_loss.detach()), step)
            loss = loss + self.seg_weight * seg_loss
        return loss

    def checkpoint_state(self) -> Dict[str, Any]:
        state = super().checkpoint_state()
        state["inference"] = dict(self.inference_settings)
        return state

    def validate(self) -> Dict[str, float]:
        """Pooled metrics over all validation cases (split across ranks, gathered)."""
        results = self.evaluate_validation_cases()
        dices = [d for case_dices, _ in results for d in case_dices]
        cases = [c for _, case_detections in results for c in case_detections]
        return pooled_validation_metrics(dices, cases)
