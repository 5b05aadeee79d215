"""Non-uniform (codebook) quantization, KVQuant's form: each group is normalized to [-1, 1] by its own
offset (max + min) / 2 and half-range (max - min) / 2, every value becomes the index of the nearest of
2^b levels, and decodes to `level * half_range + offset`.

`normal_float_levels` is KVQuant's calibration-free codebook ("nf", `--nuq --nf`): quantiles of a
standard normal, 2^(b-1) of them on the negative side (ending at 0) and 2^(b-1) on the positive side,
each side scaled to reach -1 and 1, with the outermost quantiles at 1/2 (1/32 + 1/30) from the tails
(arXiv 2306.06965), as `QuantLinearSim` in SqueezeAILab/KVQuant `quant/kvquant/simquant_module_quantizer.py`
builds them. Fitted codebooks (sensitivity-weighted k-means) and learned ones use the same functions.

Groups and stored parameters follow `kvtrain.quant.uniform`: groups along `axis`, offset and
half-range rounded to `param_dtype` before the codes are chosen, a constant group decodes exactly.
Ties between two levels go to the lower one, as KVQuant's argmin does.
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import torch

from kvtrain.quant.uniform import QuantizedTensor, _grouped, _stored, _ungrouped

NF_TAIL = 0.5 * (1 / 32 + 1 / 30)


@functools.cache
def _normal_float(bits: int) -> tuple[float, ...]:
    half = 2 ** (bits - 1)
    icdf = NormalDist().inv_cdf
    negative = [icdf(NF_TAIL + i * (0.5 - NF_TAIL) / (half - 1)) for i in range(half)]  # ends at the median, 0
    positive = [icdf(0.5 + i * (0.5 - NF_TAIL) / half) for i in range(1, half)] + [icdf(1 - NF_TAIL)]
    return tuple([v / -negative[0] for v in negative[:-1]] + [0.0] + [v / positive[-1] for v in positive])


def normal_float_levels(bits: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """KVQuant's NormalFloat codebook of 2^bits ascending levels in [-1, 1] (0 and both ends included)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"a NormalFloat codebook has 2 to 8 bits, got {bits!r}")
    return torch.tensor(_normal_float(bits), dtype=torch.float64).to(dtype)


def normalized(x: torch.Tensor, group_size: int, axis: int = -1, param_dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values in [-1, 1], half-range, offset), each group normalized by its stored parameters, in
    `uniform.quantize`'s grouped layout (*lead, n_groups, group_size): what the codebook encodes."""
    g = _grouped(x, group_size, axis % x.dim())
    lo, hi = g.aminmax(dim=-1, keepdim=True)
    half_range, offset = _stored((hi - lo) / 2, param_dtype), _stored((hi + lo) / 2, param_dtype)
    return (g - offset) / half_range.masked_fill(half_range == 0, 1), half_range, offset


def codebook_samples(x: torch.Tensor, grad: torch.Tensor, group_size: int, axis: int = -1,
                     param_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, weights), flat float32: x normalized as `codebook_quantize` normalizes it, and each
    value's squared gradient in `grad` (x's shape), the sensitivity `fit_codebook` weights it by."""
    values = normalized(x, group_size, axis, param_dtype)[0]
    weights = _grouped(grad, group_size, axis % grad.dim()).float().pow(2)
    return values.float().reshape(-1), weights.reshape(-1)


def codebook_quantize(x: torch.Tensor, levels: torch.Tensor, group_size: int, axis: int = -1,
                      param_dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Codes (uint8, the nearest level's index) and per-group half-range (`scale`) and offset (`zero`)
    in `param_dtype`, in `uniform.quantize`'s grouped layout; `levels` ascending, in [-1, 1]."""
    axis = axis % x.dim()
    values, half_range, offset = normalized(x, group_size, axis, param_dtype)
    codes = (values.unsqueeze(-1) - levels.to(x.dtype)).abs().argmin(-1)
    store = param_dtype or x.dtype
    bits = max(1, (levels.numel() - 1).bit_length())
    return QuantizedTensor(codes.to(torch.uint8), half_range.to(store), offset.to(store), bits, axis, x.shape, False,
                           x.dtype)


def codebook_dequantize(q: QuantizedTensor, levels: torch.Tensor) -> torch.Tensor:
    """`level * half_range + offset`, computed in the quantized input's dtype."""
    values = levels.to(q.dtype)[q.codes.long()]
    return _ungrouped(values * q.scale.to(q.dtype) + q.zero.to(q.dtype), q.axis, q.shape)


def fit_codebook(values: torch.Tensor, weights: torch.Tensor, init: torch.Tensor, iterations: int = 100
                 ) -> torch.Tensor:
    """Levels minimizing sum(weights * (values - nearest level)^2): weighted k-means in one dimension
    (Lloyd's iterations from `init`, ascending), KVQuant's sensitivity-weighted NUQ fit (its weights:
    squared gradients of the loss with respect to each value, a diagonal Fisher estimate). A level
    that no value chooses, or only values of zero weight, stays where it is. Computed in float64;
    returns ascending levels in init's dtype. Ties go to the lower level, as in `codebook_quantize`."""
    if values.shape != weights.shape or values.numel() == 0:
        raise ValueError(f"fit_codebook needs as many weights as values (got {tuple(values.shape)} values and "
                         f"{tuple(weights.shape)} weights), and at least one")
    if not bool((weights >= 0).all()) or not bool(torch.isfinite(values).all() & torch.isfinite(weights).all()):
        raise ValueError("fit_codebook needs finite values and finite, non-negative weights")
    x, w = values.detach().reshape(-1).double(), weights.detach().reshape(-1).double()
    levels = init.detach().double().sort().values
    for _ in range(iterations):
        nearest = _nearest(x, levels)
        mass = torch.zeros_like(levels).index_add_(0, nearest, w)
        moment = torch.zeros_like(levels).index_add_(0, nearest, w * x)
        updated = torch.where(mass > 0, moment / mass.clamp(min=torch.finfo(torch.float64).tiny), levels).sort().values
        if torch.equal(updated, levels):
            break
        levels = updated
    return levels.to(init.dtype)


def weighted_error(values: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor) -> float:
    """sum(weights * (values - nearest level)^2) / sum(weights): what `fit_codebook` minimizes."""
    x, w = values.reshape(-1).double(), weights.reshape(-1).double()
    nearest = levels.double()[_nearest(x, levels.double())]
    return float((w * (x - nearest) ** 2).sum() / w.sum().clamp(min=torch.finfo(torch.float64).tiny))


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of each value's nearest level (ascending levels; a value midway goes to the lower one),
    by the midpoints, without an (n, levels) distance matrix."""
    return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
