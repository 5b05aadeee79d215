"""The ternary codec: groups of K or V as -s, 0, +s (`kvtrain.quant.ternary`, VidKV's values with
their scale), below 2 bits per entry with every byte counted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtrain.kv.codecs import Payload, register
from kvtrain.kv.codecs.affine import GroupedCodec, ScaleDtype, _grouped_layout, _token_major
from kvtrain.quant.packing import pack_trits, unpack_trits
from kvtrain.quant.ternary import ternary_dequantize, ternary_quantize


@register("ternary")
@dataclass(frozen=True)
class Ternary(GroupedCodec):
    """Ternary codes in per_channel(G) or per_token(G) groups, one scale per group in `scale_dtype`
    and no zero point. Each token's codes are packed five per byte along head_dim (1.6 bits stored
    per entry, a row padded to whole bytes: 7 bytes for 32 entries)."""

    examples: ClassVar[tuple[dict[str, Any], ...]] = (
        dict(bits=2, granularity="per_token(16)"), dict(bits=2, granularity="per_channel(16)"),
    )

    scale_dtype: ScaleDtype = "float16"

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "Ternary":
        group, axis = cls._grouping(policy)
        if bits != 2 or policy.symmetric or policy.clip_ratio != 1:
            raise ValueError(f"the ternary codec's codes are -1, 0, +1 (a 2-bit code space stored in 1.6 bits), "
                             f"symmetric by construction and unclipped: set bits: 2 and leave symmetric and "
                             f"clip_ratio unset (got bits={bits}, symmetric={policy.symmetric}, "
                             f"clip_ratio={policy.clip_ratio})")
        return cls(bits, group, axis, policy.scale_dtype)

    def encode(self, x: torch.Tensor) -> Payload:
        codes, scale = ternary_quantize(x, self.group_size, self._dim, self.param_dtype)
        if self.axis == "channel":  # token-major, as the affine codec: (B, H, groups, G, D)
            codes, scale = _token_major(codes), _token_major(scale)
        else:  # a token's groups side by side: one row of head_dim codes
            codes = codes.flatten(-2)
        tensors = {"codes": pack_trits(codes), "scale": scale.contiguous()}
        return Payload(tensors, dict.fromkeys(tensors, 2), tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        t, dim = payload.tensors, payload.shape[-1]
        codes, scale = unpack_trits(t["codes"], dim), t["scale"]
        if self.axis == "channel":
            codes, scale = _grouped_layout(codes), _grouped_layout(scale)
        else:
            codes = codes.unflatten(-1, (dim // self.group_size, self.group_size))
        return ternary_dequantize(codes, scale, self._dim, torch.Size(payload.shape), payload.dtype)
