"""The KV policy: specs, the streaming view shared by training and decoding, attach/detach, the cache."""

from kvtrain.kv.attention import attach, attached, attached_spec, codec_state_dict, detach, load_codec_state
from kvtrain.kv.cache import QuantizedKVCache
from kvtrain.kv.codecs import CODECS, Codec, Payload, register
from kvtrain.kv.spec import (
    CODEC_STATE_FILE, PRESETS, SPEC_FILE, KVQuantSpec, KVSpec, Spec, TensorPolicy, TensorQuant, load_spec, resolve_spec, spec_from_dict,
)

__all__ = ["CODECS", "CODEC_STATE_FILE", "PRESETS", "SPEC_FILE", "Codec", "KVQuantSpec", "KVSpec", "Payload",
           "QuantizedKVCache", "Spec", "TensorPolicy", "TensorQuant", "attach", "attached", "attached_spec",
           "codec_state_dict", "detach", "load_codec_state", "load_spec", "register", "resolve_spec", "spec_from_dict"]
