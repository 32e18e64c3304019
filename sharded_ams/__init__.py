"""sharded-ams: the AMS/Grams optimizer family, ZeRO-1 sharded over torch.distributed."""

from .optimizer import AMS, AdamW, CAdam, Grams
from .update import PRESETS

__all__ = ["AMS", "Grams", "CAdam", "AdamW", "PRESETS"]
__version__ = "0.1.0"
