"""Perplexity and KV bytes per token under each cache: full precision, the HQQ peer, ours.

Perplexity, the way a user generates: each window of the embedded val split (`seq_len` tokens, the
first `max_windows`) is a prompt of `prefill` tokens followed by decoding; the score is the next-token
loss over the decoded part (the tokens after the prompt), the same predictions for every cache:

- full precision: a plain forward (what DynamicCache hands attention is K/V unchanged);
- ours (kivi2, kivi4): one forward with the spec attached, which equals prefilling and decoding with
  QuantizedKVCache(spec) (train/decode parity). This script checks that claim itself first: on one
  window, in float64, it prefills and decodes token by token with our cache and asserts max |logit diff| < 1e-6;
- the peer (transformers' QuantizedCache, HQQ backend, 2 and 4 bits, group 32, window 128) in every
  axis combination transformers documents for HQQ (axis_key, axis_value in {0, 1}): the prompt is
  prefilled into the cache, then the rest decoded one token at a time. The best axes per bit width
  are recorded (`best_peer_axes`) and are what kv_speed.py and the README compare against;
- each `--model NAME=PATH` (a save_pretrained folder, e.g. a QAT run's export): full precision and kivi2.

KV bytes per token, in the deployment dtype (`--bytes_dtype`, bfloat16 by default) against a
DynamicCache in the same dtype, at T in `--byte_lengths` (1k, 4k, 32k): real cache objects for the
model's shape (batch 1, its layers, KV heads and head_dim) filled with random K/V, counting every
tensor each holds. Two states: decoding (a (T - 128)-token prefill, then 128 single-token steps; the
mean over those steps of bytes / tokens held, the state a user meets while generating) and prefill
(one T-token update, the peer's smallest state).

    python bench/kv_quality.py --smoke
    python bench/kv_quality.py                                  # 12 val windows (~25 min on 1 core)
    python bench/kv_quality.py --model qat_kivi2=runs/qat_kivi2/model --model control=runs/qat_control/model
    python bench/kv_quality.py --base smollm2-135m --max_windows 3 --out bench/results/smollm2 \
        --model qat-seed1=bench/results/smollm2/qat_recovery/qat-seed1/model    # the SmolLM2 rows
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import types

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from bench_utils import (OURS, PEER_AXES, cache_nbytes, environment, fill_random, format_table, is_peer, label,
                         make_cache, peer_name, prepared, save_outputs, set_threads)
from kvtrain import QuantizedKVCache, attached
from kvtrain.data.lm import PackedDataset, token_stream
from kvtrain.loss import next_token_nll
from kvtrain.models import load_model, load_tokenizer

PARITY_TOL = 1e-6
DECODE_STEPS = 128  # one full-precision window of single-token steps: the peer flushes once in any 128
STATES = ("decoding", "prefill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_len", type=int, default=1024, help="window length (default: the model's context)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of each window; the rest is decoded")
    p.add_argument("--max_windows", type=int, default=None, help="evaluate the first N val windows (default: all)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="an extra model to evaluate under full precision and kivi2 (repeatable)")
    p.add_argument("--base", default="kvtrain-ref", help="the model every cache is compared on")
    p.add_argument("--tokenizer", default=None, help="default: the base model's")
    p.add_argument("--ours", nargs="+", default=list(OURS),
                   help="our caches: kvtrain presets (kivi2, kivi4, int8, int8_per_token_head, fp8_per_token_head, "
                        "int4_per_token_head) or spec JSON files")
    p.add_argument("--peer_bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--peer_axes", nargs="+", default=[f"{k}{v}" for k, v in PEER_AXES], choices=[f"{k}{v}" for k, v in PEER_AXES],
                   help="the peer's (axis_key, axis_value) pairs to score, as 2 digits (default: all four)")
    p.add_argument("--byte_lengths", type=int, nargs="+", default=[1024, 4096, 32768])
    p.add_argument("--bytes_dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="2 windows of 256 tokens, bytes at 256 and 512: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.prefill, args.max_windows, args.byte_lengths = 256, 160, 2, [256, 512]
    if min(args.byte_lengths) <= DECODE_STEPS:
        p.error(f"--byte_lengths must exceed {DECODE_STEPS} (the decoding state ends with {DECODE_STEPS} single steps)")
    if not 0 < args.prefill < args.seq_len:
        p.error(f"--prefill must be in 1..{args.seq_len - 1} (tokens of the prompt), got {args.prefill}")
    args.extra = dict(parse_named(m) for m in args.model)
    args.tokenizer = args.tokenizer or args.base
    return args


def parse_named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--model takes NAME=PATH, got {spec!r}")
    return name, path


# ---------------------------------------------------------------- generating: prefill, then decode


@torch.inference_mode()
def generation_logits(model, ids: torch.Tensor, cache, prefill: int) -> torch.Tensor:
    """Logits (1, T, vocab) of prefilling ids[:, :prefill] into `cache`, then feeding the rest one token at a time."""
    steps = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    steps += [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
              for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


def float64_copy(model):
    """The model in float64 throughout. transformers' LlamaRMSNorm computes in float32 whatever the
    model's dtype, and a float32 row sum differs between one forward and a one-token step in its last
    bits: at 2 bits a K/V element on a rounding boundary then flips a code, and the flips grow over the
    layers (SmolLM2 at 4096 tokens: 0.82 in the logits with float32 norms, 2.5e-13 without)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    exact = copy.deepcopy(model).double()
    for module in exact.modules():
        if type(module) is LlamaRMSNorm:
            module.forward = types.MethodType(norm, module)
    return exact


@torch.inference_mode()
def check_parity(model, ids: torch.Tensor, spec: str, prefill: int) -> float:
    """Max |logit difference| between the attached forward and prefill + token-by-token QuantizedKVCache
    decoding, in float64 (`float64_copy`): in float32 the sums run in another order in one forward than
    in decoding, and at 2 bits a value on a rounding boundary then flips a code."""
    exact = float64_copy(model)
    with attached(exact, spec):
        one_forward = exact(input_ids=ids, use_cache=False).logits
        generated = generation_logits(exact, ids, QuantizedKVCache(spec), prefill)
    diff = float((one_forward - generated).abs().max())
    assert diff < PARITY_TOL, f"{spec}: attached forward and cache decoding differ by {diff:.3g} (> {PARITY_TOL})"
    return diff


# ---------------------------------------------------------------- perplexity of the decoded part


def continuation_nll(logits: torch.Tensor, ids: torch.Tensor, prefill: int) -> tuple[float, int]:
    """Summed NLL of the tokens after the prompt (predicted from positions prefill - 1 ... T - 2)."""
    nll, n = next_token_nll(logits[:, prefill - 1:], ids[:, prefill - 1:])
    return nll.item(), int(n)


def evaluate(model, windows: Subset, cache_name: str, prefill: int, desc: str) -> dict:
    nll_sum, tokens = 0.0, 0
    for item in tqdm(windows, desc=desc, unit="window", file=sys.stderr):
        ids = item["input_ids"][None]
        if is_peer(cache_name):
            logits = generation_logits(model, ids, make_cache(cache_name, model.config), prefill)
        else:
            with prepared(model, cache_name), torch.inference_mode():  # ours: one forward = prefill + decoding
                logits = model(input_ids=ids, use_cache=False).logits
        nll, n = continuation_nll(logits, ids, prefill)
        nll_sum, tokens = nll_sum + nll, tokens + n
    loss = nll_sum / tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens, "windows": len(windows)}


# ---------------------------------------------------------------- bytes


def bytes_per_token(model, cache_name: str, tokens: int, dtype: torch.dtype, state: str) -> float:
    """KV bytes / tokens held. prefill: after one T-token update. decoding: prefill T - 128 tokens, then
    128 single-token updates; the mean over those steps of bytes / tokens held (the peer's full-precision
    window fills and empties once in any 128 steps, so this averages over its cycle)."""
    config = model.config
    with prepared(model, cache_name):
        cache = make_cache(cache_name, config, model)
    if state == "prefill":
        return cache_nbytes(fill_random(cache, config, tokens, dtype)) / tokens
    fill_random(cache, config, tokens - DECODE_STEPS, dtype)
    per_token = []
    for step in range(DECODE_STEPS):
        fill_random(cache, config, 1, dtype, seed=step + 1)
        per_token.append(cache_nbytes(cache) / (tokens - DECODE_STEPS + step + 1))
    return sum(per_token) / len(per_token)


def bytes_rows(model, lengths: list[int], dtype: torch.dtype, caches: list[str]) -> list[dict]:
    full = {t: bytes_per_token(model, "fp", t, dtype, "prefill") for t in lengths}
    rows = []
    for state in STATES:
        for name in caches:
            row = {"cache": label(name), "name": name, "dtype": str(dtype).removeprefix("torch."), "state": state}
            for t in tqdm(lengths, desc=f"bytes {name} {state}", leave=False, file=sys.stderr):
                row[f"B/tok {t}"] = bytes_per_token(model, name, t, dtype, state)
                row[f"x fp {t}"] = row[f"B/tok {t}"] / full[t]
            rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def best_axes(rows: list[dict], bits: list[int]) -> dict[str, list[int]]:
    """The peer's axes with the lowest perplexity, per bit width."""
    best = {}
    for b in bits:
        candidates = [r for r in rows if r["name"].startswith(f"hqq{b}-")]
        winner = min(candidates, key=lambda r: r["ppl"])["name"]
        best[str(b)] = [int(winner[-3]), int(winner[-1])]
    return best


def markdown(result: dict, args) -> str:
    parity = ", ".join(f"{s}: {d:.2g}" for s, d in result["parity_max_abs_diff"].items())
    env = result["env"]
    ppl_caption = " ".join([
        f"{args.base}: perplexity on the val split of the embedded corpus (Python {env['python']}'s standard library),",
        f"{result['windows']} window(s) of {args.seq_len} tokens: a {args.prefill}-token prompt, then decoding;",
        f"the loss is over the {args.seq_len - args.prefill} tokens after the prompt, {result['model_dtype']}.",
        "Full precision: a plain forward. Ours: one forward with the spec attached; this run checked on a window, in float64,",
        f"that it equals prefilling and decoding token by token with QuantizedKVCache (max |logit diff| {parity};",
        f"asserted < {PARITY_TOL}). Peer: transformers {env['transformers']} QuantizedCache, backend hqq {env['hqq']},",
        "q_group_size 32, residual_length 128, in each documented axis combination, prompt prefilled then decoded",
        "(after the prefill it holds up to 127 tokens in full precision, then dequantizes, appends and",
        f"re-quantizes the whole cache). Best peer axes: {result['best_peer_axes']}.",
    ])
    byte_cols = [c for t in args.byte_lengths for c in (f"B/tok {t}", f"x fp {t}")]
    bytes_caption = " ".join([
        f"KV bytes per token in {args.bytes_dtype} (the deployment dtype) for {args.base}'s shape {result['shape']}, from real cache",
        "objects filled with random keys and values, counting every tensor each cache holds; x fp: ratio to a",
        f"{args.bytes_dtype} DynamicCache. decoding: a (T - {DECODE_STEPS})-token prefill, then {DECODE_STEPS}",
        "single-token steps, the mean over those steps of bytes / tokens held (the peer's full-precision window",
        f"fills and empties once in any {DECODE_STEPS} steps); prefill: right after one T-token update, the peer's",
        "smallest state. Ours (kivi presets) stores scales and zero points in fp16 and keeps the newest 128 tokens",
        "(plus keys waiting for a whole 32-token group) in the model's dtype; the *_per_token_head formats store a",
        "float32 scale per token and head and compress every token on arrival, as vLLM does; our storage depends",
        "only on the tokens held.",
    ])
    return "\n".join([
        ppl_caption, "", format_table(result["perplexity"], ["model", "kv cache", "windows", "tokens", "ppl"]), "",
        bytes_caption, "", format_table(result["bytes"], ["cache", "state", *byte_cols]),
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    tokens = token_stream(None, "val", load_tokenizer(args.tokenizer))
    dataset = PackedDataset(tokens, args.seq_len)
    windows = Subset(dataset, range(min(len(dataset), args.max_windows or len(dataset))))
    base = load_model(args.base).eval()
    check_ids = windows[0]["input_ids"][None]
    parity = {spec: check_parity(base, check_ids, spec, args.prefill) for spec in args.ours}
    peers = [peer_name(b, (int(axes[0]), int(axes[1]))) for b in args.peer_bits for axes in args.peer_axes]
    rows = [{"model": args.base, "name": c, "kv cache": label(c),
             **evaluate(base, windows, c, args.prefill, f"{args.base} / {c}")} for c in ["fp", *args.ours, *peers]]
    best = best_axes(rows, args.peer_bits)
    for name, path in args.extra.items():
        model = load_model(path).eval()
        rows += [{"model": name, "name": c, "kv cache": label(c), **evaluate(model, windows, c, args.prefill, f"{name} / {c}")}
                 for c in ("fp", "kivi2")]
    best_peers = [peer_name(b, tuple(best[str(b)])) for b in args.peer_bits]
    byte_rows = bytes_rows(base, args.byte_lengths, getattr(torch, args.bytes_dtype), ["fp", *args.ours, *best_peers])
    config = base.config
    shape = {"layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads,
             "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}
    result = {"args": vars(args), "shape": shape, "windows": len(windows), "model_dtype": str(base.dtype).removeprefix("torch."),
              "env": environment({"base": args.base}), "parity_max_abs_diff": parity, "best_peer_axes": best, "perplexity": rows,
              "bytes": byte_rows}
    save_outputs(args.out, "kv_quality_smoke" if args.smoke else "kv_quality", result, markdown(result, args))


if __name__ == "__main__":
    main()
