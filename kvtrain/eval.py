"""Evaluation: perplexity of a causal LM on a packed split (optionally under a KV spec), greedy
answer accuracy and length on held-out task problems, the KV bytes per token a real cache holds,
and the unigram baseline a model must beat."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvtrain.data.lm import PackedDataset
from kvtrain.kv import QuantizedKVCache, Spec, attached, resolve_spec
from kvtrain.loss import next_token_nll


def perplexity(
    model: PreTrainedModel,
    dataset: PackedDataset,
    batch_size: int = 8,
    max_batches: int | None = None,
    desc: str = "eval",
    spec: Spec | str | None = None,
) -> dict[str, float]:
    """Token-weighted mean NLL and its exp over the windows of `dataset` (optionally the first
    `max_batches`). With `spec`, every prediction sees K/V as QuantizedKVCache(spec) would hold them
    when decoding that token (train/decode parity makes the one-forward result exact)."""
    if spec is None:
        return _perplexity(model, dataset, batch_size, max_batches, desc)
    with attached(model, spec):
        return _perplexity(model, dataset, batch_size, max_batches, desc)


@torch.no_grad()
def _perplexity(model, dataset, batch_size, max_batches, desc) -> dict[str, float]:
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


@torch.no_grad()
def answer_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    spec: Spec | str | None = None,
    desc: str = "answers",
    kv_bytes: bool = False,
) -> dict[str, object]:
    """Greedy completions of held-out problems (objects or dicts with `prompt` and `answer`), decoded
    under QuantizedKVCache(spec) when given: accuracy, mean completion length in tokens, truncation
    rate, and the per-problem lengths and correctness (for histograms and paired comparisons). With
    `kv_bytes`, also each answer's measured cache bytes (prompt + answer, `answer_kv_bytes`) and their mean."""
    from kvtrain.data.tasks import is_correct
    from kvtrain.rl.rollout import sample

    rows = [p if isinstance(p, dict) else {"prompt": p.prompt, "answer": p.answer} for p in problems]
    if not rows:
        raise ValueError("no problems to evaluate")
    was_training, lengths, correct, truncated, cache_bytes, measured = model.training, [], [], [], [], {}
    model.eval()
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", file=sys.stderr):
        chunk = rows[start : start + batch_size]
        out = sample(model, tokenizer, [r["prompt"] for r in chunk], 1, max_new_tokens, temperature=0.0, spec=spec)
        lengths += out.lengths.tolist()
        truncated += out.truncated.tolist()
        correct += [is_correct(text, r["answer"]) for text, r in zip(out.texts, chunk)]
        if kv_bytes:
            cache_bytes += answer_kv_bytes(model, out, spec, measured).tolist()
    model.train(was_training)
    n = len(rows)
    result = {"accuracy": sum(correct) / n, "length": sum(lengths) / n, "truncated": sum(truncated) / n,
              "problems": n, "lengths": lengths, "correct": correct}
    if kv_bytes:
        result.update(kv_bytes_per_answer=sum(cache_bytes) / n, kv_bytes=cache_bytes)
    return result


def completion_match(model: PreTrainedModel, batches, desc: str = "completions") -> dict[str, object]:
    """Exact match of each completion under greedy decoding, from one teacher-forced forward per
    batch (prompt + completion with a loss_mask on the completion, as TaskDataModule's sft format):
    a completion is right when every target token is the argmax after the ones before it, which is
    what greedy decoding produces token by token. Under an attached spec the forward is the view,
    equal to decoding with its cache (an eviction spec deciding at the end of the prompt reads each
    row's prompt from the loss_mask)."""
    from kvtrain.kv.attention import attached_spec, set_prompt_lengths

    spec, was_training, correct = attached_spec(model), model.training, []
    model.eval()
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr):
        targets = batch["loss_mask"].bool()
        if getattr(spec, "eviction", None) is not None and not spec.eviction.interval:
            set_prompt_lengths(model, targets.int().argmax(-1).tolist())
        ids = batch["input_ids"].to(model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(model.device), use_cache=False).logits
        right = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~targets[:, 1:].to(ids.device)
        correct += right.all(-1).tolist()
    model.train(was_training)
    if not correct:
        raise ValueError("no completions to evaluate")
    return {"accuracy": sum(correct) / len(correct), "completions": len(correct), "correct": correct}


def _tensor_bytes(obj: object) -> int:
    """Bytes of every tensor inside obj (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def cache_nbytes(cache: Cache) -> int:
    """Real storage of a cache: ours counts its packed store; for transformers' caches, every tensor a
    layer holds (DynamicCache: keys, values; QuantizedCache: the full-precision window plus the packed
    codes and the scale / zero tensors of its backend's metadata)."""
    if isinstance(cache, QuantizedKVCache):
        return cache.nbytes()
    known = {"keys", "values", "_quantized_keys", "_quantized_values"}
    for layer in cache.layers:
        unknown = [k for k, v in vars(layer).items() if k not in known and _tensor_bytes(v)]
        if unknown:
            raise TypeError(f"cache_nbytes does not know what {type(layer).__name__}.{unknown} holds")
    return sum(_tensor_bytes(getattr(layer, f, None)) for layer in cache.layers for f in sorted(known))


@torch.no_grad()
def kv_cache_bytes(model: PreTrainedModel, input_ids: torch.Tensor, spec: Spec | str | None = None) -> int:
    """Measured bytes of a real cache holding `input_ids` (1, T): QuantizedKVCache(spec), or a
    full-precision DynamicCache when `spec` is None. Leaves the model in eval mode."""
    model.eval()
    if spec is None:
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    else:
        cache = QuantizedKVCache(spec)
        with attached(model, spec):
            model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    return cache_nbytes(cache)


def kv_bytes_per_token(model: PreTrainedModel, input_ids: torch.Tensor, spec: Spec | str | None = None) -> float:
    """Measured KV bytes per token of a real cache holding `input_ids` (1, T) (see kv_cache_bytes)."""
    return kv_cache_bytes(model, input_ids, spec) / input_ids.numel()


def answer_kv_bytes(model: PreTrainedModel, rollouts, spec: Spec | str | None = None,
                    measured: dict | None = None) -> torch.Tensor:
    """(B,) bytes of the cache each answer ends its generation with: its prompt (without padding) and
    completion in a real cache of its own (QuantizedKVCache(spec), or DynamicCache).

    Both caches' storage is a function of the number of tokens they hold (a test checks it), so one
    answer per distinct length is measured; `measured` ({(spec, tokens): bytes}) carries the
    measurements across calls, so a training run measures each length once.
    """
    measured = {} if measured is None else measured
    key = json.dumps(resolve_spec(spec).to_dict(), sort_keys=True) if spec is not None else None
    out = []
    for i, n_completion in enumerate(rollouts.lengths.tolist()):
        prompt = rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()]
        ids = torch.cat([prompt, rollouts.completion_ids[i, :n_completion]])
        if (key, ids.numel()) not in measured:
            measured[key, ids.numel()] = kv_cache_bytes(model, ids[None], spec)
        out.append(measured[key, ids.numel()])
    return torch.tensor(out)


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
    """Write JSON atomically (a temporary sibling renamed into place): a reader, or a rerun that
    takes the file as a done marker, never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
