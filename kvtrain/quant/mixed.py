"""Mixed-precision channels: in each group of tokens, the widest channels at b bits and the rest at 1 bit.

VidKV (KD-TAO/VidKV `vidkv_quant.py`) ranks key channels by their range (max - min over the group's
tokens) and keeps the widest fraction at 2 bits, the rest at 1 bit (there after an FFT that doubles the
element count, and decoded to {0, s}: bugs the issue names). Here, per group of G tokens of one head:

    high channels (the `high` widest; ties to the lower channel index): b-bit min-max codes, as
        `uniform.quantize` (scale = (max - min) / (2^b - 1), zero = min)
    low channels: 1 bit around the mean, code = x > zero, decoded to zero -/+ s with zero the channel's
        mean and s = mean |x - zero| (the least-squares magnitude for those signs)

Both parameters of every channel are rounded to `param_dtype` before the codes are chosen, so the codes
fit the stored parameters. Layout: x (B, H, T, D) as groups (B, H, T / G, G, D); the functions return
and take the channels sorted high first (each part in channel order) and the `high` mask that undoes it.
"""

from __future__ import annotations

import torch

from kvtrain.quant.uniform import _codes, _dequant_grouped, _stored


def grouped_tokens(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T / G, G, D): groups of G consecutive tokens."""
    if x.shape[-2] % group_size:
        raise ValueError(f"group_size={group_size} must divide the tokens (got {x.shape[-2]})")
    return x.unflatten(-2, (-1, group_size))


def channel_order(high: torch.Tensor) -> torch.Tensor:
    """Per group, the channel indices high first, each part ascending: (B, H, n, D) int64."""
    return torch.sort((~high).to(torch.uint8), dim=-1, stable=True).indices


def mixed_quantize(x: torch.Tensor, group_size: int, high: int, bits: int, param_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(high mask (B, H, n, D) bool, high codes (B, H, n, G, high) uint8, low codes (B, H, n, G, D - high)
    uint8, scale, zero (B, H, n, 1, D) in `param_dtype` (default x's), channels sorted high first)."""
    g = grouped_tokens(x, group_size)
    lo, hi = g.aminmax(dim=-2, keepdim=True)
    widest = torch.sort((hi - lo).squeeze(-2), dim=-1, descending=True, stable=True).indices[..., :high]
    mask = torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=torch.bool, device=x.device).scatter_(-1, widest, True)
    order = channel_order(mask)
    g, lo, hi = (t.gather(-1, order.unsqueeze(-2).expand(*t.shape[:-1], -1)) for t in (g, lo, hi))
    scale_high = _stored((hi[..., :high] - lo[..., :high]) / (2**bits - 1), param_dtype)
    zero_high = _stored(lo[..., :high], param_dtype)
    codes_high = _codes(g[..., :high], scale_high, zero_high, bits, symmetric=False)
    zero_low = _stored(g[..., high:].mean(-2, keepdim=True), param_dtype)
    codes_low = g[..., high:] > zero_low
    scale_low = _stored((g[..., high:] - zero_low).abs().mean(-2, keepdim=True), param_dtype)
    store = param_dtype or x.dtype
    return (mask, codes_high.to(torch.uint8), codes_low.to(torch.uint8),
            torch.cat([scale_high, scale_low], -1).to(store), torch.cat([zero_high, zero_low], -1).to(store))


def mixed_dequantize(mask: torch.Tensor, codes_high: torch.Tensor, codes_low: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse layout of `mixed_quantize`: (B, H, n * G, D) in `dtype`, computed in it."""
    high = codes_high.shape[-1]
    scale, zero = scale.to(dtype), zero.to(dtype)
    values = torch.cat([_dequant_grouped(codes_high.to(dtype), scale[..., :high], zero[..., :high], 0, False),
                        zero[..., high:] + (2 * codes_low.to(dtype) - 1) * scale[..., high:]], dim=-1)
    order = channel_order(mask).unsqueeze(-2).expand_as(values)
    return torch.empty_like(values).scatter_(-1, order, values).flatten(-3, -2)
