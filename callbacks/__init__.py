"""Lightning callbacks, installed as `kvtrain.callbacks`."""

from .export import ExportPretrained
from .kv_quant import KVQuantCallback

__all__ = ["ExportPretrained", "KVQuantCallback"]
