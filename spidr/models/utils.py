"""Model loading under the reference release's names (``spidr.models.utils`` of spidr 0.2.0).

Everything here is defined in :mod:`spidr.models.pretrained` and :mod:`spidr.models.convert`:

- :func:`build_model` and :func:`model_from_raw_checkpoint` return the model in training mode, as the
  release does (call ``.eval()`` before extracting features);
- :func:`spidr_base`, :func:`dinosr_base_reproduced` and :func:`dinosr_base_original` take ``pretrained=``,
  ``check_hash=`` and ``progress=`` (and this library's ``checkpoint=``) and return the model in eval mode;
- :func:`state_dict_from_dinosr_fairseq_checkpoint` converts an original DinoSR fairseq checkpoint.
"""

from spidr.config import DinoSRConfig, ModelType, SpidRConfig
from spidr.models.convert import state_dict_from_dinosr_fairseq_checkpoint
from spidr.models.dinosr import DinoSR
from spidr.models.pretrained import (
    build_model,
    dinosr_base_original,
    dinosr_base_reproduced,
    model_from_raw_checkpoint,
    spidr_base,
)
from spidr.models.spidr import SpidR

__all__ = [
    "DinoSR",
    "DinoSRConfig",
    "ModelType",
    "SpidR",
    "SpidRConfig",
    "build_model",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "model_from_raw_checkpoint",
    "spidr_base",
    "state_dict_from_dinosr_fairseq_checkpoint",
]
