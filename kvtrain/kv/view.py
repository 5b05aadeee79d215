"""The streaming view: what attention sees of K or V under a spec.

Given the tensor as the cache hands it over (its compressed tier up to `done` already quantized and
dequantized, the rest full precision), fake-quantize the units the window rule compresses by the end
of the chunk. Which query sees which tokens compressed is the rule's (`WindowRule.seen`).
"""

from __future__ import annotations

import torch

from kvtrain.kv.spec import TensorQuant
from kvtrain.kv.window import WindowRule
from kvtrain.quant.uniform import fake_quant


def quantize_tokens(x: torch.Tensor, quant: TensorQuant) -> torch.Tensor:
    """Fake-quantize a whole number of units of x (B, H, T, D): per-channel groups run along tokens."""
    axis = -2 if quant.axis == "channel" else -1
    return fake_quant(x, quant.bits, quant.group_size, axis, quant.symmetric, quant.clip_ratio, quant.param_dtype)


def compressed_view(x: torch.Tensor, quant: TensorQuant, rule: WindowRule, done: int) -> torch.Tensor:
    """x with the tokens the rule compresses once all of them are in, from `done` on, fake-quantized."""
    total = x.shape[-2]
    start, end = max(done, rule.start(total)), rule.end(total)
    if end <= start:
        return x
    return torch.cat([x[..., :start, :], quantize_tokens(x[..., start:end, :], quant), x[..., end:, :]], dim=-2)
