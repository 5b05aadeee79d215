"""StreamingLLM (Xiao et al. 2023): the attention sinks and the newest tokens survive, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtrain.kv.selectors import Selector, register


@register("streaming_llm")
@dataclass(frozen=True)
class StreamingLLM(Selector):
    """Scores a token by its position: the budget left after the policy's sinks goes to the newest."""

    examples = ({},)

    def score(self, attention: torch.Tensor | None, positions: torch.Tensor,
              values: torch.Tensor | None = None) -> torch.Tensor:
        return positions.float()
