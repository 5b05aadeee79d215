"""The KV policy: specs, the streaming view shared by training and decoding, attach/detach, the cache."""

from kvtrain.kv.attention import attach, attached, attached_spec, detach
from kvtrain.kv.cache import QuantizedKVCache
from kvtrain.kv.spec import PRESETS, SPEC_FILE, KVQuantSpec, TensorQuant

__all__ = ["PRESETS", "SPEC_FILE", "KVQuantSpec", "QuantizedKVCache", "TensorQuant", "attach", "attached", "attached_spec", "detach"]
