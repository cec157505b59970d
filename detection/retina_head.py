"""RetinaNet-style 3D head shared across FPN levels.

Two towers of ``num_convs`` × [Conv3d 3³ (no bias), GroupNorm, SiLU]; ``cls_logits`` on the classification tower
(``A * K`` channels), ``box_reg`` (``A * 6`` deltas, see :mod:`detection.box_coder`) and ``centerness`` (``A``
channels) on the regression tower. Channel layout is anchor-major: channel ``a * K + k`` / ``a * 6 + j``.

About ``centerness``: the layer exists only so that reference checkpoints (which contain
``retina_head.centerness.*``) load strictly. It receives **no loss** in this project and is **not** part of the
detection score (score = sigmoid(cls)); the reference multiplied an untrained centerness into its scores.

State-dict keys: ``cls_tower.{0,3,6,9}.weight`` (convs), ``cls_tower.{1,4,7,10}.{weight,bias}`` (GroupNorms), the
same for ``reg_tower``, and ``cls_logits|box_reg|centerness.{weight,bias}``.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import nn

from .fpn import group_norm_groups

PRIOR_PROBABILITY = 0.01  # initial foreground probability of every anchor (focal-loss prior)


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv3d(channels, channels, 3, padding=1, bias=False),
                   nn.GroupNorm(group_norm_groups(channels), channels),
                   nn.SiLU(inplace=True)]
    return nn.Sequential(*layers)


def flatten_level_outputs(level_outputs: Sequence[torch.Tensor], values_per_anchor: int) -> torch.Tensor:
    """Per-level ``(B, A * V, D', H', W')`` maps → ``(B, N, V)`` in the anchor enumeration order
    (level, location in z-y-x C order, anchor)."""
    flat = []
    for out in level_outputs:
        batch, channels, depth, height, width = out.shape
        anchors = channels // values_per_anchor
        out = out.view(batch, anchors, values_per_anchor, depth, height, width)
        out = out.permute(0, 3, 4, 5, 1, 2).reshape(batch, -1, values_per_anchor)
        flat.append(out)
    return torch.cat(flat, dim=1)


class Retina3DHead(nn.Module):
    """Classification and box-regression head applied with the same weights to every FPN level.

    Args:
        in_channels: FPN channels; num_classes: foreground classes K; num_anchors: anchors per location A;
        num_convs: convolutions per tower.
    Input: list of ``(B, in_channels, D_l, H_l, W_l)``.
    Output: three lists over levels: cls ``(B, A*K, D_l, H_l, W_l)``, box deltas ``(B, A*6, …)``,
    centerness ``(B, A, …)``.
    """

    def __init__(self, in_channels: int = 128, num_classes: int = 1, num_anchors: int = 18,
                 num_convs: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_tower = _tower(in_channels, num_convs)
        self.reg_tower = _tower(in_channels, num_convs)
        self.cls_logits = nn.Conv3d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_reg = nn.Conv3d(in_channels, num_anchors * 6, 3, padding=1)
        self.centerness = nn.Conv3d(in_channels, num_anchors, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Focal-loss prior: every anchor starts at foreground probability PRIOR_PROBABILITY.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))

    def forward(self, features: Sequence[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        cls_out, box_out, ctr_out = [], [], []
        for feature in features:
            cls_feature = self.cls_tower(feature)
            reg_feature = self.reg_tower(feature)
            cls_out.append(self.cls_logits(cls_feature))
            box_out.append(self.box_reg(reg_feature))
            ctr_out.append(self.centerness(reg_feature))
        return cls_out, box_out, ctr_out
