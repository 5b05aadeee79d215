"""Dynamic sampling (DAPO): groups whose rewards are all equal carry no GRPO signal."""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) bool: True where the group's rewards are not all equal."""
    r = rewards.float().view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > 0
