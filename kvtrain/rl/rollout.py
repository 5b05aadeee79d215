"""Rollouts: sample completions with `generate` (optionally under the compressed KV cache the model
will be deployed with) and score them with a training forward.

Both sides compute a token's log-prob the same way, log_softmax(logits / temperature), and the
training forward gets the position ids and attention mask generation used. With a KV spec the
training forward runs with the spec attached, whose view equals what QuantizedKVCache handed back
during sampling (train/decode parity), so the first importance ratio of an update is 1.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from kvtrain.kv import QuantizedKVCache, Spec, attached
from kvtrain.kv.attention import attached_spec, set_prompt_lengths


@dataclass
class Rollouts:
    """`num_generations` consecutive completions per prompt.

    prompt_ids/prompt_mask: (B, P), left-padded. completion_ids: (B, T), padded after each end.
    completion_mask: (B, T), 1 on the tokens that belong to the completion (its EOS included, a
    trailing stop string included). logprobs: (B, T) sampling log-probs, 0 off the mask.
    truncated: (B,) True when max_new_tokens ran out before EOS or a stop string.
    blocks: for rollouts merged from several generate calls (dynamic sampling's rounds), the
    (rows, prompt width) of each call in order; the merged prompts are left-padded to the widest.
    Empty: one call.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def rows(self, index: slice | torch.Tensor) -> "Rollouts":
        """These rows only (a slice, or a 1-D tensor of row indices), as one generate call."""
        if isinstance(index, torch.Tensor):
            texts = [self.texts[i] for i in index.tolist()]
            index = index.to(self.completion_ids.device)
        else:
            texts = self.texts[index]
        return Rollouts(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                        self.completion_mask[index], self.logprobs[index], self.truncated[index], texts)

    def generate_calls(self) -> list["Rollouts"]:
        """The rows of each generate call with the prompt padding that call had. A compressed cache
        groups keys counting from the padded start, so extra left padding would change the K/V view
        the training forward sees from the one sampling saw."""
        if not self.blocks:
            return [self]
        calls, start, width = [], 0, self.prompt_ids.shape[1]
        for rows, prompt_width in self.blocks:
            call = self.rows(slice(start, start + rows))
            trim = width - prompt_width
            calls.append(replace(call, prompt_ids=call.prompt_ids[:, trim:], prompt_mask=call.prompt_mask[:, trim:]))
            start += rows
        return calls

    def micro_batches(self, size: int | None) -> list[tuple[slice, "Rollouts"]]:
        """(rows, part) pieces of at most `size` rows (None: one per generate call), each inside one
        generate call, in row order."""
        parts, start = [], 0
        for call in self.generate_calls():
            n = len(call.texts)
            step = size or n
            parts += [(slice(start + i, start + min(n, i + step)), call.rows(slice(i, i + step))) for i in range(0, n, step)]
            start += n
        return parts


def completion_mask(completion_ids: torch.Tensor, eos_id: int, pad_id: int,
                    stopped_by_string: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, truncated) from generated ids. A row ends at its first EOS or padding token; a generated
    EOS belongs to the completion, padding does not (generate pads rows that stopped on a stop string,
    and, when pad == EOS, the EOS after a stop string is padding too). A row that reached
    max_new_tokens without EOS or a stop string is truncated."""
    batch, total = completion_ids.shape
    is_end = (completion_ids == eos_id) | (completion_ids == pad_id)
    first = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), torch.full((batch,), total))
    at_first = completion_ids.gather(1, first.clamp(max=total - 1)[:, None]).squeeze(1)
    ends_with_eos = (first < total) & (at_first == eos_id) & ~stopped_by_string
    length = torch.where(ends_with_eos, first + 1, first)
    mask = (torch.arange(total)[None] < length[:, None]).long()
    truncated = (first == total) & ~stopped_by_string
    return mask, truncated


class SampledLogprobs(LogitsProcessor):
    """Records, at each generation step, log_softmax(logits / temperature) at the token the step chose,
    keeping one step's logits at a time (generate's `output_logits` would keep every step's: at 64 x
    4096 tokens x a 152k vocabulary, 159 GB in fp32). It sees the logits before temperature, top-k and
    top-p (which generate applies after it), as a training forward computes them."""

    def __init__(self, temperature: float):
        self.temperature, self.previous, self.logprobs = temperature, None, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:  # the previous step's choice is the last column now
            self._record(input_ids[:, -1])
        self.previous = scores.clone()
        return scores

    def _record(self, chosen: torch.Tensor) -> None:
        self.logprobs.append(token_logprobs(self.previous, chosen, self.temperature))

    def finish(self, completion: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of `completion` (the generated ids), once generate has returned."""
        if len(self.logprobs) < completion.shape[1]:
            self._record(completion[:, -1])
        self.previous = None
        return torch.stack(self.logprobs, dim=1)


def _hit_stop_string(texts: list[str], stop: list[str]) -> torch.Tensor:
    # generate stops at a stop string's first occurrence (its last token may overhang it), so any
    # occurrence means the row stopped there
    return torch.tensor([any(s in text for s in stop) for text in texts], dtype=torch.bool)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_generations: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    spec: Spec | str | None = None,
) -> Rollouts:
    """Sample `num_generations` completions per prompt (temperature 0: greedy, log-probs at
    temperature 1); with `spec`, decoding runs on QuantizedKVCache(spec) and the prefill through
    the attached view, as deployment would."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not prompts:
        raise ValueError("no prompts to sample from")
    device = next(model.parameters()).device
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    prompt_ids = enc.input_ids.repeat_interleave(num_generations, dim=0).to(device)
    prompt_mask = enc.attention_mask.repeat_interleave(num_generations, dim=0).to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    recorder = SampledLogprobs(temperature or 1.0)
    kwargs = dict(max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([recorder]),
                  return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, **sampling)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if spec is None:
        out = model.generate(prompt_ids, attention_mask=prompt_mask, **kwargs)
    else:
        with attached(model, spec) as resolved:
            out = model.generate(prompt_ids, attention_mask=prompt_mask, past_key_values=QuantizedKVCache(resolved),
                                 **kwargs)
    completion = out.sequences[:, prompt_ids.shape[1]:]
    logprobs = recorder.finish(completion)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    stopped = _hit_stop_string(texts, stop) if stop else torch.zeros(len(texts), dtype=torch.bool)
    mask, truncated = completion_mask(completion.cpu(), tokenizer.eos_token_id, tokenizer.pad_token_id, stopped)
    mask = mask.to(device)
    return Rollouts(prompt_ids, prompt_mask, completion, mask, logprobs * mask, truncated.to(device), texts)


LOGPROB_CHUNK_BYTES = 1 << 26  # fp32 working memory of the chunked log-softmax (64 MiB)


def _chunks(n: int, vocab: int) -> list[slice]:
    step = max(1, LOGPROB_CHUNK_BYTES // (4 * vocab))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


class _ChunkedLogProb(torch.autograd.Function):
    """log_softmax(logits / T) at `tokens` over rows of (N, V) logits, a chunk of rows at a time: the
    fp32 softmax exists for one chunk only, in the forward and in the backward (which recomputes it
    from the logits the graph holds anyway and the saved (N,) logsumexp)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, out_dtype):
        out = logits.new_empty(tokens.shape, dtype=out_dtype)
        lse = logits.new_empty(tokens.shape, dtype=out_dtype)
        for c in _chunks(len(tokens), logits.shape[-1]):
            z = logits[c].to(out_dtype) / temperature
            lse[c] = torch.logsumexp(z, dim=-1)
            out[c] = z.gather(-1, tokens[c, None]).squeeze(-1) - lse[c]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for c in _chunks(len(tokens), logits.shape[-1]):
            g = -torch.exp(logits[c].to(lse.dtype) / ctx.temperature - lse[c, None]) * grad[c, None]
            g.scatter_add_(-1, tokens[c, None], grad[c, None])
            grad_logits[c] = g / ctx.temperature
        return grad_logits, None, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) at `tokens`, in at least fp32, without materializing the
    (…, vocab) log-softmax: chunked over positions, differentiable."""
    if temperature <= 0:
        raise ValueError(f"log-probs need a temperature > 0, got {temperature}")
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = _ChunkedLogProb.apply(logits.flatten(0, -2), tokens.flatten(), temperature, out_dtype)
    return flat.view(tokens.shape)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, chunked like `token_logprobs` (no gradient)."""
    flat, dtype = logits.flatten(0, -2), torch.promote_types(logits.dtype, torch.float32)
    out = flat.new_empty(flat.shape[0], dtype=dtype)
    for c in _chunks(flat.shape[0], flat.shape[-1]):
        z = flat[c].to(dtype) / temperature
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        out[c] = (lse - (torch.exp(z - lse) * z).sum(-1, keepdim=True)).squeeze(-1)
    return out.view(logits.shape[:-1])


def completion_logits(model: PreTrainedModel, rollouts: Rollouts) -> torch.Tensor:
    """(B, T, vocab) logits predicting each completion token of rollouts from one generate call,
    from a training forward with the padding, positions and mask generation used (left padding
    shifts positions)."""
    if rollouts.blocks:
        raise ValueError("completion_logits takes the rows of one generate call: iterate rollouts.micro_batches()")
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, torch.ones_like(rollouts.completion_ids)], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    spec = attached_spec(model)
    if getattr(spec, "eviction", None) is not None and not spec.eviction.interval:  # decided where the prompts end
        set_prompt_lengths(model, [rollouts.prompt_ids.shape[1]] * len(ids))
    keep = rollouts.completion_ids.shape[1] + 1
    # the LM head over the prompt positions is wasted work (vocab x hidden per token): skip it where
    # the model lets us
    extra = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra).logits
    return logits[:, -keep:-1]


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def policy_logprobs(model: PreTrainedModel, rollouts: Rollouts, temperature: float = 1.0,
                    micro_batch_size: int | None = None, entropy: bool = False):
    """(B, T) log-probs of the completions under `model` now, masked like the rollout, computed
    `micro_batch_size` rows at a time (None: a generate call at a time); with `entropy`, also the
    (B, T) entropy of each prediction (no gradient)."""
    logps, entropies = [], []
    for _, part in rollouts.micro_batches(micro_batch_size):
        logits = completion_logits(model, part)
        logps.append(token_logprobs(logits, part.completion_ids, temperature) * part.completion_mask)
        if entropy:
            entropies.append(token_entropy(logits, temperature))
        del logits
    logp = torch.cat(logps)
    return (logp, torch.cat(entropies)) if entropy else logp
