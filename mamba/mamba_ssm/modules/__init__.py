"""nn.Modules built on :mod:`mamba_ssm.ops`."""
from mamba_ssm.modules.mamba_simple import Mamba

__all__ = ["Mamba"]
