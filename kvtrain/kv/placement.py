"""Where the hook sits: post-RoPE (keys as the attention interface and the cache receive them, the
default) or pre-RoPE (KVQuant's placement: keys are compressed before the rotary embedding).

Pre-RoPE compresses the key the model's rotary embedding was given (recovered from the rotated key by
rotating it back: `apply_rotary_pos_emb` with -sin) and, after decoding, applies the model's own
rotary embedding again with each token's position. Both directions call the model's own functions,
so any RoPE variant it implements (scaled, partial, interleaved) is followed; the training view and the
cache run the same calls on the same positions, so they agree bit for bit.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

Placement = Literal["post_rope", "pre_rope"]
PLACEMENTS = ("post_rope", "pre_rope")


@dataclass
class PreRope:
    """The model's rotary embedding, around a codec: `around(fn, k, positions)` rotates k back to
    before RoPE, applies fn (simulate, or encode-decode) and rotates the result again."""

    rotary: nn.Module  # the model's rotary embedding: (x, position_ids) -> (cos, sin)
    apply: Callable  # the modeling file's apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)

    def rotate(self, k: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        cos, sin = self.rotary(k, positions)
        return self.apply(k, k, cos, -sin if inverse else sin)[1]

    def around(self, fn: Callable[[torch.Tensor], torch.Tensor], k: torch.Tensor, positions: torch.Tensor):
        return self.rotate(fn(self.rotate(k, positions, inverse=True)), positions)


class KeysFirst(PreRope):
    """The rotary embedding of a joint latent's tensor: keys and values side by side along the head axis,
    keys first (`kvtrain.kv.spec.KVSpec.joint_kv`); only the keys are rotated."""

    def rotate(self, kv: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        keys, values = kv.chunk(2, dim=1)
        return torch.cat([super().rotate(keys, positions, inverse), values], dim=1)


def pre_rope_of(model: nn.Module, attention: nn.Module, config) -> PreRope:
    """The model's rotary embedding and its modeling file's apply function, or an error naming why not."""
    name = type(model).__name__
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "mrope_section" in rope:
        raise ValueError(f"{name} uses multimodal RoPE (mrope_section), whose positions are not the tokens' "
                         "positions; placement='pre_rope' does not support it (use placement='post_rope')")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model  # not a vision tower's
    rotaries = [m for m in decoder.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1:
        raise ValueError(f"{name} has {len(rotaries)} rotary embeddings in its decoder; placement='pre_rope' needs "
                         "exactly one (use placement='post_rope')")
    if "layer_type" in inspect.signature(rotaries[0].forward).parameters:
        raise ValueError(f"{name} computes RoPE per layer type (sliding and full attention differ); "
                         "placement='pre_rope' does not support it yet (use placement='post_rope')")
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise ValueError(f"{name}'s modeling file has no apply_rotary_pos_emb; placement='pre_rope' cannot rotate "
                         "its keys back (use placement='post_rope')")
    return PreRope(rotaries[0], apply)
