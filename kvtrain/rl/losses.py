"""Policy losses on per-token log-probs. Shapes: (batch, tokens) for log-probs and the token mask,
(batch,) or (batch, tokens) for advantages. Each loss returns per-token values; `aggregate` reduces
them with the chosen normalization, so any loss composes with any aggregation."""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token_mean", "seq_mean_token_mean", "constant"]


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages[:, None].expand_as(like) if advantages.dim() == 1 else advantages


def ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = None) -> torch.Tensor:
    """PPO clipped surrogate with separate low/high clip (DAPO clip-higher) and optional dual clip
    (for negative advantages the loss is capped at -A * dual_clip, as DLER's c=10)."""
    adv = _per_token(advantages, logp)
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def gppo(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
         eps_low: float = 0.2, eps_high: float = 0.28) -> torch.Tensor:
    """GPPO (KlearReasoner): the forward value of clip-higher PPO, but clipped tokens keep a gradient
    -A * (1 +- eps) through ratio / sg(ratio) instead of none."""
    adv = _per_token(advantages, logp)
    ratio = torch.exp(logp - old_logp)
    unit = ratio / ratio.detach()  # 1 in value, d/dlogp = 1
    lo, hi = (1 - eps_low) * unit, (1 + eps_high) * unit
    clipped = torch.where(ratio > 1 + eps_high, hi, torch.where(ratio < 1 - eps_low, lo, ratio))
    return torch.maximum(-adv * ratio, -adv * clipped)


def clip_fraction(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                  eps_low: float = 0.2, eps_high: float = 0.28) -> torch.Tensor:
    ratio = torch.exp(logp - old_logp)
    clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float()
    return (clipped * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0,
    low variance), clamped as verl's low_var_kl does."""
    delta = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(delta) - delta - 1).clamp(-clamp, clamp)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token_mean",
              max_tokens: int | None = None) -> torch.Tensor:
    """token_mean: over every valid token of the batch (DAPO); seq_mean_token_mean: per-sequence mean,
    then mean over sequences (GRPO); constant: sum / (batch * max_tokens) (Dr. GRPO), which neither
    favours short nor long completions."""
    mask = mask.float()
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if mode == "constant":
        return (per_token * mask).sum() / (mask.shape[0] * (max_tokens or mask.shape[1]))
    raise ValueError(f"aggregation must be one of token_mean, seq_mean_token_mean, constant; got {mode!r}")


def drpo_weights(lengths: torch.Tensor, max_len: int, temperature: float = 0.1) -> torch.Tensor:
    """DRPO's weights over a group's correct completions: softmax((1 - L / L_max) / lambda)."""
    return torch.softmax((1 - lengths.float() / max_len) / temperature, dim=0)


def drpo(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
         lengths: torch.Tensor, group_size: int, max_len: int, temperature: float = 0.1, tau: float = 10.0,
         beta: float = 1e3, delta: float = 1e-4) -> torch.Tensor:
    """DRPO (decoupled): per group with at least one correct and one incorrect answer,
    J = sum_pos w_i s_i - tau * logsumexp_neg(s_j / tau), s = mean-token log-prob; the loss is
    -sum J / groups + sg(beta * max(KL_old - delta, 0)) * KL_old, KL_old the token-mean k3 to the old
    policy. Groups without both kinds of answer contribute nothing. Returns a scalar."""
    mask = mask.float()
    s = (logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    ok = correct.bool().view(-1, group_size)
    s, length = s.view(-1, group_size), lengths.view(-1, group_size)
    objective = logp.new_zeros(())
    valid = 0
    for g in range(ok.shape[0]):
        pos, neg = ok[g], ~ok[g]
        if not (pos.any() and neg.any()):
            continue
        weights = drpo_weights(length[g][pos], max_len, temperature)
        objective = objective + (weights * s[g][pos]).sum() - tau * torch.logsumexp(s[g][neg] / tau, dim=0)
        valid += 1
    kl_old = aggregate(k3_kl(logp, old_logp), mask)
    penalty = (beta * (kl_old - delta).clamp(min=0)).detach() * kl_old
    return -objective / max(valid, 1) + penalty
