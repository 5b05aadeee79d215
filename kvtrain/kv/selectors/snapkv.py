"""SnapKV (Li et al. 2024): the attention of the last `window` queries before a decision, pooled over
neighbouring tokens so that a kept token brings its context along (kvpress's SnapKVPress: the mean
over the window's queries and over each KV head's query heads, then avg_pool1d with `kernel`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtrain.kv.selectors import Selector, check_count, register


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(Selector):
    """window: observed queries (SnapKV's observation window); kernel: odd width of the pooling."""

    window: int = 32
    kernel: int = 5
    examples = ({"window": 4, "kernel": 3}, {"window": 1, "kernel": 1})

    def __post_init__(self) -> None:
        check_count("snapkv window (observed queries)", self.window, 1)
        check_count("snapkv kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"snapkv kernel must be odd (the pooling is centred on each token), got {self.kernel}")

    @property
    def observed(self) -> int:
        return self.window

    def score(self, attention: torch.Tensor | None, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> torch.Tensor:
        b, h, n = attention.shape
        pooled = F.avg_pool1d(attention.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.reshape(b, h, n)
