"""SegMamba-Retina: SegMamba (Mamba encoder + UNETR decoder) with a 3D RetinaNet detection branch.

Detection pathway: the encoder outputs at strides 4, 8 and 16 (``outs[1..3]``) plus a parameter-free 2×2×2
max-pool of the deepest one (stride 32) feed a 4-level :class:`~detection.fpn.FPN3D`; a shared
:class:`~detection.retina_head.Retina3DHead` predicts per anchor a foreground logit and 6 box deltas against
:class:`~detection.anchors.AnchorGenerator3D` anchors (18 per location with the defaults). The segmentation head
is named ``seg_out`` (the plain SegMamba's is ``out``).

Parameters with the defaults (in 1, out 2, FPN 128, 4 head convs, 18 anchors): 73,307,138 in all, of which
FPN 1,905,664 and head 4,038,800; 5,944,464 trainable with a frozen backbone. State-dict keys follow the
reference layout (``vit.*``, ``encoderK.*``, ``decoderK.*``, ``seg_out.*``, ``fpn.*``, ``retina_head.*``,
``anchor_generator._dummy``) so reference checkpoints load strictly.

Input ``(B, Cin, D, H, W)`` with every spatial size a multiple of 16 and at least 32. For 128³:

=====================  =================================================================
``seg_logits``         ``(B, out_chans, 128, 128, 128)``
``cls_logits``         4 maps ``(B, A*K, s, s, s)`` for s = 32, 16, 8, 4
``box_deltas``         4 maps ``(B, A*6, s, s, s)``
``centerness``         4 maps ``(B, A, s, s, s)`` (untrained, kept for checkpoint compatibility)
``anchors``            ``(673920, 6)`` internal box format ``[x1, y1, x2, y2, z1, z2]``
=====================  =================================================================
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from detection.anchors import AnchorGenerator3D
from detection.box_coder import BoxCoder3D
from detection.fpn import FPN3D
from detection.retina_head import Retina3DHead, flatten_level_outputs

from .segmamba import SegMamba, check_input_size
from .weights import extract_state_dict, load_model_weights, read_checkpoint

logger = logging.getLogger(__name__)

DETECTION_PREFIXES = ("fpn.", "retina_head.", "anchor_generator.")
BACKBONE_PREFIXES = ("vit.", "encoder", "decoder", "seg_out.")


class SegMambaWithRetina(SegMamba):
    """SegMamba with a RetinaNet branch (see the module docstring).

    Args:
        in_chans, out_chans, depths, feat_size, hidden_size, norm_name, res_block: as :class:`SegMamba`.
        fpn_channels: FPN / head width.
        num_anchors: anchors per location; must equal the anchor generator's (18 with the defaults).
        num_classes: foreground detection classes.
        num_head_convs: convolutions per head tower.
    """

    def __init__(self, in_chans: int = 1, out_chans: int = 2, depths: Sequence[int] = (2, 2, 2, 2),
                 feat_size: Sequence[int] = (48, 96, 192, 384), fpn_channels: int = 128, num_anchors: int = 18,
                 num_classes: int = 1, num_head_convs: int = 4, hidden_size: int = 768, norm_name="instance",
                 res_block: bool = True) -> None:
        super().__init__(in_chans=in_chans, out_chans=out_chans, depths=depths, feat_size=feat_size,
                         hidden_size=hidden_size, norm_name=norm_name, res_block=res_block)
        # Same output block as SegMamba, registered under the reference's Retina name ``seg_out``.
        self.seg_out = self._modules.pop("out")
        f = self.feat_size
        self.fpn = FPN3D([f[1], f[2], f[3], f[3]], fpn_channels)
        self.retina_head = Retina3DHead(fpn_channels, num_classes, num_anchors, num_head_convs)
        self.anchor_generator = AnchorGenerator3D()
        if self.anchor_generator.num_anchors_per_location != num_anchors:
            raise ValueError(f"num_anchors={num_anchors} but the anchor generator makes "
                             f"{self.anchor_generator.num_anchors_per_location} anchors per location")
        self.box_coder = BoxCoder3D()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.fpn_channels = fpn_channels
        self.num_head_convs = num_head_convs

    def model_config(self) -> Dict[str, object]:
        """Keyword arguments that rebuild this architecture (stored in checkpoints)."""
        return {"in_chans": self.in_chans, "out_chans": self.out_chans, "depths": list(self.depths),
                "feat_size": list(self.feat_size), "hidden_size": self.hidden_size,
                "fpn_channels": self.fpn_channels, "num_anchors": self.num_anchors,
                "num_classes": self.num_classes, "num_head_convs": self.num_head_convs}

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"SegMambaWithRetina(in_chans={self.in_chans}) expects (B, {self.in_chans}, D, H, W), "
                             f"got {tuple(x.shape)}")
        check_input_size(x.shape[2:])
        if min(x.shape[2:]) < 32:
            raise ValueError(f"SegMambaWithRetina needs every spatial size >= 32 (stride-32 pyramid level), "
                             f"got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor, return_seg: bool = True, return_det: bool = True) -> Dict[str, object]:
        """See the module docstring for the returned keys (seg keys only with ``return_seg``, detection keys
        only with ``return_det``)."""
        self._check_input(x)
        outs = self.vit(x)
        result: Dict[str, object] = {}
        if return_seg:
            result["seg_logits"] = self.seg_out(self.decode(x, outs))
        if return_det:
            pyramid_inputs = [outs[1], outs[2], outs[3], F.max_pool3d(outs[3], kernel_size=2, stride=2)]
            features = self.fpn(pyramid_inputs)
            cls_logits, box_deltas, centerness = self.retina_head(features)
            anchors, per_level = self.anchor_generator(features)
            result.update(cls_logits=cls_logits, box_deltas=box_deltas, centerness=centerness,
                          anchors=anchors, num_anchors_per_level=per_level)
        return result

    def forward_seg_only(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(B, out_chans, D, H, W)`` (callable by sliding-window inference)."""
        return self.forward(x, return_seg=True, return_det=False)["seg_logits"]

    def forward_det_only(self, x: torch.Tensor) -> Dict[str, object]:
        """Flattened detection outputs: ``cls (B, N, K)``, ``box (B, N, 6)``, ``ctr (B, N, 1)``, ``anchors (N, 6)``,
        ``num_anchors_per_level``."""
        out = self.forward(x, return_seg=False, return_det=True)
        return flatten_detection_outputs(out, self.num_classes)


def flatten_detection_outputs(out: Dict[str, object], num_classes: int) -> Dict[str, object]:
    """Per-level head maps of :meth:`SegMambaWithRetina.forward` → ``(B, N, ·)`` tensors in anchor order."""
    return {"cls": flatten_level_outputs(out["cls_logits"], num_classes),
            "box": flatten_level_outputs(out["box_deltas"], 6),
            "ctr": flatten_level_outputs(out["centerness"], 1),
            "anchors": out["anchors"], "num_anchors_per_level": out["num_anchors_per_level"]}


def backbone_parameter_names(model: torch.nn.Module) -> List[str]:
    """Names of the parameters frozen by ``--freeze_backbone`` (encoder, decoder, segmentation head)."""
    return [name for name, _ in model.named_parameters() if name.startswith(BACKBONE_PREFIXES)]


def freeze_backbone(model: torch.nn.Module) -> int:
    """Set ``requires_grad=False`` on the backbone parameters; returns the number of parameters frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if name.startswith(BACKBONE_PREFIXES):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


class PretrainedLoadError(RuntimeError):
    """A segmentation checkpoint does not fit the SegMamba-Retina backbone (message lists the mismatches)."""


@dataclass
class PretrainedLoadReport:
    """What :func:`load_pretrained_segmamba` did."""
    path: str
    loaded: int
    missing_detection_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    renamed_out_to_seg_out: bool = False

    def summary(self) -> str:
        text = (f"loaded {self.loaded} backbone tensors from {self.path}; "
                f"{len(self.missing_detection_keys)} detection tensors keep their initialisation")
        if self.renamed_out_to_seg_out:
            text += "; segmentation head 'out.*' loaded as 'seg_out.*'"
        if self.unexpected_keys:
            text += f"; ignored {len(self.unexpected_keys)} unexpected tensors ({self.unexpected_keys[:5]})"
        return text


def load_pretrained_segmamba(model: SegMambaWithRetina, path: str) -> PretrainedLoadReport:
    """Initialise the backbone (encoder, decoder, segmentation head) from a SegMamba checkpoint.

    Accepts the reference's plain state dicts, wrapped ones (``model`` / ``state_dict`` / ``module``, a
    ``module.`` prefix) and this project's training checkpoints. A SegMamba head ``out.*`` is loaded as
    ``seg_out.*``. Detection tensors absent from the file keep their initialisation.

    Raises:
        FileNotFoundError: ``path`` does not exist (never a silent skip).
        PretrainedLoadError: a backbone tensor is missing from the file or has another shape (e.g. a
            checkpoint trained with other ``feat_size`` / channel counts); the message lists them.
    """
    state = extract_state_dict(read_checkpoint(path))
    renamed = False
    if "out.conv.conv.weight" in state and "seg_out.conv.conv.weight" not in state:
        state = {("seg_out." + key[len("out."):] if key.startswith("out.") else key): value
                 for key, value in state.items()}
        renamed = True
    own = model.state_dict()
    missing_backbone = [key for key in own if key not in state and not key.startswith(DETECTION_PREFIXES)]
    shape_mismatch = [key for key in own if key in state and tuple(state[key].shape) != tuple(own[key].shape)]
    if missing_backbone or shape_mismatch:
        def listing(title: str, items: List[str]) -> str:
            shown = "\n    ".join(items[:10]) + (f"\n    ... and {len(items) - 10} more" if len(items) > 10 else "")
            return f"  {title} ({len(items)}):\n    {shown}\n" if items else ""
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape_mismatch]
        raise PretrainedLoadError(
            f"{path} does not fit the SegMamba-Retina backbone:\n" + listing("missing backbone tensors", missing_backbone)
            + listing("shape mismatches", shapes)
            + "  Was it trained with other --feat_size / --hidden_size or channel counts?")
    unexpected = sorted(key for key in state if key not in own)
    usable = {key: value for key, value in state.items() if key in own}
    model.load_state_dict(usable, strict=False)
    result = PretrainedLoadReport(path=str(path), loaded=sum(1 for k in usable if not k.startswith(DETECTION_PREFIXES)),
                                  missing_detection_keys=[k for k in own if k not in state],
                                  unexpected_keys=unexpected, renamed_out_to_seg_out=renamed)
    logger.info(result.summary())
    return result


def build_retina_from_checkpoint(checkpoint: Dict[str, object], source: str = "checkpoint",
                                 overrides: Optional[Dict[str, object]] = None) -> SegMambaWithRetina:
    """Rebuild SegMamba-Retina with the architecture stored in a training checkpoint (``model_config``) or the
    defaults for a bare reference state dict, then load the weights strictly (a mismatch raises
    :class:`~model_segmamba.weights.CheckpointMismatchError` listing the differences)."""
    config = dict(checkpoint.get("model_config") or {}) if isinstance(checkpoint, dict) else {}
    config.update(overrides or {})
    model = SegMambaWithRetina(**config)
    load_model_weights(model, checkpoint, strict=True, name=source)
    return model
