"""Dynamic sampling (DAPO): groups whose rewards are all equal carry no GRPO signal."""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) bool: True where the group's rewards are not all equal."""
    r = rewards.float().view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > 0


def degenerate_batch_warning(rewards: torch.Tensor, truncated: torch.Tensor, group_size: int) -> str | None:
    """A message when no group carries a GRPO signal (every group's rewards are equal, so every
    advantage is 0 and the update does nothing); it names the usual cause, a batch where every
    completion was truncated. None when at least one group is informative."""
    if informative_groups(rewards, group_size).any():
        return None
    if truncated.bool().all():
        return (f"all {truncated.numel()} completions hit max_new_tokens, so every reward is equal and the "
                "advantages are all zero: raise max_new_tokens, lower the truncation penalty, or warm-start with SFT")
    return f"every group of {group_size} completions got equal rewards: advantages are all zero for this batch"
