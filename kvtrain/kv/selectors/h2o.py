"""H2O (Zhang et al. 2023): heavy hitters, the tokens with the most attention accumulated over every
query since they arrived (the original's running sum; kvpress's ObservedAttentionPress divides it by
the number of queries that saw each token instead)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrain.kv.selectors import Selector, register


@register("h2o")
@dataclass(frozen=True)
class H2O(Selector):
    examples = ({},)

    @property
    def observed(self) -> None:
        return None

    def score(self, attention: torch.Tensor | None, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> torch.Tensor:
        return attention
