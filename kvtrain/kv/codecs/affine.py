"""The affine (uniform, min-max) codec: KIVI's quantizer, per-channel or per-token groups, packed codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from kvtrain.kv.codecs import Codec, Payload, register
from kvtrain.quant.granularity import PerChannel, PerToken, parse_granularity
from kvtrain.quant.packing import pack, unpack
from kvtrain.quant.uniform import QuantizedTensor, check_bits, dequantize, fake_quant, quantize

Axis = Literal["channel", "token"]
ScaleDtype = Literal["float16", "bfloat16", "float32"]
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@register("affine")
@dataclass(frozen=True)
class TensorQuant(Codec):
    """How one of K or V is quantized. axis="channel": each channel in groups of `group_size`
    consecutive tokens (KIVI keys); axis="token": each token in groups of `group_size` channels.
    Stored: b-bit codes packed into bytes, each group's scale and zero point in `scale_dtype`."""

    examples: ClassVar[tuple[dict[str, Any], ...]] = (
        dict(bits=2, granularity="per_channel(16)"), dict(bits=3, granularity="per_token(16)", symmetric=True),
    )

    bits: int
    group_size: int
    axis: Axis
    symmetric: bool = False
    clip_ratio: float = 1.0
    scale_dtype: ScaleDtype = "float16"

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "TensorQuant":
        g = parse_granularity(policy.granularity)
        if not isinstance(g, (PerChannel, PerToken)):
            raise ValueError(f"the affine codec groups per_channel(G) or per_token(G), not {g}")
        check_bits(bits, policy.symmetric)
        return cls(bits, g.group, "channel" if isinstance(g, PerChannel) else "token", policy.symmetric,
                   policy.clip_ratio, policy.scale_dtype)

    @property
    def granularity(self) -> PerChannel | PerToken:
        return (PerChannel if self.axis == "channel" else PerToken)(self.group_size)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the cache stores scales and zero points in (the view rounds them the same way)."""
        return getattr(torch, self.scale_dtype)

    @property
    def unit(self) -> int:
        return self.group_size if self.axis == "channel" else 1

    def quantized_len(self, total: int, residual: int) -> int:
        """Tokens held quantized with `total` in the cache under the plain streaming rule (no sinks)."""
        from kvtrain.kv.window import WindowRule

        return WindowRule(self.unit, residual).end(total)

    @property
    def _dim(self) -> int:
        return 2 if self.axis == "channel" else 3  # the grouped axis of (B, H, T, D)

    def encode(self, x: torch.Tensor) -> Payload:
        qt = quantize(x, self.bits, self.group_size, self._dim, self.symmetric, self.clip_ratio, self.param_dtype,
                      check_finite=False)
        token_dim = 3 if self.axis == "channel" else 2  # of the grouped layout (B, H, *, groups, group_size)
        tensors = {"codes": pack(qt.codes, self.bits), "scale": qt.scale, "zero": qt.zero}
        return Payload(tensors, dict.fromkeys(tensors, token_dim), tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        t = payload.tensors
        codes = unpack(t["codes"], self.bits, self.group_size)
        return dequantize(QuantizedTensor(codes, t["scale"], t["zero"], self.bits, self._dim, torch.Size(payload.shape),
                                          self.symmetric, payload.dtype))

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant with its clipped straight-through gradient (zero outside a clipped group's range)."""
        return fake_quant(x, self.bits, self.group_size, self._dim, self.symmetric, self.clip_ratio, self.param_dtype)

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        if self.axis == "token" and head_dim % self.group_size:
            raise ValueError(f"{where}={self.group_size} does not divide head_dim={head_dim} of {model_name}; per-token groups split "
                             f"head_dim, so use a divisor of {head_dim}")
