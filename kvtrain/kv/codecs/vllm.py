"""vLLM's per-token-head KV-cache formats, so that a model trained here decodes there with the values
it trained against. Their math, transcribed from vLLM's kernels, is `kvtrain.quant.serving`.

    codec                 vLLM --kv-cache-dtype   stored per token and head
    int8_per_token_head   int8_per_token_head     head_dim int8 codes + a float32 scale
    fp8_per_token_head    fp8_per_token_head      head_dim fp8 (e4m3) codes + a float32 scale
    int4_per_token_head   int4_per_token_head     head_dim / 2 bytes (two 4-bit codes) + a float32
                                                  scale carrying the zero point; keys and values
                                                  rotated by a randomized Hadamard transform
    fp8                   fp8 (fp8_e4m3)          head_dim fp8 codes; one scale per layer for K and
                                                  one for V, vLLM's default 1.0 (calibrated scales
                                                  from a checkpoint are not supported yet)

vLLM compresses every token as it arrives: deploy with `residual=0` and `sinks=0` (the presets of
these names do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtrain.kv.codecs import Codec, Payload, register
from kvtrain.quant.granularity import PerTensor, PerTokenHead, parse_granularity
from kvtrain.quant.hadamard import check_power_of_two
from kvtrain.quant.serving import (
    FP8_E4M3_RANGE, INT8_RANGE, absmax_dequantize, absmax_quantize, fp8_per_tensor_dequantize, fp8_per_tensor_quantize,
    int4_rht_dequantize, int4_rht_quantize,
)


@dataclass(frozen=True)
class _VllmFormat(Codec):
    """What vLLM's formats share: a fixed bit width and granularity, one token at a time."""

    bits_stored: ClassVar[int]
    granularity: ClassVar[type] = PerTokenHead

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "_VllmFormat":
        if bits != cls.bits_stored:
            raise ValueError(f"the {cls.name} codec stores {cls.bits_stored} bits per element, got bits={bits}; "
                             f"set bits: {cls.bits_stored}")
        if not isinstance(parse_granularity(policy.granularity), cls.granularity):
            raise ValueError(f"the {cls.name} codec scales {cls.granularity()}, got granularity {policy.granularity!r}")
        return cls()

    @property
    def unit(self) -> int:
        return 1

    @staticmethod
    def _payload(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> Payload:
        return Payload({"codes": codes, "scale": scale}, {"codes": 2, "scale": 2}, tuple(x.shape), x.dtype)


@register("int8_per_token_head")
@dataclass(frozen=True)
class Int8PerTokenHead(_VllmFormat):
    bits_stored: ClassVar[int] = 8
    examples: ClassVar[tuple[dict[str, Any], ...]] = (dict(bits=8, granularity="per_token_head"),)
    store: ClassVar[tuple[torch.dtype, tuple[float, float]]] = (torch.int8, INT8_RANGE)

    def encode(self, x: torch.Tensor) -> Payload:
        dtype, (low, high) = self.store
        return self._payload(*absmax_quantize(x, low, high, dtype), x)

    def decode(self, payload: Payload) -> torch.Tensor:
        return absmax_dequantize(payload.tensors["codes"], payload.tensors["scale"], payload.dtype)


@register("fp8_per_token_head")
@dataclass(frozen=True)
class Fp8PerTokenHead(Int8PerTokenHead):
    examples: ClassVar[tuple[dict[str, Any], ...]] = (dict(bits=8, granularity="per_token_head"),)
    store: ClassVar[tuple[torch.dtype, tuple[float, float]]] = (torch.float8_e4m3fn, FP8_E4M3_RANGE)


@register("int4_per_token_head")
@dataclass(frozen=True)
class Int4PerTokenHead(_VllmFormat):
    bits_stored: ClassVar[int] = 4
    examples: ClassVar[tuple[dict[str, Any], ...]] = (dict(bits=4, granularity="per_token_head"),)

    def encode(self, x: torch.Tensor) -> Payload:
        return self._payload(*int4_rht_quantize(x), x)

    def decode(self, payload: Payload) -> torch.Tensor:
        return int4_rht_dequantize(payload.tensors["codes"], payload.tensors["scale"], payload.dtype)

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        check_power_of_two(head_dim, f"{model_name}'s head_dim (rotated by int4_per_token_head)")


@register("fp8")
@dataclass(frozen=True)
class Fp8PerTensor(_VllmFormat):
    bits_stored: ClassVar[int] = 8
    granularity: ClassVar[type] = PerTensor
    examples: ClassVar[tuple[dict[str, Any], ...]] = (dict(bits=8, granularity="per_tensor"),)

    def encode(self, x: torch.Tensor) -> Payload:
        codes = fp8_per_tensor_quantize(x)
        return Payload({"codes": codes}, {"codes": 2}, tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        return fp8_per_tensor_dequantize(payload.tensors["codes"], payload.dtype)
