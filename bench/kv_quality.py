"""Perplexity and KV bytes per token under each cache: full precision, the HQQ peer, ours post-training.

On kvtrain-ref and the embedded val split (non-overlapping `seq_len` windows, the first `max_windows`):

- full precision: a plain forward (what DynamicCache hands attention is K/V unchanged);
- ours (kivi2, kivi4): one forward with the spec attached, which equals token-by-token decoding with
  QuantizedKVCache(spec) (train/decode parity). This script checks that claim itself first: on one
  short window it decodes token by token with our cache and asserts max |logit difference| < 1e-3;
- the peer (transformers' QuantizedCache, HQQ, 2 and 4 bits, group 32, window 128): each window is
  decoded one token at a time from an empty cache, so every prediction sees the cache as greedy
  generation after a 1-token prompt would;
- each `--model NAME=PATH` (a save_pretrained folder, e.g. a QAT run's export): full precision and kivi2.

KV bytes per token come from real cache objects filled with random K/V (batch 1, the model's KV heads
and head_dim) to T tokens, for T in `--byte_lengths`, in float32 and bfloat16, in two states: right
after a T-token prefill, and while decoding (the mean over the last 128 single-token steps up to T);
ratios are to DynamicCache in the same dtype.

    python bench/kv_quality.py --smoke
    python bench/kv_quality.py                                  # all 12 val windows (~6 min on 1 core)
    python bench/kv_quality.py --model qat_kivi2=runs/qat_kivi2/model --model control=runs/qat_control/model
"""

from __future__ import annotations

import argparse
import math
import sys
from importlib.metadata import version

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from bench_utils import (LABELS, OURS, PEER_BITS, cache_nbytes, fill_random, format_table, make_cache, prepared,
                         save_outputs, set_threads)
from kvtrain import QuantizedKVCache, attached
from kvtrain.data.lm import PackedDataset, token_stream
from kvtrain.eval import perplexity
from kvtrain.loss import next_token_nll
from kvtrain.models import load_model, load_tokenizer

CACHES = ("fp", "hqq2", "hqq4", "kivi2", "kivi4")
PARITY_TOL = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_len", type=int, default=1024, help="window length (default: the model's context)")
    p.add_argument("--max_windows", type=int, default=None, help="evaluate the first N val windows (default: all)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="an extra model to evaluate under full precision and kivi2 (repeatable)")
    p.add_argument("--base", default="kvtrain-ref", help="the model every cache is compared on")
    p.add_argument("--tokenizer", default="kvtrain-ref")
    p.add_argument("--check_len", type=int, default=320, help="tokens of the token-by-token parity check")
    p.add_argument("--byte_lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="2 windows of 256 tokens, bytes at 256 and 512: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.max_windows, args.check_len, args.byte_lengths = 256, 2, 200, [256, 512]
    if min(args.byte_lengths) <= DECODE_STEPS:
        p.error(f"--byte_lengths must exceed {DECODE_STEPS} (the decoding state ends with {DECODE_STEPS} single steps)")
    args.extra = dict(parse_named(m) for m in args.model)
    return args


def parse_named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--model takes NAME=PATH, got {spec!r}")
    return name, path


# ---------------------------------------------------------------- the claim this relies on


@torch.inference_mode()
def decode_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits (1, T, vocab) of feeding `ids` one token at a time into `cache`."""
    steps = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
             for t in range(ids.shape[1])]
    return torch.cat(steps, dim=1)


@torch.inference_mode()
def check_parity(model, ids: torch.Tensor, spec: str) -> float:
    """Max |logit difference| between the attached forward and token-by-token QuantizedKVCache decoding."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("the parity check runs in float32")
    with attached(model, spec):
        one_forward = model(input_ids=ids, use_cache=False).logits
        decoded = decode_logits(model, ids, QuantizedKVCache(spec))
    diff = float((one_forward - decoded).abs().max())
    assert diff < PARITY_TOL, f"{spec}: attached forward and cache decoding differ by {diff:.3g} (> {PARITY_TOL})"
    return diff


# ---------------------------------------------------------------- perplexity


def nll_result(nll_sum: float, tokens: int, windows: int) -> dict:
    loss = nll_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens, "windows": windows}


def ppl_by_decoding(model, windows: Subset, cache_name: str) -> dict:
    """Perplexity with every prediction made by token-by-token decoding through a fresh cache per window."""
    nll_sum, tokens = 0.0, 0
    for item in tqdm(windows, desc=f"decode {cache_name}", unit="window", file=sys.stderr):
        ids = item["input_ids"][None]
        with prepared(model, cache_name):
            logits = decode_logits(model, ids, make_cache(cache_name, model.config))
        nll, n = next_token_nll(logits, ids)
        nll_sum, tokens = nll_sum + nll.item(), tokens + int(n)
    return nll_result(nll_sum, tokens, len(windows))


def ppl_by_forward(model, windows: Subset, spec: str | None, desc: str) -> dict:
    """Perplexity of one forward per window, with `spec` attached (ours) or not (full precision)."""
    result = perplexity(model, windows, batch_size=1, desc=desc, spec=spec)
    return {**result, "windows": len(windows)}


def evaluate(model, windows: Subset, cache_name: str, desc: str) -> dict:
    if cache_name in PEER_BITS:
        return ppl_by_decoding(model, windows, cache_name)
    return ppl_by_forward(model, windows, cache_name if cache_name in OURS else None, desc)


# ---------------------------------------------------------------- bytes


STATES = ("prefill", "decoding")
DECODE_STEPS = 128  # one full-precision window of single-token steps: the peer flushes once in any 128


def bytes_per_token(config, cache_name: str, tokens: int, dtype: torch.dtype, state: str) -> float:
    """KV bytes / tokens held. prefill: after one T-token update. decoding: prefill T - 128 tokens, then
    128 single-token updates; the mean over those steps of bytes / tokens held (the peer's full-precision
    window fills and empties once in any 128 steps, so this averages over its cycle)."""
    if state == "prefill":
        return cache_nbytes(fill_random(make_cache(cache_name, config), config, tokens, dtype)) / tokens
    cache = fill_random(make_cache(cache_name, config), config, tokens - DECODE_STEPS, dtype)
    per_token = []
    for step in range(DECODE_STEPS):
        fill_random(cache, config, 1, dtype, seed=step + 1)
        per_token.append(cache_nbytes(cache) / (tokens - DECODE_STEPS + step + 1))
    return sum(per_token) / len(per_token)


def bytes_rows(config, lengths: list[int], dtypes: list[torch.dtype], caches=CACHES) -> list[dict]:
    rows = []
    for dtype in dtypes:
        full = {t: bytes_per_token(config, "fp", t, dtype, "prefill") for t in lengths}
        for name in caches:
            for state in STATES:
                row = {"cache": LABELS[name], "name": name, "dtype": str(dtype).removeprefix("torch."), "state": state}
                for t in tqdm(lengths, desc=f"bytes {name} {row['dtype']} {state}", leave=False, file=sys.stderr):
                    row[f"B/tok {t}"] = bytes_per_token(config, name, t, dtype, state)
                    row[f"x fp {t}"] = row[f"B/tok {t}"] / full[t]
                rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def ppl_row(model_name: str, cache_name: str, result: dict, bytes_by_cache: dict, lengths: list[int]) -> dict:
    row = {"model": model_name, "kv cache": LABELS[cache_name], **result}
    for t in lengths:
        row[f"B/tok {t}"] = bytes_by_cache[cache_name][f"B/tok {t}"]
        row[f"x fp {t}"] = bytes_by_cache[cache_name][f"x fp {t}"]
    return row


def ppl_caption(result: dict, args) -> str:
    env, parity = result["env"], ", ".join(f"{s}: {d:.2g}" for s, d in result["parity_max_abs_diff"].items())
    return " ".join([
        f"Perplexity on the val split of the embedded corpus, {result['windows']} window(s) of {args.seq_len} tokens",
        f"(next-token loss over the {args.seq_len - 1} predictions of each window), {result['model_dtype']}.",
        "Full precision: a plain forward. Ours: one forward with the spec attached; this run checked on a",
        f"{args.check_len}-token window that it equals token-by-token decoding with QuantizedKVCache",
        f"(max |logit diff| {parity}; asserted < {PARITY_TOL}).",
        f"Peer: transformers {env['transformers']} QuantizedCache, backend hqq {env['hqq']}, q_group_size 32,",
        "residual_length 128, axis_key = axis_value = 0. Each window is decoded one token at a time from an empty",
        "cache, so each prediction sees the cache exactly as greedy generation after a 1-token prompt would (the",
        "1-token prefill is quantized at once; after that the peer holds up to 127 tokens in full precision, then",
        "dequantizes, appends and re-quantizes the whole cache).",
        f"B/tok: KV bytes per token in {result['model_dtype']} while decoding at about T tokens (the 'decoding' rows",
        "of the table below); x fp: ratio to DynamicCache.",
    ])


def bytes_caption() -> str:
    return " ".join([
        "KV bytes per token from real cache objects filled with random keys and values (batch 1, the model's KV",
        "heads, head_dim and layers, in the given dtype), counting every tensor each cache holds.",
        "prefill: one T-token update per layer, divided by T; the peer quantizes a whole prefill, so this is its",
        f"smallest state. decoding: a (T - {DECODE_STEPS})-token prefill, then {DECODE_STEPS} single-token updates,",
        "the mean over those steps of bytes / tokens held; the peer's full-precision window (up to 127 tokens)",
        f"fills and empties once in any {DECODE_STEPS} steps. Ours keeps the tokens older than its 128-token window",
        "packed (keys in whole 32-token groups); its storage depends only on how many tokens it holds.",
    ])


def markdown(result: dict, args) -> str:
    byte_cols = [c for t in args.byte_lengths for c in (f"B/tok {t}", f"x fp {t}")]
    return "\n".join([
        ppl_caption(result, args), "",
        format_table(result["perplexity"], ["model", "kv cache", "windows", "ppl", *byte_cols]), "",
        bytes_caption(), "",
        format_table(result["bytes"], ["cache", "dtype", "state", *byte_cols]),
    ])


def evaluate_extra(name: str, path: str, windows: Subset, lengths: list[int]) -> list[dict]:
    """Rows for an extra model: full precision and ours kivi2, with bytes for its own shape and dtype."""
    model = load_model(path).eval()
    caches = ("fp", "kivi2")
    by_cache = {r["name"]: r for r in bytes_rows(model.config, lengths, [model.dtype], caches) if r["state"] == "decoding"}
    return [ppl_row(name, c, evaluate(model, windows, c, f"{name} / {c}"), by_cache, lengths) for c in caches]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    tokens = token_stream(None, "val", load_tokenizer(args.tokenizer))
    dataset = PackedDataset(tokens, args.seq_len)
    windows = Subset(dataset, range(min(len(dataset), args.max_windows or len(dataset))))
    base = load_model(args.base).eval()
    check_ids = tokens[: args.check_len].long()[None]
    parity = {spec: check_parity(base, check_ids, spec) for spec in OURS}
    byte_rows = bytes_rows(base.config, args.byte_lengths, [torch.float32, torch.bfloat16])
    model_dtype = str(base.dtype).removeprefix("torch.")
    by_cache = {r["name"]: r for r in byte_rows if r["dtype"] == model_dtype and r["state"] == "decoding"}
    rows = [ppl_row(args.base, c, evaluate(base, windows, c, f"{args.base} / {c}"), by_cache, args.byte_lengths)
            for c in CACHES]
    for name, path in args.extra.items():
        rows += evaluate_extra(name, path, windows, args.byte_lengths)
    result = {"args": vars(args), "windows": len(windows), "model_dtype": model_dtype,
              "env": {"torch": torch.__version__, "transformers": version("transformers"), "hqq": version("hqq"),
                      "threads": torch.get_num_threads()},
              "parity_max_abs_diff": parity, "perplexity": rows, "bytes": byte_rows}
    save_outputs(args.out, "kv_quality_smoke" if args.smoke else "kv_quality", result, markdown(result, args))


if __name__ == "__main__":
    main()
