"""Dense-and-sparse decomposition, KVQuant's outlier handling with a fixed count per vector.

KVQuant (arXiv 2401.18079, `quant/kvquant/simquant_module_quantizer.py`) keeps the values beyond a
calibrated threshold in fp16 as a sparse matrix and quantizes the rest, whose range no longer has to
reach them. Here each vector along the last axis (one token of one head) keeps a fixed number of
outliers, the ceil(n/2) largest and floor(n/2) smallest entries, so the bytes per token are known in
advance: their values in a 16-bit dtype and their indices. The dense part is the vector clamped to the
range of its other entries; decoding scatters the kept values back over the dense part's decoding.
"""

from __future__ import annotations

import torch


def index_dtype(size: int) -> torch.dtype:
    """The narrowest dtype that indexes a vector of `size` entries."""
    return torch.uint8 if size <= 256 else torch.int16


def split_outliers(x: torch.Tensor, count: int, value_dtype: torch.dtype = torch.float16
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, index, values): x clamped to the range of its entries other than the `count` outliers of
    each vector, the outliers' indices (`index_dtype`) and their values in `value_dtype` (saturated to
    its finite range). Differentiable in x (the clamp bounds are constants)."""
    size = x.shape[-1]
    if not 1 <= count <= size - 2:
        raise ValueError(f"a vector of {size} entries keeps 1 to {size - 2} outliers, got {count}")
    high, low = (count + 1) // 2, count // 2
    top = x.detach().topk(high + 1, dim=-1)
    bottom = x.detach().topk(low + 1, dim=-1, largest=False)
    index = torch.cat([top.indices[..., :high], bottom.indices[..., :low]], dim=-1)
    dense = torch.minimum(torch.maximum(x, bottom.values[..., low:]), top.values[..., high:])
    finite = torch.finfo(value_dtype).max
    values = x.gather(-1, index).clamp(-finite, finite).to(value_dtype)
    return dense, index.to(index_dtype(size)), values


def merge_outliers(dense: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The dense part with the kept values scattered back, in the dense part's dtype."""
    return dense.scatter(-1, index.long(), values.to(dense.dtype))
