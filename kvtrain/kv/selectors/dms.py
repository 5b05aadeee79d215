"""Learned eviction in the manner of DMS (Łańcucki et al. 2025; NVIDIA/Model-Optimizer experimental/dms):
each token gets a learned keep-logit per KV head, here a linear function of its value, which the model
trains through the policy's straight-through gate (`straight_through`, with `noise` DMS's
Gumbel-sigmoid exploration) while it learns to live with what the logits keep.

DMS delays eviction until a token leaves a sliding window: the policy's `recent` tokens always survive,
so with `interval` 1 a token is judged once it is `recent` old, as DMS's cache does. Where this
differs from DMS: the logit reads the token's value (position-free, unlike a RoPE'd key) because the
attention function sees K, V and the queries but not the hidden state DMS's adapter reads, and
repurposing a query channel (DMS's other variant) would change the model's attention; and the policy's
budget keeps the best-scored tokens (every head the same count), where DMS evicts every token whose
logit crosses 0 (per-head lengths, the ratio steered by a penalty on the kept fraction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from kvtrain.kv.selectors import Selector, register


class KeepLogits(nn.Module):
    """Per KV head a direction in value space: a token's keep-logit is its value's projection on it."""

    def __init__(self, kv_heads: int, head_dim: int):
        super().__init__()
        # random, not zero: equal scores would leave the first decisions to top-k's tie-breaking
        self.weight = nn.Parameter(torch.randn(kv_heads, head_dim) / head_dim ** 0.5)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(values.dtype, torch.float32)
        return torch.einsum("bhld,hd->bhl", values.to(dtype), self.weight.to(dtype))


@register("dms")
@dataclass(frozen=True)
class DMS(Selector):
    examples = ({},)
    reads_values: ClassVar[bool] = True

    state: KeepLogits | None = field(default=None, compare=False, repr=False)

    def make_state(self, head_dim: int, kv_heads: int) -> KeepLogits:
        return KeepLogits(kv_heads, head_dim)

    def score(self, attention: torch.Tensor | None, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> torch.Tensor:
        if self.state is None:
            raise ValueError("the dms selector scores with logits the model learns: use it through a model it is "
                             "attached to (attach(model, spec) registers them in each attention layer)")
        return self.state(values)
