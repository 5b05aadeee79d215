"""Retrieval under token eviction, training-free and trained against (issue 14).

kvtrain-ref is fine-tuned on the embedded recall task with its full cache (the base, `--base_steps`),
then its held-out accuracy (greedy exact match of the answer, read from one teacher-forced forward of
the view, which equals decoding with the evicting cache) is measured under each selector keeping
50%, 25% and 12.5% of the prompt, decided once at the end of the prompt (SnapKV's schedule; every
selector on that schedule, with 4 sinks) and every 16 tokens (the decode-time schedule, decided before
the question is read), next to the full cache. Bytes are measured from the cache
after decoding prompt and answer (`QuantizedKVCache.nbytes()`, fp32 as trained here) against a
DynamicCache. `--train NAME:SEED` then fine-tunes the base further for `--steps`, against eviction
(NAME a selector, a percent and an interval, e.g. snapkv25@16) or with the full cache (control), and
measures it both ways (the control under `--control_under`); the summary gives each trained point's mean and spread over its seeds.

    python bench/kv_eviction.py                          # base + training-free table
    python bench/kv_eviction.py --train snapkv25@16:0 --train control:0 ...
    python bench/kv_eviction.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import lightning as L
import torch

from bench_utils import environment
from kvtrain.callbacks import KVQuantCallback
from kvtrain.data.tasks import TaskDataModule
from kvtrain.eval import cache_nbytes, completion_match, format_table, write_json
from kvtrain.kv import KVSpec, QuantizedKVCache, attach, detach
from kvtrain.models import load_model, load_tokenizer
from kvtrain.modules import CausalLMModule

SELECTORS = ("streaming_llm", "snapkv", "h2o", "tova")
FRACTIONS = (0.5, 0.25, 0.125)
INTERVALS = (0, 16)  # once at the end of the prompt (SnapKV's schedule), or every 16 tokens (decode-time)
SINKS = 4


def eviction_spec(selector: str, fraction: float, interval: int) -> KVSpec:
    # SnapKV observes its paper's 32 queries, or all those since the last decision if fewer
    options = {"window": min(32, interval or 32), "kernel": 5} if selector == "snapkv" else {}
    return KVSpec(key=None, value=None, eviction=dict(selector=selector, budget=fraction, interval=interval,
                                                      sinks=SINKS, options=options))


def parse_point(name: str) -> KVSpec | None:
    """"control" (the full cache) or a selector, the percent it keeps and the interval: snapkv25 (at the
    end of the prompt), snapkv25@16 (every 16 tokens)."""
    if name == "control":
        return None
    kept, _, interval = name.partition("@")
    selector = kept.rstrip("0123456789")
    if selector not in SELECTORS or selector == kept or not (interval or "0").isdigit():
        raise ValueError(f"unknown point {name!r}: control, or one of {SELECTORS}, a percent and @interval "
                         f"(snapkv25, snapkv25@16)")
    return eviction_spec(selector, int(kept[len(selector):]) / 100, int(interval or 0))


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
    p.add_argument("--control_under", default="snapkv25@16", help="the eviction a control run is measured under")
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
        return completion_match(model, data.val_dataloader(), desc=str(spec and spec.eviction.selector))["accuracy"]
    finally:
        detach(model)


def measured_bytes(model: torch.nn.Module, spec: KVSpec | None, args: argparse.Namespace, prompts: int = 4) -> float:
    """Mean cache bytes after decoding a held-out prompt (one forward) and its answer (token by token)."""
    data, total = task(args, seed=0), 0
    batch = next(iter(data.val_dataloader()))
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
        for selector in SELECTORS:
            for fraction in FRACTIONS:
                spec = eviction_spec(selector, fraction, interval)
                held = measured_bytes(model, spec, args)
                rows.append({"selector": selector, "interval": interval, "kept": fraction,
                             "accuracy": accuracy(model, spec, args), "bytes": held,
                             "bytes_ratio": round(held / full_bytes, 4)})
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def trained(args: argparse.Namespace, base: str, point: str, out: Path) -> dict:
    name, seed = point.split(":")
    spec = parse_point(name)
    model = finetune(base, spec, args.steps, int(seed), args)
    # the control is measured under the eviction of the points it controls (--control_under)
    measure = spec if spec is not None else parse_point(args.control_under)
    result = {"point": name, "seed": int(seed), "steps": args.steps, "evicted": str(measure.eviction),
              "accuracy_evicted": accuracy(model, measure, args), "accuracy_full": accuracy(model, None, args)}
    write_json(out / "trained" / f"{name}-{seed}.json", result)
    return result


def summary(out: Path) -> list[dict]:
    runs: dict[str, list[dict]] = {}
    for path in sorted((out / "trained").glob("*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["point"], []).append(run)
    rows = []
    for point, group in runs.items():
        row = {"point": point, "seeds": len(group)}
        for key in ("accuracy_evicted", "accuracy_full"):
            values = [r[key] for r in group]
            row[key] = round(statistics.mean(values), 4)
            row[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def plot(rows: list[dict], trained_rows: list[dict], path: Path, title: str) -> None:
    """Held-out accuracy against the measured bytes kept, one line per selector, trained points on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = rows[0]
    ax.axhline(full["accuracy"], color="black", linestyle="--", linewidth=1, label="full cache")
    for interval, style in zip(INTERVALS, ("o-", "s:")):
        for color, selector in enumerate(SELECTORS):
            points = [r for r in rows if (r["selector"], r["interval"]) == (selector, interval)]
            ax.plot([r["bytes_ratio"] for r in points], [r["accuracy"] for r in points], style, color=f"C{color}",
                    label=f"{selector}, {'end of prompt' if not interval else f'every {interval}'} (training-free)")
    for row in (r for r in trained_rows if r["point"] != "control"):
        policy = parse_point(row["point"]).eviction
        ratio = next(r["bytes_ratio"] for r in rows if (r["selector"], r["interval"], r["kept"]) == (
            policy.selector, policy.interval, policy.budget))
        ax.errorbar([ratio], [row["accuracy_evicted"]], yerr=[row["accuracy_evicted_std"]], fmt="*", markersize=12,
                    capsize=4, label=f"{row['point']} trained ({row['seeds']} seeds)")
    ax.set_xlabel("cache bytes kept (measured, vs the full cache)")
    ax.set_ylabel("held-out exact match")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.pairs, args.base_steps, args.steps, args.val_size, args.batch_size = 16, 4, 2, 8, 4
        args.train = args.train or ["snapkv25@16:0", "control:0"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(args, out)
    for point in args.train:
        print(trained(args, base, point, out), file=sys.stderr, flush=True)
    trained_rows = summary(out) if (out / "trained").is_dir() else []
    if trained_rows:
        print(format_table(trained_rows, list(trained_rows[0])))
    if args.train and not args.smoke:
        return
    rows = training_free(args, base)
    table = format_table(rows, ["selector", "interval", "kept", "accuracy", "bytes", "bytes_ratio"])
    print(table)
    name = "kv_eviction_smoke" if args.smoke else "kv_eviction"
    write_json(out / f"{name}.json", {"training_free": rows, "trained": trained_rows, "args": vars(args),
                                      "env": environment()})
    (out / f"{name}.md").write_text(table + "\n")
    plot(rows, trained_rows, out / f"{name}.png", f"kvtrain-ref fine-tuned on recall ({args.pairs} lines"
         f"{', needle' if args.needle else ''}), held-out exact match, {SINKS} sinks")


if __name__ == "__main__":
    main()
