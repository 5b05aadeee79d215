"""The affine (uniform, min-max) codec: KIVI's quantizer, per-channel or per-token groups, packed codes."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch

from kvtrain.kv.codecs import Codec, Payload, register
from kvtrain.quant import native
from kvtrain.quant.granularity import PerChannel, PerToken, parse_granularity
from kvtrain.quant.packing import pack, unpack, unpack_int
from kvtrain.quant.uniform import QuantizedTensor, check_bits, dequantize, fake_quant, quantize

Axis = Literal["channel", "token"]
ScaleDtype = Literal["float16", "bfloat16", "float32"]
SCALE_DTYPES = ("float16", "bfloat16", "float32")


# Per-channel groups are stored token-major, (B, H, groups, G, D) codes packed along head_dim and
# (B, H, groups, 1, D) scales, so that decoding writes the (B, H, T, D) tensor attention reads
# contiguously (writing quantize's (B, H, D, groups, G) layout into it is a slow transposing copy).


def _token_major(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 1, 3, 4, 2)  # (B, H, D, groups, G or 1) -> (B, H, groups, G or 1, D)


def _grouped_layout(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 1, 4, 2, 3)  # the inverse view


def _packed_payload(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor) -> Payload:
    tensors = {"codes": codes, "scale": scale, "zero": zero}
    return Payload(tensors, dict.fromkeys(tensors, 2), tuple(x.shape), x.dtype)


@dataclass(frozen=True)
class GroupedCodec(Codec):
    """What codecs that scale groups of elements share (affine, codebooks): per_channel(G) groups of G
    tokens along each channel or per_token(G) groups of G channels in each token, each group's
    parameters (`scale`, `zero`) stored in `scale_dtype` next to its b-bit codes."""

    bits: int
    group_size: int
    axis: Axis

    @classmethod
    def _grouping(cls, policy: Any) -> tuple[int, Axis]:
        g = parse_granularity(policy.granularity)
        if not isinstance(g, (PerChannel, PerToken)):
            raise ValueError(f"the {cls.name} codec groups per_channel(G) or per_token(G), not {g}")
        return g.group, "channel" if isinstance(g, PerChannel) else "token"

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

    @property
    def _dim(self) -> int:
        return 2 if self.axis == "channel" else 3  # the grouped axis of (B, H, T, D)

    def _payload(self, q: QuantizedTensor, x: torch.Tensor) -> Payload:
        """q (`quantize`'s grouped layout) as stored: codes packed, per-channel groups token-major."""
        codes, scale, zero = (_token_major(t) for t in (q.codes, q.scale, q.zero)) if self.axis == "channel" else (
            q.codes, q.scale, q.zero)
        return _packed_payload(pack(codes, self.bits), scale.contiguous(), zero.contiguous(), x)

    def _stored(self, payload: Payload, unpacker, symmetric: bool = False) -> QuantizedTensor:
        """The payload as `quantize` laid it out: views in its grouped layout."""
        t, (*_, dim) = payload.tensors, payload.shape
        codes = unpacker(t["codes"], self.bits, dim if self.axis == "channel" else self.group_size)
        codes, scale, zero = (_grouped_layout(v) for v in (codes, t["scale"], t["zero"])) if self.axis == "channel" else (
            codes, t["scale"], t["zero"])
        return QuantizedTensor(codes, scale, zero, self.bits, self._dim, torch.Size(payload.shape), symmetric,
                               payload.dtype)

    def _kernel_decoder(self, payload: Payload, symmetric: bool, levels: torch.Tensor | None = None
                        ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """`decoder`: the CPU kernel (`kvtrain.quant.native`) bound to the payload where it applies,
        with torch's decode_into where a call's output does not suit it (or it never applies)."""
        t = payload.tensors
        in_torch = functools.partial(Codec.decode_into, self, payload)
        kernel = native.affine_decoder(t["codes"], t["scale"], t["zero"], self.bits, self.group_size,
                                       self.axis == "channel", symmetric, payload.shape, payload.dtype, levels)
        if kernel is None:
            return in_torch

        def decode(out: torch.Tensor, then: torch.Tensor | None = None) -> torch.Tensor:
            return out if kernel(out, then) else in_torch(out, then)

        decode.prepare_step = kernel.prepare_step  # the cache's decode step in one pass (`PayloadStore.prepare_step`)
        return decode

    def check_model(self, head_dim: int, where: str, model_name: str) -> None:
        if self.axis == "token" and head_dim % self.group_size:
            raise ValueError(f"{where}={self.group_size} does not divide head_dim={head_dim} of {model_name}; per-token groups split "
                             f"head_dim, so use a divisor of {head_dim}")


@register("affine")
@dataclass(frozen=True)
class TensorQuant(GroupedCodec):
    """How one of K or V is quantized. axis="channel": each channel in groups of `group_size`
    consecutive tokens (KIVI keys); axis="token": each token in groups of `group_size` channels.
    Stored: b-bit codes packed into bytes along head_dim, each group's scale and zero point in
    `scale_dtype`."""

    examples: ClassVar[tuple[dict[str, Any], ...]] = (
        dict(bits=2, granularity="per_channel(16)"), dict(bits=3, granularity="per_token(16)", symmetric=True),
        dict(bits=2, granularity="per_token(16)", rotation="random_hadamard"),  # behind the rotation stage
        dict(bits=2, granularity="per_channel(16)", outliers=2),  # behind the outliers stage
        dict(bits=2, granularity="per_token(16)", rotation="learned"),  # a trained rotation's state
        dict(bits=2, granularity="per_token(16)", rotation="random_hadamard", rotation_heads=0, reorder_channels=True),  # RotateKV: grouped heads, reordered
        dict(bits=2, granularity="per_token(16)", rotation="learned", rotation_heads=2),  # learned over two heads
        dict(bits=2, granularity="per_token(4)", rank=12),  # a quantized low-rank latent of both heads
        dict(bits=4, granularity="per_channel(16)", rank=12, latent_heads=1),  # one latent per head
        dict(bits=2, granularity="per_token(8)", rank=16, rotation="random_hadamard"),  # Palu: a Hadamard on the latent
        dict(bits=2, granularity="per_channel(16)", prune_channels=0.25),  # ThinK's kept channels, quantized
    )

    symmetric: bool = False
    clip_ratio: float = 1.0
    scale_dtype: ScaleDtype = "float16"

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "TensorQuant":
        group, axis = cls._grouping(policy)
        check_bits(bits, policy.symmetric)
        return cls(bits, group, axis, policy.symmetric, policy.clip_ratio, policy.scale_dtype)

    def quantized_len(self, total: int, residual: int) -> int:
        """Tokens held quantized with `total` in the cache under the plain streaming rule (no sinks)."""
        from kvtrain.kv.window import WindowRule

        return WindowRule(self.unit, residual).end(total)

    def encode(self, x: torch.Tensor) -> Payload:
        made = native.affine_encode(x, self.bits, self.group_size, self.axis == "channel", self.symmetric,
                                    self.clip_ratio, self.param_dtype)
        if made is not None:  # the same payload, ~5x faster on CPU
            return _packed_payload(*made, x)
        return self._payload(quantize(x, self.bits, self.group_size, self._dim, self.symmetric, self.clip_ratio,
                                      self.param_dtype, check_finite=False), x)

    def decode(self, payload: Payload) -> torch.Tensor:
        return dequantize(self._stored(payload, unpack, self.symmetric))

    def decoder(self, payload: Payload) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        return self._kernel_decoder(payload, self.symmetric)

    def decode_into(self, payload: Payload, out: torch.Tensor, then: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(payload)(out, then)

    def _decode_into(self, payload: Payload, out: torch.Tensor) -> None:
        """In torch, with the codes unpacked as int32 words where they fill them."""
        dequantize(self._stored(payload, unpack_int, self.symmetric), out=out)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant with its clipped straight-through gradient (zero outside a clipped group's range)."""
        return fake_quant(x, self.bits, self.group_size, self._dim, self.symmetric, self.clip_ratio, self.param_dtype)
