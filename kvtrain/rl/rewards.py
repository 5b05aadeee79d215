"""Rewards for length-penalized RL: correctness gated length terms, each a pure function of tensors.

Shapes: `correct`, `truncated`, `lengths` are 1-D over completions; functions that compare a
completion with its group take `groups`, a (num_groups, group_size) view of the same order (the
completions of prompt g are rows g*group_size ... (g+1)*group_size - 1).
Compose with `weighted_sum`: e.g. correctness + 0.5 * soft_overlong.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def truncation_penalty(correct: torch.Tensor, truncated: torch.Tensor, factor: float = 0.0) -> torch.Tensor:
    """DLER: the reward is 1 only for a correct answer that stopped within the budget; a truncated
    completion's reward is scaled by `factor` (0: nothing; DLER's script uses 0.1)."""
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"truncation factor must be in [0, 1], got {factor}")
    reward = correct.float()
    return torch.where(truncated.bool(), reward * factor, reward)


def soft_overlong(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to max_len - cache_len tokens, then falling linearly to -1
    at max_len, and -1 beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len={max_len}], got {cache_len}")
    free = max_len - cache_len
    return ((free - lengths.float()) / cache_len).clamp(-1.0, 0.0)


def kimi_length_reward(lengths: torch.Tensor, correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """Kimi k1.5 group length reward: lambda = 0.5 - (len - min) / (max - min) within the group;
    correct answers get lambda, incorrect ones min(0, lambda). A group of equal lengths gets 0."""
    length = lengths.float().view(-1, group_size)
    lo, hi = length.min(dim=1, keepdim=True).values, length.max(dim=1, keepdim=True).values
    lam = torch.where(hi > lo, 0.5 - (length - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(length))
    lam = lam.flatten()
    return torch.where(correct.bool(), lam, lam.clamp(max=0.0))


def l1_exact(correct: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor | int, alpha: float = 3e-4) -> torch.Tensor:
    """L1 (LCPO-Exact): 1[correct] - alpha * |length - target|."""
    return correct.float() - alpha * (lengths.float() - torch.as_tensor(target, dtype=torch.float)).abs()


def l1_max(correct: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor | int,
           alpha: float = 1e-3, delta: float = 0.5) -> torch.Tensor:
    """L1 (LCPO-Max): 1[correct] * clip(alpha * (target - length) + delta, 0, 1)."""
    slack = alpha * (torch.as_tensor(target, dtype=torch.float) - lengths.float()) + delta
    return correct.float() * slack.clamp(0.0, 1.0)


def grpo_lambda(correct: torch.Tensor, lengths: torch.Tensor, group_size: int,
                top_fraction: float = 0.2, alpha: float = 0.6) -> torch.Tensor:
    """GRPO-lambda: groups are ranked by their fraction of correct answers; the top `top_fraction`
    of groups get the efficiency reward 1 - alpha * sigmoid((L - mean) / std) on correct answers
    (mean and population std over the group's correct lengths; 0 for incorrect), the rest plain 0/1."""
    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}")
    ok = correct.float().view(-1, group_size)
    length = lengths.float().view(-1, group_size)
    reward = ok.clone()
    n_top = round(top_fraction * ok.shape[0])
    for g in torch.argsort(ok.mean(dim=1), descending=True, stable=True)[:n_top].tolist():
        mask = ok[g] > 0
        if not mask.any():
            continue
        correct_len = length[g][mask]
        mean, std = correct_len.mean(), correct_len.std(unbiased=False)
        z = (length[g] - mean) / std if std > 0 else torch.zeros_like(length[g])
        reward[g] = torch.where(mask, 1.0 - alpha * torch.sigmoid(z), torch.zeros_like(z))
    return reward.flatten()


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_k weights[k] * terms[k]: the named reward terms composed into one reward per completion."""
    missing = set(weights) - set(terms)
    if missing:
        raise KeyError(f"weights name reward terms that were not computed: {sorted(missing)}")
    return sum(weights[name] * terms[name].float() for name in weights)


RewardFn = Callable[[str, str, str], float]  # (prompt, completion, answer) -> reward


def score(reward_fn: RewardFn, prompts: list[str], completions: list[str], answers: list[str]) -> torch.Tensor:
    """Call a user reward function on every sample; one that raises or returns a non-finite value
    stops the run with the offending sample named, never as a silent NaN in the advantages."""
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    values = []
    for i, (prompt, completion, answer) in enumerate(zip(prompts, completions, answers, strict=True)):
        try:
            value = float(reward_fn(prompt, completion, answer))
        except Exception as e:
            raise RuntimeError(f"reward function {name} raised on sample {i}: {_sample(prompt, completion, answer)}") from e
        if not math.isfinite(value):
            raise ValueError(f"reward function {name} returned {value} on sample {i}: {_sample(prompt, completion, answer)}")
        values.append(value)
    return torch.tensor(values)


def _sample(prompt: str, completion: str, answer: str, limit: int = 200) -> str:
    return f"prompt={prompt[:limit]!r}, completion={completion[:limit]!r}, answer={answer!r}"
