"""3D RetinaNet components for SegMamba-Retina, and detection metrics.

Box formats (see :mod:`detection.boxes`): inside this package and the model, ``[x1, y1, x2, y2, z1, z2]``;
in files and metrics, ``[z1, y1, x1, z2, y2, x2]``; both half-open voxel coordinates. Convert only with
:func:`detection.boxes.convert_boxes`.
"""
from .anchors import AnchorGenerator3D
from .atss_matcher import ATSSMatcher, MatchResult
from .box_coder import BoxCoder3D
from .boxes import (FILE_FORMAT, INTERNAL_FORMAT, MONAI_FORMAT, box_iou, box_volume, clip_boxes_to_shape,
                    convert_boxes, generalized_box_iou_pairwise, mask_to_boxes, nms_3d)
from .fpn import FPN3D
from .losses import RetinaDetectionLoss, giou_loss, sigmoid_focal_loss
from .retina_head import Retina3DHead, flatten_level_outputs
from .sampler import HardNegativeSampler

__all__ = ["AnchorGenerator3D", "ATSSMatcher", "MatchResult", "BoxCoder3D", "FPN3D", "Retina3DHead",
           "flatten_level_outputs", "HardNegativeSampler", "RetinaDetectionLoss", "giou_loss", "sigmoid_focal_loss",
           "FILE_FORMAT", "INTERNAL_FORMAT", "MONAI_FORMAT", "box_iou", "box_volume", "clip_boxes_to_shape",
           "convert_boxes", "generalized_box_iou_pairwise", "mask_to_boxes", "nms_3d"]
