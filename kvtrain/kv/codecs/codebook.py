"""Codebook codecs: each group normalized to [-1, 1] and stored as indices into 2^b levels
(`kvtrain.quant.codebook`, KVQuant's non-uniform quantization).

    codec   levels
    nf      KVQuant's NormalFloat (`--nuq --nf`): normal quantiles, calibration-free
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from kvtrain.kv.codecs import Payload, register
from kvtrain.kv.codecs.affine import GroupedCodec, ScaleDtype
from kvtrain.quant.codebook import codebook_dequantize, codebook_quantize, codebook_samples, normal_float_levels
from kvtrain.quant.packing import unpack


class CodebookLevels(nn.Module):
    """A codec's learnable codebook in one attention layer: its levels, trained like any weight, and
    fitted to the model by `kvtrain calibrate` (`kvtrain.kv.calibrate`) while `observed` is a list."""

    def __init__(self, levels: torch.Tensor):
        super().__init__()
        self.levels = nn.Parameter(levels.float().clone())
        self.observed: list[list[torch.Tensor | None]] | None = None

    def observe(self, x: torch.Tensor, samples: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
                ) -> torch.Tensor:
        """x passed on unchanged (calibration sees the full-precision model, as KVQuant's does) as a
        leaf whose gradient, after backward, gives `samples(x, grad)`: the normalized values and their
        squared gradients, appended to `observed`."""
        leaf = x.detach().requires_grad_()
        record: list[torch.Tensor | None] = [None, None]
        self.observed.append(record)
        leaf.register_hook(lambda grad: record.__setitem__(slice(None), samples(leaf.detach(), grad)))
        return leaf


@register("nf")
@dataclass(frozen=True)
class NormalFloat(GroupedCodec):
    """KVQuant's NormalFloat datatype in per_channel(G) or per_token(G) groups: per group an offset
    (max + min) / 2 and a half-range (max - min) / 2 in `scale_dtype` (the payload's `zero` and
    `scale`), and b-bit indices of the nearest NormalFloat level. Asymmetric and unclipped only.
    `learnable`: the levels start at NormalFloat's and train during QAT (KVQuant's NUQ, learned):
    codes go to the nearest level, values pass straight through to x and the gradient reaches the
    levels they decode to."""

    examples: ClassVar[tuple[dict[str, Any], ...]] = (
        dict(bits=2, granularity="per_channel(16)"), dict(bits=3, granularity="per_token(16)"),
        dict(bits=2, granularity="per_token(16)", learnable=True),
    )

    learnable_state: ClassVar[bool] = True

    scale_dtype: ScaleDtype = "float16"
    learnable: bool = False
    state: CodebookLevels | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_policy(cls, policy: Any, bits: int) -> "NormalFloat":
        group, axis = cls._grouping(policy)
        if policy.symmetric or policy.clip_ratio != 1:
            raise ValueError(f"the nf codec normalizes each group by its own range: symmetric and clip_ratio do not "
                             f"apply (got symmetric={policy.symmetric}, clip_ratio={policy.clip_ratio})")
        normal_float_levels(bits)  # its bit range, here
        return cls(bits, group, axis, policy.scale_dtype, policy.learnable)

    def make_state(self, head_dim: int, kv_heads: int = 1, weight: torch.Tensor | None = None) -> CodebookLevels | None:
        return CodebookLevels(normal_float_levels(self.bits)) if self.learnable else None

    @property
    def levels(self) -> torch.Tensor:
        if not self.learnable:
            return normal_float_levels(self.bits)
        if self.state is None:
            raise ValueError("an nf codec with learnable levels reads them from the model it is attached to: use the "
                             "cache through the attached model's forward (attach(model, spec) registers the levels)")
        return self.state.levels

    def encode(self, x: torch.Tensor) -> Payload:
        return self._payload(codebook_quantize(x, self.levels.detach(), self.group_size, self._dim,
                                               self.param_dtype), x)

    def decode(self, payload: Payload) -> torch.Tensor:
        return codebook_dequantize(self._stored(payload, unpack), self.levels)

    def _samples(self, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What calibration fits the levels to: x's values normalized as encode normalizes them, and
        each one's weight, its squared gradient (KVQuant's Fisher weighting), both flat and in float32."""
        return codebook_samples(x, grad, self.group_size, self._dim, self.param_dtype)

    def decoder(self, payload: Payload) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """The kernel's byte table holds the levels as the decoder is made (a cache makes one per payload;
        levels train between decodes, not during one)."""
        return self._kernel_decoder(payload, False, self.levels.detach().to(payload.dtype).contiguous())

    def decode_into(self, payload: Payload, out: torch.Tensor, then: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(payload)(out, then)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)); learnable levels get the gradient of the values they decode to."""
        if self.state is not None and self.state.observed is not None:
            return self.state.observe(x, self._samples)
        if not self.learnable:
            return super().simulate(x)
        q = codebook_quantize(x.detach(), self.levels.detach(), self.group_size, self._dim, self.param_dtype)
        return codebook_dequantize(q, self.levels) + (x - x.detach())
