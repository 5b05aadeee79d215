"""Length-penalized RL: rewards, advantages, policy losses and dynamic sampling, as pure functions."""

from .advantages import group_advantages, reinforce_pp_baseline
from .losses import aggregate, clip_fraction, drpo, drpo_weights, gppo, k3_kl, ppo_clip
from .rewards import (grpo_lambda, kimi_length_reward, l1_exact, l1_max, score, soft_overlong,
                      truncation_penalty, weighted_sum)
from .sampling import degenerate_batch_warning, informative_groups

__all__ = [
    "aggregate", "clip_fraction", "degenerate_batch_warning", "drpo", "drpo_weights", "gppo", "group_advantages",
    "grpo_lambda", "informative_groups", "k3_kl", "kimi_length_reward", "l1_exact", "l1_max", "ppo_clip",
    "reinforce_pp_baseline", "score", "soft_overlong", "truncation_penalty", "weighted_sum",
]
