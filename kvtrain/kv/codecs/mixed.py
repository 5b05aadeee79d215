"""The mixed codec: per group of tokens, the widest key channels at b bits and the rest at 1 bit
(`kvtrain.quant.mixed`, VidKV's mixed-precision keys), below 2 bits per entry on average."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtrain.kv.codecs import Payload, register
from kvtrain.kv.codecs.affine import GroupedCodec, ScaleDtype
from kvtrain.quant.mixed import mixed_dequantize, mixed_quantize
from kvtrain.quant.packing import pack, unpack


@register("mixed")
@dataclass(frozen=True)
class MixedChannels(GroupedCodec):
    """per_channel(G) groups: in each, round(high_fraction * head_dim) channels (the widest) at `bits`
    bits, the others at 1 bit; every channel's scale and zero in `scale_dtype`. Stored per group and
    head: which channels are high (one bit each), the high and the low codes packed, the parameters.
    Bits per entry: (high * bits + low) / head_dim for the codes, plus 2 x 16 / G for the parameters
    and 1 / G for the channel mask (head_dim 32, G 64, half high: 1.5 + 0.5 + 0.02)."""

    examples: ClassVar[tuple[dict[str, Any], ...]] = (
        dict(bits=2, granularity="per_channel(16)", high_fraction=0.5),
        dict(bits=4, granularity="per_channel(16)", high_fraction=0.25),
    )

    high_fraction: float = 0.5
    scale_dtype: ScaleDtype = "float16"

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "MixedChannels":
        group, axis = cls._grouping(policy)
        if axis != "channel" or bits < 2 or policy.symmetric or policy.clip_ratio != 1:
            raise ValueError(f"the mixed codec ranks channels within groups of tokens: it takes per_channel(G), "
                             f"bits >= 2 for the widest channels (the rest get 1), no symmetric or clip_ratio (got "
                             f"{policy.granularity}, bits={bits}, symmetric={policy.symmetric}, "
                             f"clip_ratio={policy.clip_ratio})")
        return cls(bits, group, axis, policy.high_fraction, policy.scale_dtype)

    def high(self, head_dim: int) -> int:
        """How many channels of a head are kept at `bits`."""
        return round(self.high_fraction * head_dim)

    def encode(self, x: torch.Tensor) -> Payload:
        mask, high, low, scale, zero = mixed_quantize(x, self.group_size, self.high(x.shape[-1]), self.bits,
                                                      self.param_dtype)
        tensors = {"channels": pack(mask.to(torch.uint8), 1), "codes_high": pack(high.flatten(-2), self.bits),
                   "codes_low": pack(low.flatten(-2), 1), "scale": scale.squeeze(-2), "zero": zero.squeeze(-2)}
        return Payload(tensors, dict.fromkeys(tensors, 2), tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        t, dim, g = payload.tensors, payload.shape[-1], self.group_size
        high = self.high(dim)
        mask = unpack(t["channels"], 1, dim).bool()
        codes_high = unpack(t["codes_high"], self.bits, g * high).unflatten(-1, (g, high))
        codes_low = unpack(t["codes_low"], 1, g * (dim - high)).unflatten(-1, (g, dim - high))
        return mixed_dequantize(mask, codes_high, codes_low, t["scale"].unsqueeze(-2), t["zero"].unsqueeze(-2),
                                payload.dtype)
