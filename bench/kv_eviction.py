"""Retrieval under token eviction, training-free and trained against (issue 14).

kvtrain-ref is fine-tuned on the embedded recall task with its full cache (the base, `--base_steps`),
then its held-out accuracy (greedy exact match of the answer, read from one teacher-forced forward of
the view, which equals decoding with the evicting cache) is measured under each selector keeping
50%, 25% and 12.5% of the prompt, decided once at the end of the prompt (SnapKV's schedule, 4 sinks)
and every 16 tokens (the decode-time schedule, decided before the question is read), next to the full
cache; SnapKV and H2O also merging what they evict into the nearest survivors (EMS-style). Bytes are
measured from the cache after decoding prompt and answer (`QuantizedKVCache.nbytes()`, in bf16, the
deployment dtype) against a DynamicCache. MiKV (the evicted kept at 2 bits) is measured at the bytes
of dropping them, next to eviction over quantized K/V and KIVI alone; the pretrained kvtrain-ref's
perplexity over long windows under each selector, and a merge-threshold sweep, complete the report.
`--train NAME:SEED` then fine-tunes the base further for `--steps`, against eviction (NAME a selector,
a percent and an interval, e.g. snapkv25@16) or with the full cache (control), and measures it both
ways (the control under `--control_under`); the summary gives each trained point's mean and spread
over its seeds.

    python bench/kv_eviction.py                          # base + training-free table
    python bench/kv_eviction.py --train snapkv25+st:0 --train control:0 ...
    python bench/kv_eviction.py --summarize              # the table and plot from every trained run
    python bench/kv_eviction.py --perplexity             # (re)measure perplexity, merge sweep, quantized K/V
    python bench/kv_eviction.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
from pathlib import Path

import lightning as L
import torch

from bench_utils import environment
from readme_tables import check_same_builds
from kvtrain.callbacks import KVQuantCallback
from kvtrain.data.lm import PackedDataset, token_stream
from kvtrain.data.tasks import TaskDataModule
from kvtrain.eval import cache_nbytes, completion_match, format_table, write_json
from kvtrain.kv import KVSpec, QuantizedKVCache, attach, attached, detach
from kvtrain.loss import next_token_nll
from kvtrain.models import load_model, load_tokenizer
from kvtrain.modules import CausalLMModule

SELECTORS = ("streaming_llm", "snapkv", "h2o", "tova")
LEARNED = ("dms",)  # selectors that learn their scores: trained points only (untrained, their logits are random)
MERGED = ("snapkv", "h2o")  # also with the evicted merged into their nearest survivors (EMS, D2O)
FRACTIONS = (0.5, 0.25, 0.125)
INTERVALS = (0, 16)  # once at the end of the prompt (SnapKV's schedule), or every 16 tokens (decode-time)
SINKS = 4


# MiKV: the tokens a selector evicts kept at 2 bits per token (groups of 32 channels, fp16 scale and
# zero point: 12 of a bf16 head's 64 bytes), as is or after a random Hadamard rotation of each head
RETAIN = {"int2": dict(bits=2, granularity="per_token(32)"),
          "int2+hadamard": dict(bits=2, granularity="per_token(32)", rotation="random_hadamard")}
# quantizers alone at the same bytes, for reference: KIVI's per-channel keys and per-token values, every
# token quantized (residual 0)
# eviction over K/V quantized as each token arrives: fewer tokens and fewer bits (name: selector, kept, bits,
# what the evicted become); the last is MiKV whole: the important quarter at 4 bits, the rest at 2
COMPOSED = {"snapkv 50% at 4 bits": ("snapkv", 0.5, 4, None), "snapkv 50% at 2 bits": ("snapkv", 0.5, 2, None),
            "snapkv 25% at 4 bits": ("snapkv", 0.25, 4, None),
            "h2o 25% at 4 bits, the rest at 2 (MiKV)": ("h2o", 0.25, 4, "int2")}
QUANTIZERS = {f"kivi{b}": KVSpec(key=dict(bits=b, granularity="per_channel(32)"),
                                 value=dict(bits=b, granularity="per_token(32)"), residual=0) for b in (2, 3)}


def eviction_spec(selector: str, fraction: float, interval: int, straight_through: float = 0.0,
                  retain: str | None = None, merge_above: float = -1.0, bits: int | None = None) -> KVSpec:
    """`selector` a registered one, or "<selector> + merge" (the evicted merged into the survivors);
    `bits`: K and V quantized as each token arrives (per-token groups of 32 channels)."""
    selector, merge = selector.removesuffix(" + merge"), selector.endswith(" + merge")
    # SnapKV observes its paper's 32 queries, or all those since the last decision if fewer
    options = {"window": min(32, interval or 32), "kernel": 5} if selector == "snapkv" else {}
    quantized = None if bits is None else dict(bits=bits, granularity="per_token(32)")
    eviction = dict(selector=selector, budget=fraction, interval=interval, sinks=SINKS, options=options,
                    straight_through=straight_through, retain=RETAIN.get(retain), merge=merge, merge_above=merge_above)
    return KVSpec(key=quantized, value=quantized, residual=0, eviction=eviction)


def parse_point(name: str) -> KVSpec | None:
    """"control" (the full cache) or a selector, the percent it keeps, the interval and whether the
    selection trains straight through: snapkv25 (at the end of the prompt), snapkv25@16 (every 16
    tokens), snapkv25+st (temperature 1). The cache a point decodes with is the same either way."""
    if name == "control":
        return None
    body, st, rest = name.partition("+st")
    kept, _, interval = body.partition("@")
    selector = kept.rstrip("0123456789")
    if selector not in SELECTORS + LEARNED or selector == kept or not (interval or "0").isdigit() or rest:
        raise ValueError(f"unknown point {name!r}: control, or one of {SELECTORS + LEARNED}, a percent, @interval "
                         f"and +st (snapkv25, snapkv25@16, snapkv25+st, dms25+st)")
    return eviction_spec(selector, int(kept[len(selector):]) / 100, int(interval or 0), 1.0 if st else 0.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32, help="lines per recall prompt")
    p.add_argument("--needle", action=argparse.BooleanOptionalAction, default=True,
                   help="always ask the same name (a needle in a haystack)")
    p.add_argument("--base_steps", type=int, default=1200)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of a trained point")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--val_size", type=int, default=256)
    p.add_argument("--train", action="append", default=[], metavar="NAME:SEED")
    p.add_argument("--control_under", default="snapkv25,snapkv25@16,h2o25,tova25,streaming_llm25",
                   help="the evictions a control run is measured under (comma-separated points)")
    p.add_argument("--summarize", action="store_true", help="refresh the trained rows and the plot, train nothing")
    p.add_argument("--perplexity", action="store_true",
                   help="(re)measure the perplexity rows, the merge threshold sweep and eviction over "
                        "quantized K/V into the results")
    p.add_argument("--ppl_windows", type=int, default=32, help="val windows of the perplexity rows")
    p.add_argument("--ppl_len", type=int, default=256, help="tokens per perplexity window (kvtrain-ref's context)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="bench/results/eviction")
    return p.parse_args(argv)


def task(args: argparse.Namespace, seed: int) -> TaskDataModule:
    return TaskDataModule(task="recall", format="sft", pairs=args.pairs, needle=args.needle, train_size=50_000,
                          val_size=args.val_size, batch_size=args.batch_size, eval_batch_size=64, seed=seed,
                          tokenizer="kvtrain-ref", max_len=4 * args.pairs + 8)


def finetune(model: str, spec: KVSpec | None, steps: int, seed: int, args: argparse.Namespace) -> torch.nn.Module:
    """`model` fine-tuned on recall prompts for `steps`, against `spec`'s eviction (None: the full cache)."""
    L.seed_everything(seed)
    module = CausalLMModule(model, lr=args.lr, warmup_steps=min(50, steps // 10), weight_decay=0.0)
    callbacks = [] if spec is None else [KVQuantCallback(spec)]
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, callbacks=callbacks,
                        gradient_clip_val=1.0)
    trainer.fit(module, datamodule=task(args, seed))
    return module.model.eval()


def accuracy(model: torch.nn.Module, spec: KVSpec | None, args: argparse.Namespace) -> float:
    data = task(args, seed=0)  # the held-out prompts, the same for every row
    if spec is not None:
        attach(model, spec)
    try:
        desc = "full cache" if spec is None else spec.eviction.selector if spec.eviction else "quantized"
        return completion_match(model, data.val_dataloader(), desc=desc)["accuracy"]
    finally:
        detach(model)


def measured_bytes(model: torch.nn.Module, spec: KVSpec | None, args: argparse.Namespace, prompts: int = 4) -> float:
    """Mean cache bytes after decoding a held-out prompt (one forward) and its answer (token by token),
    in the deployment dtype (bfloat16; the accuracy is measured in the fp32 the model trained in)."""
    data, total = task(args, seed=0), 0
    batch = next(iter(data.val_dataloader()))
    model = copy.deepcopy(model).to(torch.bfloat16)
    if spec is not None:
        attach(model, spec)
    for row in range(prompts):
        ids = batch["input_ids"][row, : int(batch["attention_mask"][row].sum())][None]
        prompt = int(batch["loss_mask"][row].int().argmax())
        cache = QuantizedKVCache(spec) if spec is not None else None
        with torch.no_grad():
            out = model(ids[:, :prompt], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            for t in range(prompt, ids.shape[1]):
                cache = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).past_key_values
        total += cache.nbytes() if spec is not None else cache_nbytes(cache)
    detach(model)
    return total / prompts


def base_model(args: argparse.Namespace, out: Path) -> str:
    """The full-cache fine-tune every row starts from (saved once under `out`)."""
    folder = out / "base"
    if not (folder / "config.json").is_file():
        model = finetune("kvtrain-ref", None, args.base_steps, 0, args)
        model.save_pretrained(folder)
        load_tokenizer("kvtrain-ref").save_pretrained(str(folder))
    return str(folder)


def training_free(args: argparse.Namespace, base: str) -> list[dict]:
    model = load_model(base).eval()
    full_bytes = measured_bytes(model, None, args)
    rows = [{"selector": "full cache", "interval": "-", "kept": 1.0, "accuracy": accuracy(model, None, args),
             "bytes": full_bytes, "bytes_ratio": 1.0}]
    for interval in INTERVALS:
        for selector in (*SELECTORS, *(f"{name} + merge" for name in MERGED)):
            for fraction in FRACTIONS:
                spec = eviction_spec(selector, fraction, interval)
                held = measured_bytes(model, spec, args)
                rows.append({"selector": selector, "interval": interval, "kept": fraction,
                             "accuracy": accuracy(model, spec, args), "bytes": held,
                             "bytes_ratio": round(held / full_bytes, 4)})
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def equal_bytes_budget(model: torch.nn.Module, selector: str, retain: str, ceiling: float,
                       args: argparse.Namespace) -> tuple[float, float]:
    """The largest kept fraction (in 1/256 steps) whose cache, the rest retained at low precision,
    measures at most `ceiling` bytes: (fraction, its bytes)."""
    lo, hi, best = 1, 256, None
    while lo <= hi:
        mid = (lo + hi) // 2
        held = measured_bytes(model, eviction_spec(selector, mid / 256, 0, retain=retain), args)
        if held <= ceiling:
            best, lo = (mid / 256, held), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"{selector} retaining {retain} exceeds {ceiling:.0f} bytes at any budget")
    return best


def equal_bytes(args: argparse.Namespace, base: str, free: list[dict]) -> list[dict]:
    """MiKV (SnapKV's and H2O's evicted tokens kept at 2 bits) at the bytes of dropping them at the end
    of the prompt with 50% and 25% kept, and the quantizers alone, all against the full cache's bytes."""
    model, full_bytes = load_model(base).eval(), free[0]["bytes"]
    rows = []
    for fraction in FRACTIONS[:2]:
        for selector in ("snapkv", "h2o"):
            dropped = next(r for r in free if (r["selector"], r["interval"], r["kept"]) == (selector, 0, fraction))
            for retain in RETAIN:
                kept, held = equal_bytes_budget(model, selector, retain, dropped["bytes"], args)
                spec = eviction_spec(selector, kept, 0, retain=retain)
                rows.append({"method": f"{selector} + {retain} retained", "kept": kept, "vs_dropping": fraction,
                             "accuracy": accuracy(model, spec, args), "dropping_accuracy": dropped["accuracy"],
                             "bytes": held, "bytes_ratio": round(held / full_bytes, 4)})
                print(rows[-1], file=sys.stderr, flush=True)
    for name, spec in QUANTIZERS.items():
        held = measured_bytes(model, spec, args)
        rows.append({"method": name, "kept": 1.0, "vs_dropping": "-", "accuracy": accuracy(model, spec, args),
                     "dropping_accuracy": "-", "bytes": held, "bytes_ratio": round(held / full_bytes, 4)})
    return rows


MERGE_ABOVE = (-1.0, 0.5, 0.8, 0.9, 0.95)


def composed(args: argparse.Namespace, base: str, full_bytes: float) -> list[dict]:
    """Eviction at the end of the prompt over quantized K/V (`COMPOSED`), bytes measured in bf16."""
    model, rows = load_model(base).eval(), []
    for name, (selector, kept, bits, retain) in COMPOSED.items():
        spec = eviction_spec(selector, kept, 0, retain=retain, bits=bits)
        held = measured_bytes(model, spec, args)
        rows.append({"method": name, "accuracy": accuracy(model, spec, args), "bytes": held,
                     "bytes_ratio": round(held / full_bytes, 4)})
    return rows


def merge_sweep(args: argparse.Namespace, base: str) -> list[dict]:
    """SnapKV keeping 25% at the end of the prompt, merging only the evicted tokens whose nearest
    survivor's key is more cosine-similar than a threshold (D2O's rule; -1: all, EMS's), the rest dropped."""
    model = load_model(base).eval()
    return [{"merge_above": above, "accuracy": accuracy(model, eviction_spec("snapkv + merge", 0.25, 0,
                                                                             merge_above=above), args)}
            for above in MERGE_ABOVE]


def perplexity(args: argparse.Namespace, equal: list[dict]) -> list[dict]:
    """Next-token perplexity of the pretrained kvtrain-ref over the second half of `--ppl_windows`
    val windows of the embedded corpus (its pretraining context), the cache deciding every 16 tokens:
    each selector at each kept fraction, and H2O's MiKV points at the bytes of dropping. One forward
    per batch of the view, which equals decoding with the evicting cache."""
    model = load_model("kvtrain-ref").eval()
    dataset = PackedDataset(token_stream(None, "val", load_tokenizer("kvtrain-ref")), args.ppl_len)
    ids = torch.stack([dataset[i]["input_ids"] for i in range(min(len(dataset), args.ppl_windows))])
    scored = torch.zeros_like(ids)
    scored[:, args.ppl_len // 2:] = 1  # the tokens predicted with half a window or more behind them

    def measure(spec: KVSpec | None) -> float:
        nll, tokens = 0.0, 0
        with attached(model, spec) if spec is not None else contextlib.nullcontext(), torch.no_grad():
            for batch, mask in zip(ids.split(8), scored.split(8)):
                total, n = next_token_nll(model(input_ids=batch, use_cache=False).logits, batch, loss_mask=mask)
                nll, tokens = nll + total.item(), tokens + int(n)
        return round(math.exp(nll / tokens), 4)

    rows = [{"selector": "full cache", "kept": 1.0, "ppl": measure(None)}]
    for selector in (*SELECTORS, *(f"{name} + merge" for name in MERGED)):
        for fraction in FRACTIONS:
            rows.append({"selector": selector, "kept": fraction, "ppl": measure(eviction_spec(selector, fraction, 16))})
            print(rows[-1], file=sys.stderr, flush=True)
    for row in equal:
        if row["method"] == "h2o + int2 retained":
            rows.append({"selector": row["method"], "kept": row["kept"], "vs_dropping": row["vs_dropping"],
                         "ppl": measure(eviction_spec("h2o", row["kept"], 16, retain="int2"))})
    return rows


def trained(args: argparse.Namespace, base: str, point: str, out: Path) -> dict:
    name, seed = point.split(":")
    spec = parse_point(name)
    model = finetune(base, spec, args.steps, int(seed), args)
    under = [name] if spec is not None else args.control_under.split(",")  # a control, under what it controls for
    result = {"point": name, "seed": int(seed), "steps": args.steps, "accuracy_full": accuracy(model, None, args),
              "accuracy_under": {u: accuracy(model, parse_point(u), args) for u in under}}
    write_json(out / "trained" / f"{name}-{seed}.json", result)
    return result


def summary(out: Path) -> list[dict]:
    """Each trained point (and the control under each eviction it was measured under): mean and
    sample standard deviation over its seeds, with the same models' full-cache accuracy."""
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for path in sorted((out / "trained").glob("*.json")):
        run = json.loads(path.read_text())
        for under, value in run["accuracy_under"].items():  # (+st trains differently, decodes with the same cache)
            runs.setdefault((run["point"], under.replace("+st", "")), []).append((value, run["accuracy_full"]))
    rows = []
    for (point, under), values in runs.items():
        row = {"point": point, "under": under, "seeds": len(values)}
        for key, column in (("accuracy", 0), ("accuracy_full", 1)):
            xs = [v[column] for v in values]
            row[key], row[f"{key}_std"] = round(statistics.mean(xs), 4), round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0
        rows.append(row)
    return rows


def plot(rows: list[dict], trained_rows: list[dict], equal: list[dict], path: Path, title: str,
         quantized: list[dict] = ()) -> None:
    """Held-out accuracy against the measured bytes kept, one line per selector, trained points,
    MiKV's retention and the quantizers on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 7))
    full = rows[0]
    ax.axhline(full["accuracy"], color="black", linestyle="--", linewidth=1, label="full cache")
    for interval, style in zip(INTERVALS, ("o-", "s:")):
        for selector in dict.fromkeys(r["selector"] for r in rows[1:]):
            points = [r for r in rows if (r["selector"], r["interval"]) == (selector, interval)]
            merged = selector.endswith(" + merge")  # in the selector's colour, hollow
            ax.plot([r["bytes_ratio"] for r in points], [r["accuracy"] for r in points], style,
                    color=f"C{SELECTORS.index(selector.split()[0])}", fillstyle="none" if merged else "full",
                    linewidth=2.5 if merged else 1.5,
                    label=f"{selector}, {'end of prompt' if not interval else f'every {interval}'} (training-free)")
    for row in trained_rows:
        policy = parse_point(row["under"]).eviction
        like = policy.selector if policy.selector in SELECTORS else "streaming_llm"  # (a learned one holds as much)
        ratio = next(r["bytes_ratio"] for r in rows if (r["selector"], r["interval"], r["kept"]) == (
            like, policy.interval, policy.budget))
        control = row["point"] == "control"
        label = f"full-cache fine-tune under {row['under']}" if control else f"{row['point']} fine-tune"
        ax.errorbar([ratio], [row["accuracy"]], yerr=[row["accuracy_std"]], fmt="x" if control else "*", markersize=12,
                    capsize=4, label=f"{label} ({row['seeds']} seeds)")
    for row in equal:  # MiKV in its selector's colour (hollow: with the rotation), the quantizers in black
        retained = row["vs_dropping"] != "-"
        color = f"C{SELECTORS.index(row['method'].split()[0])}" if retained else "black"
        ax.plot([row["bytes_ratio"]], [row["accuracy"]], "D" if retained else ("P" if "2" in row["method"] else "X"),
                color=color, markersize=8, fillstyle="none" if "hadamard" in row["method"] else "full",
                label=f"{row['method']}" + (f" ({row['kept']:.0%} kept in full)" if retained else " (no eviction)"))
    for row in quantized:  # eviction over quantized K/V, in the selector's colour
        ax.plot([row["bytes_ratio"]], [row["accuracy"]], "v", color=f"C{SELECTORS.index(row['method'].split()[0])}",
                markersize=9, label=row["method"])
    ax.set_xlabel("cache bytes kept (measured in bf16, vs the full cache)")
    ax.set_ylabel("held-out exact match")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.pairs, args.base_steps, args.steps, args.val_size, args.batch_size = 16, 4, 2, 8, 4
        args.ppl_windows, args.ppl_len = 2, 64
        args.train = args.train or ["snapkv25:0", "dms25+st:0", "control:0"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(args, out)
    for point in args.train:
        print(trained(args, base, point, out), file=sys.stderr, flush=True)
    trained_rows = summary(out) if (out / "trained").is_dir() else []
    if trained_rows:
        print(format_table(trained_rows, list(trained_rows[0])))
    name = "kv_eviction_smoke" if args.smoke else "kv_eviction"
    results = out / f"{name}.json"
    env = environment({"base": base})
    if (args.train or args.summarize or args.perplexity) and results.is_file() and not args.smoke:
        earlier = json.loads(results.read_text())
        check_same_builds(env, earlier.get("env", {}), str(results))
        report = {**earlier, "trained": trained_rows}  # trained points join the table
    else:
        free = training_free(args, base)
        report = {"training_free": free, "equal_bytes": equal_bytes(args, base, free), "trained": trained_rows,
                  "args": vars(args), "env": env}
        args.perplexity = True
    if args.perplexity:
        report["perplexity"] = perplexity(args, report["equal_bytes"])
        report["merge_sweep"] = merge_sweep(args, base)
        report["composed"] = composed(args, base, report["training_free"][0]["bytes"])
        report["args"].update(ppl_windows=args.ppl_windows, ppl_len=args.ppl_len)
    table = format_table(report["training_free"], ["selector", "interval", "kept", "accuracy", "bytes", "bytes_ratio"])
    table += "\n\n" + format_table(report["equal_bytes"], list(report["equal_bytes"][0]))
    if "perplexity" in report:
        table += "\n\n" + format_table(report["perplexity"], ["selector", "kept", "ppl"])
        table += "\n\n" + format_table(report["merge_sweep"], ["merge_above", "accuracy"])
        table += "\n\n" + format_table(report["composed"], ["method", "accuracy", "bytes", "bytes_ratio"])
    print(table)
    write_json(results, report)
    (out / f"{name}.md").write_text(table + "\n")
    plot(report["training_free"], trained_rows, report["equal_bytes"], out / f"{name}.png", f"kvtrain-ref fine-tuned on recall "
         f"({args.pairs} lines{', needle' if args.needle else ''}), held-out exact match, {SINKS} sinks",
         report.get("composed", ()))


if __name__ == "__main__":
    main()
