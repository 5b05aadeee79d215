"""Lightning strategies, installed as `kvtrain.strategies`.

Importing this package registers the DeepSpeed presets with Lightning, so a recipe can say
`trainer.strategy: zero3` (or zero2, zero3_offload).
"""

from .deepspeed import PRESETS, KVDeepSpeedStrategy

__all__ = ["KVDeepSpeedStrategy", "PRESETS"]
