"""Lightning callbacks, installed as `kvtrain.callbacks`."""

from .export import ExportPretrained
from .kv_quant import KVQuantCallback, spec_from_checkpoint
from .memory import TrainingStateMemory
from .timing import StepTime

__all__ = ["ExportPretrained", "KVQuantCallback", "StepTime", "TrainingStateMemory", "spec_from_checkpoint"]
