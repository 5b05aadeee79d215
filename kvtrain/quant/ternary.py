"""Ternary quantization: each group's entries become -s, 0 or +s (log2(3) = 1.58 bits of code).

VidKV (KD-TAO/VidKV `vidkv_quant.py`) stores values this way: an entry is +-1 where its magnitude
exceeds half the group's mean magnitude, else 0. Its dequantization returns the codes without the
scale (a bug the issue names); here the group's scale s multiplies them, s being the mean magnitude of
the entries coded +-1, the least-squares scale for those codes (a group with none has s = 0). Groups
follow `kvtrain.quant.uniform`: along `axis`, the scale rounded to `param_dtype` before decoding.
"""

from __future__ import annotations

import torch

from kvtrain.quant.uniform import _grouped, _stored, _ungrouped

THRESHOLD = 0.5  # of the group's mean |x|: VidKV's


def ternary_quantize(x: torch.Tensor, group_size: int, axis: int = -1, param_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) in `uniform.quantize`'s grouped layout: codes uint8 in {0, 1, 2} (the ternary
    value + 1), scale (*lead, n_groups, 1) in `param_dtype` (default: x's dtype)."""
    axis = axis % x.dim()
    g = _grouped(x, group_size, axis)
    magnitude = g.abs()
    cut = THRESHOLD * magnitude.mean(-1, keepdim=True)
    signs = torch.where(g > cut, 1, torch.where(g < -cut, -1, 0))
    kept = signs != 0
    scale = (magnitude * kept).sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=1)
    return (signs + 1).to(torch.uint8), _stored(scale, param_dtype).to(param_dtype or x.dtype)


def ternary_dequantize(codes: torch.Tensor, scale: torch.Tensor, axis: int, shape: torch.Size,
                       dtype: torch.dtype) -> torch.Tensor:
    """(code - 1) * scale, computed in `dtype`, back in x's layout."""
    return _ungrouped((codes.to(dtype) - 1) * scale.to(dtype), axis % len(shape), shape)
