"""The raw codec: each token stored as it arrives, rounded to a 16-bit float (`scale_dtype`: float16
or bfloat16, the deployment's), 2 bytes per number. Behind the low-rank stage it is CSKV's and Palu's
latent cache (`rank: r, codec: raw, bits: 16`), behind channel pruning ThinK's (`prune_channels`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from kvtrain.kv.codecs import Codec, Payload, register


@register("raw")
@dataclass(frozen=True)
class Raw(Codec):
    """x in `dtype` (decoded back to x's dtype), with a straight-through gradient."""

    # alone it would not compress: a low-rank latent, ThinK's kept channels
    examples: ClassVar[tuple[dict[str, Any], ...]] = (dict(bits=16, rank=24), dict(bits=16, prune_channels=0.5))
    bits_stored: ClassVar[int] = 16

    dtype: Literal["float16", "bfloat16"] = "float16"

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "Raw":
        if bits != cls.bits_stored or policy.scale_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"the raw codec stores each number in 16 bits, float16 or bfloat16 (scale_dtype): set "
                             f"bits: 16, got bits={bits} and scale_dtype={policy.scale_dtype!r}")
        return cls(policy.scale_dtype)

    @property
    def unit(self) -> int:
        return 1

    def encode(self, x: torch.Tensor) -> Payload:
        return Payload({"values": x.to(getattr(torch, self.dtype)).contiguous()}, {"values": 2}, tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.tensors["values"].to(payload.dtype)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x.to(getattr(torch, self.dtype)).to(x.dtype) - x).detach()
