"""FP8 (e4m3) with one float32 scale per token and head: the dynamic per-token-head fp8 KV layout of
serving engines (vLLM). Also the worked example of DESIGN.md's "Adding a compression method".

    scale = max|x| over the head's channels / 448     (448: the largest finite e4m3 value)
    code  = e4m3(x / scale)                            1 byte per element, saturated to +-448
    x_hat = code * scale                               computed in x's dtype

Stored per token and head: head_dim one-byte codes and a 4-byte scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtrain.kv.codecs import Codec, Payload, register
from kvtrain.quant.granularity import PerTokenHead, parse_granularity

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


@register("fp8_e4m3")
@dataclass(frozen=True)
class Fp8E4M3(Codec):
    examples: ClassVar[tuple[dict[str, Any], ...]] = (dict(bits=8, granularity="per_token_head"),)

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "Fp8E4M3":
        if bits != 8:
            raise ValueError(f"the fp8_e4m3 codec stores 8 bits per element, got bits={bits}; set bits: 8")
        if not isinstance(parse_granularity(policy.granularity), PerTokenHead):
            raise ValueError(f"the fp8_e4m3 codec scales per_token_head, got granularity {policy.granularity!r}")
        return cls()

    @property
    def unit(self) -> int:
        return 1

    def encode(self, x: torch.Tensor) -> Payload:
        scale = (x.abs().amax(-1, keepdim=True) / E4M3_MAX).float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero head stores zeros
        codes = (x / safe.to(x.dtype)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return Payload({"codes": codes, "scale": safe}, {"codes": 2, "scale": 2}, tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        t = payload.tensors
        return t["codes"].to(payload.dtype) * t["scale"].to(payload.dtype)
