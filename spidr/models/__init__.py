"""SpidR and DinoSR models, their construction from configs and checkpoints, and the published models."""

from spidr.models.convert import state_dict_from_dinosr_fairseq_checkpoint
from spidr.models.dinosr import DinoSR
from spidr.models.pretrained import (
    CHECKPOINT_DIR_ENV,
    CheckpointError,
    build_model,
    dinosr_base_original,
    dinosr_base_reproduced,
    model_from_raw_checkpoint,
    spidr_base,
)
from spidr.models.spidr import SpidR

__all__ = [
    "CHECKPOINT_DIR_ENV",
    "CheckpointError",
    "DinoSR",
    "SpidR",
    "build_model",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "model_from_raw_checkpoint",
    "spidr_base",
    "state_dict_from_dinosr_fairseq_checkpoint",
]
