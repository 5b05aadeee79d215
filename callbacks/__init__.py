"""Lightning callbacks, installed as `kvtrain.callbacks`."""

from .export import ExportPretrained

__all__ = ["ExportPretrained"]
