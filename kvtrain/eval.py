"""Evaluation: perplexity of a causal LM on a packed split, and the unigram baseline it must beat."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kvtrain.data.lm import PackedDataset
from kvtrain.loss import next_token_nll


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, dataset: PackedDataset, batch_size: int = 8, max_batches: int | None = None, desc: str = "eval"
) -> dict[str, float]:
    """Token-weighted mean NLL and its exp over the windows of `dataset` (optionally the first `max_batches`)."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    nll_sum, n_tokens = 0.0, 0
    for i, batch in enumerate(tqdm(loader, total=total, desc=desc, unit="batch", file=sys.stderr)):
        if i >= total:
            break
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll, n = next_token_nll(logits, ids)
        nll_sum, n_tokens = nll_sum + nll.item(), n_tokens + int(n)
    loss = nll_sum / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n_tokens}


def unigram_perplexity(train_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the add-one-smoothed unigram distribution of `train_tokens` on `eval_tokens`."""
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[eval_tokens.long()].mean().item())


def format_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A markdown table; floats get 4 significant digits."""

    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
