"""SegMamba models. ``SegMamba`` for segmentation; ``segmamba_retina.SegMambaWithRetina`` for ABUS detection."""
from .segmamba import GSC, MambaEncoder, MambaLayer, MlpChannel, SegMamba
from .weights import CheckpointMismatchError, extract_state_dict, load_model_weights, read_checkpoint

__all__ = ["GSC", "MambaEncoder", "MambaLayer", "MlpChannel", "SegMamba", "CheckpointMismatchError",
           "extract_state_dict", "load_model_weights", "read_checkpoint"]
