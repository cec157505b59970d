"""From raw head outputs of one image to scored boxes: threshold, top-k, decode, NMS, cap.

Score of an anchor = sigmoid(classification logit) (maximum over classes). The centerness output is not used
(it is never trained, see :mod:`detection.retina_head`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .box_coder import BoxCoder3D
from .boxes import nms_3d


@dataclass
class PostProcessConfig:
    """Inference settings.

    Attributes:
        score_threshold: anchors at or below this score are dropped.
        pre_nms_top_k: at most this many best-scoring anchors are decoded and enter NMS (per image / window).
        nms_threshold: IoU above which a lower-scoring box is suppressed.
        max_detections: boxes kept after NMS.
    """
    score_threshold: float = 0.05
    pre_nms_top_k: int = 1000
    nms_threshold: float = 0.5
    max_detections: int = 100


def postprocess_detections(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor,
                           box_coder: BoxCoder3D, config: PostProcessConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boxes of one image.

    Args:
        cls_logits: ``(N, K)``; box_deltas: ``(N, 6)``; anchors: ``(N, 6)`` internal format.
    Returns:
        ``boxes (M, 6)`` internal format and ``scores (M,)``, sorted by descending score, ``M <= max_detections``.
    """
    scores = torch.sigmoid(cls_logits.float()).max(dim=1).values
    keep = torch.nonzero(scores > config.score_threshold).flatten()
    if keep.numel() > config.pre_nms_top_k > 0:
        keep = keep[scores[keep].topk(config.pre_nms_top_k).indices]
    boxes = box_coder.decode(box_deltas[keep].float(), anchors[keep].to(torch.float32))
    kept = nms_3d(boxes, scores[keep], config.nms_threshold, max_detections=config.max_detections)
    return boxes[kept], scores[keep][kept]
