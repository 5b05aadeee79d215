"""Language-model losses shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Position t predicts token t+1; a target counts only when both it and its context position are
    real tokens (attention_mask 1), so right or left padding never contributes, and, with
    `loss_mask`, only when the target is marked (e.g. the completion of a prompt/completion pair).
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    targets = input_ids[:, 1:]
    mask = _next_token_mask(input_ids, attention_mask)
    if loss_mask is not None:
        mask = mask & loss_mask[:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (nll * mask.flatten()).sum(), mask.sum()


def _next_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    return attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher || student) over the next-token predictions that count, and their number.

    Forward KL, as in LLM-QAT: the student (seeing the compressed cache) is pulled toward the full
    distribution of the full-precision teacher, not only its argmax. Computed in fp32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    mask = _next_token_mask(student_logits[..., 0], attention_mask)
    student = F.log_softmax(student_logits[:, :-1].float(), -1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float(), -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return (kl * mask).sum(), mask.sum()
