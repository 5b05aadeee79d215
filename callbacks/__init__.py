"""Lightning callbacks, installed as `kvtrain.callbacks`."""

from .export import ExportPretrained
from .kv_quant import KVQuantCallback
from .memory import TrainingStateMemory
from .timing import StepTime

__all__ = ["ExportPretrained", "KVQuantCallback", "StepTime", "TrainingStateMemory"]
