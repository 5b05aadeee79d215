"""How much does a compressed KV cache cost in time? Training steps and greedy decoding on CPU.

1. Training: one step (forward + backward + AdamW) on a `batch x seq_len` batch (4 x 1024 by default,
   the QAT recipe's shape), plain vs with a KV spec attached (the fake-quant view QAT trains against),
   each with and without distillation from a frozen full-precision copy (the QAT recipe distills with
   weight 1, as CausalLMModule(distill_weight=1) does). Variants alternate after warmup, in a rotating
   order, on one model and one optimizer; reported are medians and the ratios to the plain step.
2. Decoding: greedy decoding of `new_tokens` after a `prompt`-token prefill, with our
   QuantizedKVCache (kivi2, kivi4) on the attached model, transformers' DynamicCache and its
   QuantizedCache (HQQ backend, 2 and 4 bits, at the grouping axes bench/kv_quality.py found best) on
   the plain model, alternating per repetition. Reported are decode tokens/s (the `new_tokens - 1`
   single-token steps after the prefill), the prefill time, the ratios ours / others, and each
   cache's real bytes at the end of decoding.

    python bench/kv_speed.py --smoke          # seconds
    python bench/kv_speed.py                  # 4 x 1024 training, 256 + 512 decoding (~15 min on 1 core)
    python bench/kv_speed.py --profile        # also cProfile our decode loop (top functions to a file)

Timings on a shared machine are noisy: compare the ratios, which come from interleaved runs.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path
from time import perf_counter

import torch
from tqdm.auto import tqdm

from bench_utils import cache_nbytes, is_ours, environment, format_table, label, make_cache, prepared, save_outputs, set_threads
from kvtrain import attached
from kvtrain.loss import distillation_kl, next_token_nll
from kvtrain.data.lm import token_stream
from kvtrain.models import load_model, load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvtrain-ref",
                   help="decoding model (name or folder); training uses its config at random init")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 avoids oversubscribing shared cores)")
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--train_seq", type=int, default=1024)
    p.add_argument("--train_variants", nargs="+", default=["plain", "kivi2", "plain+distill", "kivi2+distill"],
                   help="plain or a KV preset, optionally +distill")
    p.add_argument("--train_warmup", type=int, default=2)
    p.add_argument("--train_reps", type=int, default=7)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=512)
    p.add_argument("--decode_batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--caches", nargs="+", default=["fp", "kivi2", "kivi4", "hqq2", "hqq4"],
                   help="fp, kivi2, kivi4, hqq2 / hqq4 (the peer at its best axes) or e.g. hqq2-k0v1")
    p.add_argument("--decode_reps", type=int, default=5, help="recorded rounds (after one warmup round)")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_decode", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile one kivi2 decode run")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: seconds")
    args = p.parse_args(argv)
    for name in args.caches:
        label(name)  # an unknown cache name is an error here, not after the training benchmark
    if "plain" not in args.train_variants:
        p.error("--train_variants must include plain (the ratios are to it)")
    if args.smoke:
        args.train_batch, args.train_seq, args.train_warmup, args.train_reps = 1, 192, 1, 2
        args.prompt, args.new_tokens, args.decode_batches, args.decode_reps = 64, 128, [1], 1
    return args


def rotated(items: list[str], k: int) -> list[str]:
    """items starting at position k (mod len): each variant takes every slot of the order in turn."""
    k %= len(items)
    return items[k:] + items[:k]


def windows(tokens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(batch, length) consecutive windows from the start of the token stream."""
    need = batch * length
    if tokens.numel() < need:
        raise ValueError(f"the val split has {tokens.numel()} tokens, fewer than {batch} x {length}")
    return tokens[:need].long().view(batch, length)


# ---------------------------------------------------------------- training


def train_step(model, optimizer, ids: torch.Tensor, teacher=None) -> float:
    """CausalLMModule's training step: mean next-token NLL, plus the distillation KL to `teacher`
    (weight 1) when given; backward and AdamW."""
    start = perf_counter()
    logits = model(input_ids=ids, use_cache=False).logits
    nll, n = next_token_nll(logits, ids)
    loss = nll / n
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        loss = loss + distillation_kl(logits, teacher_logits)[0] / n
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return perf_counter() - start


def timed_step(model, optimizer, ids: torch.Tensor, variant: str, teacher) -> float:
    spec, _, distill = variant.partition("+")
    teacher = teacher if distill else None
    if spec == "plain":
        return train_step(model, optimizer, ids, teacher)
    with attached(model, spec):
        return train_step(model, optimizer, ids, teacher)


def bench_training(args, tokens: torch.Tensor) -> dict:
    model = load_model(args.model, init="random").train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the full-precision start, as in QAT
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = windows(tokens, args.train_batch, args.train_seq)
    variants = list(args.train_variants)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in tqdm(range(args.train_warmup + args.train_reps), desc="train steps", file=sys.stderr):
        for v in rotated(variants, rep):
            seconds = timed_step(model, optimizer, ids, v, teacher)
            if rep >= args.train_warmup:
                times[v].append(seconds)
    medians = {v: statistics.median(t) for v, t in times.items()}
    rows = [{"variant": v, "median s/step": medians[v], "min s/step": min(times[v]),
             "ratio vs plain": medians[v] / medians["plain"]} for v in variants]
    ratios = {f"{v}/plain": medians[v] / medians["plain"] for v in variants if v != "plain"}
    for spec in {v.split("+")[0] for v in variants} - {"plain"}:
        if f"{spec}+distill" in medians and "plain+distill" in medians:
            ratios[f"{spec}+distill/plain+distill"] = medians[f"{spec}+distill"] / medians["plain+distill"]
    return {"batch": args.train_batch, "seq_len": args.train_seq, "times": times, "rows": rows, "ratios": ratios}


# ---------------------------------------------------------------- decoding


@torch.inference_mode()
def greedy(model, cache, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, generated ids): a prefill, then new_tokens - 1 single steps."""
    start = perf_counter()
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    prefilled = perf_counter()
    out = [token]
    for _ in range(new_tokens - 1):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return prefilled - start, perf_counter() - prefilled, torch.cat(out, dim=1)


def decode_once(model, name: str, prompt: torch.Tensor, new_tokens: int) -> dict:
    cache = make_cache(name, model.config)
    with prepared(model, name):
        prefill_s, decode_s, ids = greedy(model, cache, prompt, new_tokens)
    held = prompt.shape[0] * cache.get_seq_length()  # the last generated token is never fed back
    return {"prefill_s": prefill_s, "decode_s": decode_s, "ids": ids, "nbytes": cache_nbytes(cache), "tokens": held}


def bench_decode_batch(model, args, tokens: torch.Tensor, batch: int) -> dict:
    """Interleaved repetitions of every cache at one batch size; the first round is warmup."""
    prompt = windows(tokens, batch, args.prompt)
    runs: dict[str, list[dict]] = {name: [] for name in args.caches}
    for rep in tqdm(range(1 + args.decode_reps), desc=f"decode batch {batch}", file=sys.stderr):
        for name in rotated(list(args.caches), rep):
            run = decode_once(model, name, prompt, args.new_tokens)
            if rep > 0:
                runs[name].append(run)
    reference = runs["fp"][-1]["ids"] if "fp" in runs else None
    rows = [summary_row(name, rs, batch, args.new_tokens, reference) for name, rs in runs.items()]
    return {"batch": batch, "rows": rows, "ratios": decode_ratios(runs), "ratios_by": "round",
            "decode_s": {n: [r["decode_s"] for r in rs] for n, rs in runs.items()}}


def summary_row(name: str, runs: list[dict], batch: int, new_tokens: int, reference: torch.Tensor | None) -> dict:
    """Median speeds over the repetitions; bytes and agreement from the last one."""
    last = runs[-1]
    row = {"batch": batch, "cache": name, "label": label(name),
           "decode tok/s": batch * (new_tokens - 1) / statistics.median(r["decode_s"] for r in runs),
           "prefill ms": 1000 * statistics.median(r["prefill_s"] for r in runs),
           "KV bytes": last["nbytes"], "KV bytes/token": last["nbytes"] / last["tokens"]}
    if reference is not None:
        row["tokens = fp"] = agreed_prefix(last["ids"], reference)
    return row


def agreed_prefix(ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over the batch of how many leading generated tokens equal the reference's."""
    return float((ids == reference).int().cumprod(dim=1).sum(dim=1).float().mean())


def decode_ratios(runs: dict[str, list[dict]]) -> dict[str, float]:
    """tokens/s of each of our caches over each other cache's (> 1: ours is faster): the median over
    the rounds of the ratio within a round, whose caches ran back to back (a slow minute of a shared
    machine then slows both sides of a ratio, not one cache's median)."""
    return {f"{ours}/{other}": statistics.median(o["decode_s"] / u["decode_s"] for o, u in zip(runs[other], runs[ours]))
            for ours in runs if is_ours(ours) for other in runs if not is_ours(other)}


def bench_decoding(model, args, tokens: torch.Tensor) -> dict:
    results = [bench_decode_batch(model, args, tokens, b) for b in args.decode_batches]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"prompt": args.prompt, "new_tokens": args.new_tokens, "dtype": dtype, "by_batch": results}


# ---------------------------------------------------------------- profile


def profile_decode(model, args, tokens: torch.Tensor, path: Path, top: int = 30) -> list[dict]:
    """cProfile one kivi2 decode at batch 1; write the top functions by cumulative time to `path`."""
    prompt = windows(tokens, 1, args.prompt)
    profiler = cProfile.Profile()
    profiler.enable()
    decode_once(model, "kivi2", prompt, args.new_tokens)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
    stats.print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    total = stats.total_tt
    rows = [{"function": f"kvtrain/{f.split('/kvtrain/')[-1]}:{line}({fn})", "cumulative s": ct, "share": ct / total}
            for (f, line, fn), (_, _, _, ct, _) in stats.stats.items() if "/kvtrain/" in f]
    return sorted(rows, key=lambda r: -r["cumulative s"])[:12]


# ---------------------------------------------------------------- report


def training_markdown(t: dict, model: str, threads: int) -> list[str]:
    caption = (f"Training step (forward + backward + AdamW) of {model}'s config at random init, batch {t['batch']} x "
               f"{t['seq_len']} tokens, CPU, {threads} thread(s); +distill adds the KL to a frozen full-precision "
               f"copy (weight 1, as the QAT recipe); variants interleaved, medians:")
    ratios = "; ".join(f"{k} {v:.3g}" for k, v in t["ratios"].items())
    return [caption, "", format_table(t["rows"], ["variant", "median s/step", "min s/step", "ratio vs plain"]), "",
            f"step-time ratios: {ratios}", ""]


def decoding_markdown(d: dict, model: str, threads: int) -> list[str]:
    caption = (f"Greedy decoding with {model} ({d['dtype']}), {d['prompt']}-token prompt + {d['new_tokens']} new "
               f"tokens, CPU, {threads} thread(s); caches interleaved; decode tok/s: median over the repetitions of "
               f"the {d['new_tokens'] - 1} single-token steps after the prefill; KV bytes: every tensor each cache "
               f"holds at the end; tokens = fp: leading generated tokens identical to DynamicCache's (batch mean):")
    cols = ["batch", "label", "decode tok/s", "prefill ms", "KV bytes", "KV bytes/token", "tokens = fp"]
    rows = [r for b in d["by_batch"] for r in b["rows"]]
    ratios = "; ".join(f"batch {b['batch']}: " + ", ".join(f"{k} {v:.3g}" for k, v in b["ratios"].items())
                       for b in d["by_batch"])
    ratio_line = f"tokens/s ratios (ours / other, > 1 = ours faster; median over rounds of the ratio within a round): {ratios}"
    return [caption, "", format_table(rows, cols), "", ratio_line, ""]


def markdown(result: dict) -> str:
    model, threads = result["args"]["model"], result["env"]["threads"]
    parts = []
    if "training" in result:
        parts += training_markdown(result["training"], model, threads)
    if "decoding" in result:
        parts += decoding_markdown(result["decoding"], model, threads)
    if "profile" in result:
        parts += ["kvtrain functions in a profiled kivi2 decode at batch 1 (cumulative time, share of the run):", "",
                  format_table(result["profile"], ["function", "cumulative s", "share"]), ""]
    return "\n".join(parts).rstrip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    tokens = token_stream(None, "val", load_tokenizer(args.model))
    result: dict = {"args": vars(args), "env": {**environment(), "smoke": args.smoke}}
    if not args.skip_train:
        result["training"] = bench_training(args, tokens)
    stem = "kv_speed_smoke" if args.smoke else "kv_speed"
    if not args.skip_decode:
        model = load_model(args.model).eval()
        result["decoding"] = bench_decoding(model, args, tokens)
        if args.profile:
            result["profile"] = profile_decode(model, args, tokens, Path(args.out) / f"{stem}_profile.txt")
    save_outputs(args.out, stem, result, markdown(result))


if __name__ == "__main__":
    main()
