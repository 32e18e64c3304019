"""sharded-ams: the AMS/Grams optimizer family, ZeRO-1 sharded over torch.distributed."""

from .optimizer import AMS, AdamW, CAdam, Grams
from .sharded import ShardedAMS, StepInfo
from .update import PRESETS

__all__ = ["AMS", "Grams", "CAdam", "AdamW", "ShardedAMS", "StepInfo", "PRESETS"]
__version__ = "0.1.0"
