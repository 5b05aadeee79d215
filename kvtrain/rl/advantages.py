"""Advantage estimators for group-sampled completions (one reward per completion, `group_size`
completions per prompt, consecutive). All return one advantage per completion, except
`reinforce_pp_baseline`, which whitens over tokens and so takes the token mask."""

from __future__ import annotations

from typing import Literal

import torch

EPS = 1e-4


def _centered(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    return r - r.mean(dim=1, keepdim=True)


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale: Literal["group", "batch", "none"] = "group", eps: float = EPS) -> torch.Tensor:
    """GRPO: (r - group mean) / (std + eps) with the unbiased std of the group ("group"), of the
    whole batch's rewards (TRL's scale_rewards="batch"), or no scaling (Dr. GRPO, "none")."""
    centered = _centered(rewards, group_size)
    if scale == "group":
        std = rewards.float().view(-1, group_size).std(dim=1, keepdim=True)
    elif scale == "batch":
        std = rewards.float().std()
    elif scale == "none":
        return centered.flatten()
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return (centered / (std + eps)).flatten()


def reinforce_pp_baseline(rewards: torch.Tensor, group_size: int, token_mask: torch.Tensor) -> torch.Tensor:
    """DLER's estimator (verl reinforce_plus_plus_baseline): subtract the group mean, give every token
    its completion's value, then whiten over all valid tokens of the batch (token-weighted mean and
    unbiased variance). Returns (batch, tokens) advantages, 0 on masked tokens."""
    mask = token_mask.float()
    values = _centered(rewards, group_size).flatten()[:, None] * mask
    n = mask.sum()
    if n < 2:
        raise ValueError("whitening needs at least 2 valid tokens in the batch")
    mean = values.sum() / n
    var = ((values - mean) ** 2 * mask).sum() / n * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask
