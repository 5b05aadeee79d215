"""Multi-head latent attention (DeepSeek-V2/V3 and the models built on their attention).

Their cache already holds a compressed latent: per token `kv_lora_rank` numbers (the normalized
`kv_a_proj_with_mqa` output, which `kv_b_proj` expands into every head's key and value) and a RoPE'd
key part shared by the heads; transformers hands the cache the latent as "keys" and the RoPE'd part
as "values". So the spec's key policy compresses the latent, once, as each token arrives: the
training view replaces the latent by the codec's simulation (a hook on `kv_a_layernorm`), the cache
(`kvtrain.kv.cache.LatentKVLayer`) encodes it and hands every token back decoded, the same numbers,
so one training forward equals decoding with the cache (float64 parity, tests/test_kv_latent.py).

What it asks of a spec: the RoPE'd part stays in full precision (FlashMLA's FP8 cache keeps it in
bf16 too; it is RoPE'd inside the attention's forward, where no hook reaches), so `value` is None;
the latent's codec is token-wise with no full-precision window or sinks, since a window or
per-channel groups would give each query its own view of the latents, which the one expansion by
`kv_b_proj` per forward cannot serve; no eviction and no pre-RoPE placement (the latent has no RoPE).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kvtrain.kv.cache import QuantizedKVCache
from kvtrain.kv.spec import Spec


def check_latent_spec(spec: Spec, num_layers: int, kv_lora_rank: int, name: str) -> None:
    """Errors for a spec a latent cache cannot hold (module docstring), naming the setting."""
    if spec.eviction is not None:
        raise ValueError(f"{name} caches a latent per token, not per-head keys: eviction does not apply to it yet")
    if spec.joint_kv:
        raise ValueError(f"{name} caches a latent already: joint_kv=True (a joint latent of K and V) does not apply")
    if spec.placement != "post_rope":
        raise ValueError(f"{name} caches a latent, which carries no RoPE: placement must be 'post_rope', got "
                         f"{spec.placement!r}")
    for layer in range(num_layers):
        if spec.values(layer) is not None:
            raise ValueError(f"{name} caches a latent (the spec's key policy compresses it) and a RoPE'd key part, "
                             "which stays in full precision: the spec's value policy must be None, e.g. "
                             "KVSpec(key=dict(bits=2, granularity='per_token(32)'), value=None, residual=0)")
        codec = spec.keys(layer)
        if codec is None:
            continue
        if codec.unit != 1:
            raise ValueError(f"{name}'s latent is encoded token by token as it arrives: the key granularity must be "
                             f"per_token(G) or per_token_head, got a codec grouping {codec.unit} tokens (layer {layer})")
        rule = spec.window(codec)
        if rule.residual or rule.sinks:
            raise ValueError(f"{name}'s latent is encoded as each token arrives: residual and sinks must be 0, got "
                             f"residual={rule.residual}, sinks={rule.sinks}")
        if codec.make_state(kv_lora_rank) is not None:
            raise ValueError(f"{name}'s latent: codecs with learnable state are not supported on latent caches yet")
    spec.check_model(num_layers, kv_lora_rank, name)


def latent_hooks(state: Any, modules: list[nn.Module]) -> list[Any]:
    """Forward hooks on each attention layer's `kv_a_layernorm` that hand on the latent as the cache
    will hold it: simulated by the layer's key codec, unless a QuantizedKVCache is in flight (its
    LatentKVLayer encodes the latent itself)."""
    def hook(layer: int):
        def view(norm, args, latent):
            if isinstance(state.cache, QuantizedKVCache):
                state.cache.viewed(layer, state.spec)
                return latent
            codec = state.spec.keys(layer)
            return latent if codec is None else codec.simulate(latent[:, None])[:, 0]  # as the cache's (B, 1, T, R)

        return view

    handles = []
    for m in modules:
        norm = getattr(m, "kv_a_layernorm", None)
        if not isinstance(norm, nn.Module):
            raise ValueError(f"{type(m).__name__} has kv_lora_rank but no kv_a_layernorm: kvtrain finds the latent "
                             "of DeepSeek-V2/V3-style attention only")
        handles.append(norm.register_forward_hook(hook(m.layer_idx)))
    return handles
