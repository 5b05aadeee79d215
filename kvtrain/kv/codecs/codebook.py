"""Codebook codecs: each group normalized to [-1, 1] and stored as indices into 2^b levels
(`kvtrain.quant.codebook`, KVQuant's non-uniform quantization).

    codec   levels
    nf      KVQuant's NormalFloat (`--nuq --nf`): normal quantiles, calibration-free
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtrain.kv.codecs import Payload, register
from kvtrain.kv.codecs.affine import GroupedCodec, ScaleDtype
from kvtrain.quant.codebook import codebook_dequantize, codebook_quantize, normal_float_levels
from kvtrain.quant.packing import unpack


@register("nf")
@dataclass(frozen=True)
class NormalFloat(GroupedCodec):
    """KVQuant's NormalFloat datatype in per_channel(G) or per_token(G) groups: per group an offset
    (max + min) / 2 and a half-range (max - min) / 2 in `scale_dtype` (the payload's `zero` and
    `scale`), and b-bit indices of the nearest NormalFloat level. Asymmetric and unclipped only."""

    examples: ClassVar[tuple[dict[str, Any], ...]] = (
        dict(bits=2, granularity="per_channel(16)"), dict(bits=3, granularity="per_token(16)"),
    )

    scale_dtype: ScaleDtype = "float16"

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "NormalFloat":
        group, axis = cls._grouping(policy)
        if policy.symmetric or policy.clip_ratio != 1:
            raise ValueError(f"the nf codec normalizes each group by its own range: symmetric and clip_ratio do not "
                             f"apply (got symmetric={policy.symmetric}, clip_ratio={policy.clip_ratio})")
        normal_float_levels(bits)  # its bit range, here
        return cls(bits, group, axis, policy.scale_dtype)

    @property
    def levels(self) -> torch.Tensor:
        return normal_float_levels(self.bits)

    def encode(self, x: torch.Tensor) -> Payload:
        return self._payload(codebook_quantize(x, self.levels, self.group_size, self._dim, self.param_dtype), x)

    def decode(self, payload: Payload) -> torch.Tensor:
        return codebook_dequantize(self._stored(payload, unpack), self.levels)
