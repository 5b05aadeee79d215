"""The streaming view: what attention sees of K or V under a spec, for every query position.

This is the single definition shared by training (`attach`) and decoding (`QuantizedKVCache`): given
the tensor as the cache hands it over (its first `done` tokens already quantized and dequantized,
the rest full precision), fake-quantize the units that are complete and older than the residual
window by the end of the chunk, and tell each query which tokens it sees quantized.
"""

from __future__ import annotations

import torch

from kvtrain.kv.spec import TensorQuant
from kvtrain.quant.uniform import fake_quant


def quantize_tokens(x: torch.Tensor, quant: TensorQuant) -> torch.Tensor:
    """Fake-quantize a whole number of units of x (B, H, T, D): per-channel groups run along tokens."""
    axis = -2 if quant.axis == "channel" else -1
    return fake_quant(x, quant.bits, quant.group_size, axis, quant.symmetric, quant.clip_ratio, quant.param_dtype)


def compressed_view(x: torch.Tensor, quant: TensorQuant, residual: int, done: int) -> tuple[torch.Tensor, int]:
    """(x with tokens [done, n) fake-quantized, n): n = tokens held quantized once all T are in."""
    n = quant.quantized_len(x.shape[-2], residual)
    if n <= done:
        return x, done
    return torch.cat([x[..., :done, :], quantize_tokens(x[..., done:n, :], quant), x[..., n:, :]], dim=-2), n


def seen_quantized(quant: TensorQuant | None, residual: int, positions: torch.Tensor) -> torch.Tensor:
    """For each query position p: n(p) = quantized_len(p + 1); p sees tokens j < n(p) quantized."""
    if quant is None:
        return torch.zeros_like(positions)
    return (positions + 1 - residual).clamp(min=0) // quant.unit * quant.unit


def quantized_mask(quant: TensorQuant, residual: int, past: int, q_len: int, total: int, device) -> torch.Tensor:
    """(q_len, total) bool: query i (position past + i) sees token j quantized."""
    seen = seen_quantized(quant, residual, torch.arange(past, past + q_len, device=device))
    return torch.arange(total, device=device)[None, :] < seen[:, None]


def uniform_view(quant: TensorQuant, residual: int, past: int, q_len: int) -> bool:
    """True when every query of the chunk sees the same tokens quantized (so one tensor serves all)."""
    return quant.quantized_len(past + 1, residual) == quant.quantized_len(past + q_len, residual)
