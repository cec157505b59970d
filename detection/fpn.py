"""3D feature pyramid network (top-down pathway with lateral 1x1 convolutions).

State-dict layout (kept from the reference so checkpoints load):
``lateral_convs.{i}.weight``, ``output_convs.{i}.conv.weight``, ``output_convs.{i}.norm.{weight,bias}``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_norm_groups(channels: int, preferred: int = 32) -> int:
    """Largest of ``preferred, preferred/2, …, 1`` that divides ``channels`` and leaves at least two channels per
    group (32 for the default 128 channels; a one-channel group on a 1³ map has nothing to normalise over)."""
    groups = max(1, min(preferred, channels // 2))
    while groups > 1 and channels % groups != 0:
        groups //= 2
    return max(groups, 1)


class ConvNormAct3D(nn.Module):
    """Conv3d(k, no bias) → GroupNorm → SiLU; ``(B, Cin, D, H, W)`` → ``(B, Cout, D', H', W')``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(group_norm_groups(out_channels), out_channels)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class FPN3D(nn.Module):
    """Feature pyramid over encoder feature maps ordered shallow → deep.

    Args:
        in_channels: channels of each input level (e.g. ``[96, 192, 384, 384]`` for SegMamba-Retina).
        out_channels: channels of every output level.
    Input: list of ``(B, in_channels[i], D_i, H_i, W_i)``. Output: list of ``(B, out_channels, D_i, H_i, W_i)``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 128) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(
            nn.Conv3d(c, out_channels, kernel_size=1, bias=False) for c in self.in_channels)
        self.output_convs = nn.ModuleList(
            ConvNormAct3D(out_channels, out_channels, kernel_size=3) for _ in self.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"FPN3D expects {len(self.lateral_convs)} feature maps, got {len(features)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        # Top-down: each level receives the upsampled, already merged coarser level.
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-3:],
                                                      mode="trilinear", align_corners=False)
        return [conv(x) for conv, x in zip(self.output_convs, laterals)]
