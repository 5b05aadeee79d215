"""Language-model losses shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Position t predicts token t+1; a target counts only when both it and its context position are
    real tokens (attention_mask 1), so right or left padding never contributes.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    targets = input_ids[:, 1:]
    if attention_mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    else:
        mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (nll * mask.flatten()).sum(), mask.sum()
