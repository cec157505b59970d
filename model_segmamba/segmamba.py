"""SegMamba: a Mamba encoder with tri-orientated scans and a UNETR-style convolutional decoder.

Architecture and state-dict layout follow the published model (Xing et al., MICCAI 2024) so its checkpoints
load. Differences from the published code, all behaviour-preserving for 128³ inputs:

* The scan orders of every Mamba layer come from the feature map's explicit ``(D, H, W)`` grid, so any patch
  size divisible by 16 works (e.g. 96³ or 160×128×112). For a 128³ input this is exactly the published
  ordering (its hard-coded ``num_slices`` [64, 32, 16, 8] equal the depth of each stage).
* The output head's input width follows ``feat_size[0]`` instead of a hard-coded 48.

Shapes for an input ``(B, Cin, D, H, W)`` (each of D, H, W divisible by 16):

=================  ============================================
encoder stage i    ``(B, feat_size[i], D/2^(i+1), H/2^(i+1), W/2^(i+1))``
bottleneck         ``(B, hidden_size, D/16, H/16, W/16)``
logits             ``(B, out_chans, D, H, W)``
=================  ============================================
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrUpBlock

from mamba_ssm import Mamba
from model_segmamba.channels_last import is_channels_last_3d

# Number of z-slices per stage that the published model hard-codes for 128³ inputs. Kept only as the
# constructor's documented default; the actual scan order always follows the feature map's depth.
REFERENCE_NUM_SLICES = (64, 32, 16, 8)


class GSC(nn.Module):
    """Gated spatial convolution block (two convolution branches summed, then a 1×1 conv, plus residual).

    Despite the name there is no multiplicative gate: "gating" is the sum of a 3×3×3-3×3×3 branch and a
    1×1×1 branch. All instance norms are parameter-free. Input and output ``(B, C, D, H, W)``.
    Parameters: ``56·C² + 4·C``.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        c = in_channels
        self.proj = nn.Conv3d(c, c, 3, 1, 1)
        self.norm = nn.InstanceNorm3d(c)
        self.nonliner = nn.ReLU()
        self.proj2 = nn.Conv3d(c, c, 3, 1, 1)
        self.norm2 = nn.InstanceNorm3d(c)
        self.nonliner2 = nn.ReLU()
        self.proj3 = nn.Conv3d(c, c, 1, 1, 0)
        self.norm3 = nn.InstanceNorm3d(c)
        self.nonliner3 = nn.ReLU()
        self.proj4 = nn.Conv3d(c, c, 1, 1, 0)
        self.norm4 = nn.InstanceNorm3d(c)
        self.nonliner4 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x1 = self.nonliner(self.norm(self.proj(x)))
        x1 = self.nonliner2(self.norm2(self.proj2(x1)))
        x2 = self.nonliner3(self.norm3(self.proj3(x)))
        x = self.nonliner4(self.norm4(self.proj4(x1 + x2)))
        return x + residual


def _maybe_checkpointed(on: bool, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)``; with ``on`` and autograd recording, through ``torch.utils.checkpoint`` (only the inputs are
    kept and ``fn`` runs again in the backward pass)."""
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class MambaLayer(nn.Module):
    """Pre-norm residual Mamba layer over the flattened voxels of a feature map.

    ``(B, C, D, H, W)`` → tokens ``(B, D·H·W, C)`` (C-order, W fastest) → LayerNorm → tri-orientated Mamba
    (forward, reverse and through-slice scans) → back to ``(B, C, D, H, W)`` + input.

    ``num_slices`` is accepted for compatibility with the published constructor; the through-slice order is
    derived from the input's depth, which equals ``num_slices`` for the published 128³ configuration.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 num_slices: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand,
                           bimamba_type="v3", nslices=num_slices)
        self.checkpoint = False  # a run setting (SegMamba.set_activation_checkpointing), not in the state dict

    def _mix(self, tokens: torch.Tensor, grid: Tuple[int, int, int], token_major: bool) -> torch.Tensor:
        return self.mamba(self.norm(tokens), grid=grid, token_major_out=token_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.dim:
            raise ValueError(f"MambaLayer(dim={self.dim}) expects (B, {self.dim}, D, H, W), got {tuple(x.shape)}")
        b, c, d, h, w = x.shape
        tokens = x.reshape(b, c, d * h * w).transpose(1, 2)  # (B, L, C)
        # a channels-last feature map's tokens are contiguous rows: then the output comes back the same way, so
        # that the reshape below is a view in either layout
        token_major = is_channels_last_3d(x)
        # checkpointed: keep only the layer's input; the norm and the three scans run again in the backward pass
        out = _maybe_checkpointed(self.checkpoint and self.training, self._mix, tokens, (d, h, w), token_major)
        return out.transpose(1, 2).reshape(b, c, d, h, w) + x


class MlpChannel(nn.Module):
    """Point-wise MLP over channels: 1×1×1 conv C→2C, exact GELU, 1×1×1 conv 2C→C. ``4·C² + 3·C`` params."""

    def __init__(self, hidden_size: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(hidden_size, mlp_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(mlp_dim, hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MambaEncoder(nn.Module):
    """Four stages of (downsample → GSC → Mamba layers); each stage emits ``mlp_i(norm_i(x))``.

    The main path continues with the un-normalised features; only the emitted outputs are normalised and
    passed through the channel MLP. Returns a tuple of four tensors (see the module docstring for shapes).
    """

    def __init__(self, in_chans: int = 1, depths: Sequence[int] = (2, 2, 2, 2),
                 dims: Sequence[int] = (48, 96, 192, 384), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, out_indices: Sequence[int] = (0, 1, 2, 3),
                 num_slices: Sequence[int] = REFERENCE_NUM_SLICES) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"MambaEncoder needs 4 stages; got depths={list(depths)}, dims={list(dims)}")
        # drop_path_rate / layer_scale_init_value are accepted for signature compatibility; the published
        # model does not use them either.
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(nn.Conv3d(in_chans, dims[0], kernel_size=7, stride=2, padding=3)))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.InstanceNorm3d(dims[i]),
                nn.Conv3d(dims[i], dims[i + 1], kernel_size=2, stride=2),
            ))
        self.gscs = nn.ModuleList(GSC(dims[i]) for i in range(4))
        self.stages = nn.ModuleList(
            nn.Sequential(*[MambaLayer(dims[i], num_slices=num_slices[i]) for _ in range(depths[i])])
            for i in range(4)
        )
        self.out_indices = tuple(out_indices)
        self.mlps = nn.ModuleList()
        for i in range(4):
            # Parameter-free norms, registered as norm0..norm3 like the published model.
            self.add_module(f"norm{i}", nn.InstanceNorm3d(dims[i]))
            self.mlps.append(MlpChannel(dims[i], 2 * dims[i]))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.gscs[i](x)
            x = self.stages[i](x)
            if i in self.out_indices:
                outs.append(self.mlps[i](getattr(self, f"norm{i}")(x)))
        return tuple(outs)


CHECKPOINT_MODES = ("off", "mamba", "full_res", "all")  # SegMamba.set_activation_checkpointing


def check_input_size(spatial: Sequence[int], multiple: int = 16) -> None:
    """Raise a clear error unless every spatial size is a positive multiple of ``multiple``."""
    bad = [s for s in spatial if s <= 0 or s % multiple]
    if bad:
        raise ValueError(
            f"SegMamba needs every spatial size to be a multiple of {multiple} (four stride-2 stages); "
            f"got {tuple(spatial)}. Choose a patch/ROI size such as 64, 96, 128 or 160.")


class SegMamba(nn.Module):
    """SegMamba segmentation network.

    Args:
        in_chans: input channels (4 for BraTS, 1 for ABUS).
        out_chans: output classes (4 for BraTS, 2 for ABUS).
        depths: Mamba layers per encoder stage.
        feat_size: channels per encoder stage.
        hidden_size: channels of the bottleneck block (encoder5).
        norm_name: MONAI norm of the decoder blocks.
        res_block: residual decoder blocks (as published).
        spatial_dims: must be 3.

    ``forward(x)``: ``(B, in_chans, D, H, W)`` → logits ``(B, out_chans, D, H, W)``; D, H, W multiples of 16.
    Parameters: 67,416,196 for (4 → 4), 67,362,674 for (1 → 2).
    """

    def __init__(self, in_chans: int = 1, out_chans: int = 13, depths: Sequence[int] = (2, 2, 2, 2),
                 feat_size: Sequence[int] = (48, 96, 192, 384), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, hidden_size: int = 768, norm_name="instance",
                 conv_block: bool = True, res_block: bool = True, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"SegMamba is a 3D network; spatial_dims={spatial_dims} is not supported")
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.depths = list(depths)
        self.feat_size = list(feat_size)
        self.hidden_size = hidden_size
        f = self.feat_size
        self.vit = MambaEncoder(in_chans, depths=depths, dims=feat_size)

        def basic(cin, cout):
            return UnetrBasicBlock(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=3,
                                   stride=1, norm_name=norm_name, res_block=res_block)

        def up(cin, cout):
            return UnetrUpBlock(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=3,
                                upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)

        self.encoder1 = basic(in_chans, f[0])
        self.encoder2 = basic(f[0], f[1])
        self.encoder3 = basic(f[1], f[2])
        self.encoder4 = basic(f[2], f[3])
        self.encoder5 = basic(f[3], hidden_size)
        self.decoder5 = up(hidden_size, f[3])
        self.decoder4 = up(f[3], f[2])
        self.decoder3 = up(f[2], f[1])
        self.decoder2 = up(f[1], f[0])
        self.decoder1 = basic(f[0], f[0])
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f[0], out_channels=out_chans)
        self.checkpoint_mode = "off"  # a run setting, not part of the architecture or the state dict

    def set_activation_checkpointing(self, mode: Union[bool, str] = True) -> None:
        """Training memory for time: blocks that keep only their inputs during a training forward pass and run
        again in the backward pass (``torch.utils.checkpoint``). Outputs and gradients are unchanged;
        evaluation and the state dict are unaffected.

        ``mode``: ``"mamba"`` the Mamba layers (norm and tri-orientated scans; cheap to recompute, about a
        quarter of what a batch-2 128³ step keeps), ``"full_res"`` the three full-resolution convolution blocks
        (``encoder1``, ``decoder2``, ``decoder1`` with the output head: about 45% of what it keeps, but their
        convolutions are costly to recompute), ``"all"`` both, ``"off"`` / ``False`` none. ``True`` means
        ``"mamba"``, the best trade measured. Under ``torch.compile`` checkpointing the full-resolution blocks was
        measured to save no memory. Figures: ``bench/memory_phases.py`` and the README's Performance section.
        """
        if isinstance(mode, bool):
            mode = "mamba" if mode else "off"
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpointing mode must be one of {CHECKPOINT_MODES} (or a bool); "
                             f"got {mode!r}")
        self.checkpoint_mode = mode
        for module in self.modules():
            if isinstance(module, MambaLayer):
                module.checkpoint = mode in ("mamba", "all")

    @property
    def checkpoint_full_res(self) -> bool:
        return self.checkpoint_mode in ("full_res", "all")

    def _full_res(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpointed(self.checkpoint_full_res and self.training, fn, *args)

    def decode(self, x_in: torch.Tensor, outs: Sequence[torch.Tensor],
               head: Optional[nn.Module] = None) -> torch.Tensor:
        """UNETR-style decoder: skip features from the raw input and the four encoder outputs → the
        full-resolution feature map ``(B, feat_size[0], D, H, W)`` before the output head (or, with ``head``,
        ``head`` applied to it, in the same checkpointed segment)."""
        enc1 = self._full_res(self.encoder1, x_in)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        hidden = self.encoder5(outs[3])
        dec3 = self.decoder5(hidden, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self._full_res(self.decoder2, dec1, enc1)
        if head is None:
            return self._full_res(self.decoder1, dec0)
        return self._full_res(lambda d: head(self.decoder1(d)), dec0)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if x_in.dim() != 5 or x_in.shape[1] != self.in_chans:
            raise ValueError(f"SegMamba(in_chans={self.in_chans}) expects (B, {self.in_chans}, D, H, W), "
                             f"got {tuple(x_in.shape)}")
        check_input_size(x_in.shape[2:])
        outs = self.vit(x_in)
        return self.decode(x_in, outs, head=self.out)
