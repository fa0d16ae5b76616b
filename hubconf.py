"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "spidr_base", source="local")``."""

dependencies = ["torch", "numpy"]

from spidr.models import dinosr_base_original, dinosr_base_reproduced, spidr_base  # noqa: E402

__all__ = ["dinosr_base_original", "dinosr_base_reproduced", "spidr_base"]
