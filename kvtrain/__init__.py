"""kvtrain: teach language models to live with a compressed KV cache."""

from kvtrain.kv import KVQuantSpec, QuantizedKVCache, attach, attached, detach

__version__ = "0.1.0"
__all__ = ["KVQuantSpec", "QuantizedKVCache", "attach", "attached", "detach"]
