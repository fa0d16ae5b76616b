"""spidr: SpidR and DinoSR self-supervised speech models, with fused kernels for their training step.

Import what you need from the subpackages: ``spidr.models`` (models and pretrained checkpoints),
``spidr.ops`` (codebook assignment, EMA update and loss kernels), ``spidr.config``.
"""

from spidr._extension import build_info

__version__ = "0.3.0"

__all__ = ["__version__", "build_info"]
