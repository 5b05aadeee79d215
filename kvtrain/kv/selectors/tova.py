"""TOVA (Oren et al. 2024): the attention of the last query before a decision, averaged over all the
layer's heads, so every head keeps the same tokens (as the paper and kvpress's TOVAPress; TOVA
decides at every token: interval 1 is its schedule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrain.kv.selectors import Selector, register


@register("tova")
@dataclass(frozen=True)
class TOVA(Selector):
    examples = ({},)

    @property
    def observed(self) -> int:
        return 1

    def score(self, attention: torch.Tensor | None, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> torch.Tensor:
        return attention.mean(1, keepdim=True).expand_as(attention)
