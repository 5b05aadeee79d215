"""How much of the perplexity that a 2-bit KV cache costs does KV QAT win back? Over several seeds.

Runs `recipes/qat_kivi2.yaml` from the same start for each seed (the seed draws the data order), once
as written (QAT: the spec attached) and once with KVQuantCallback removed (the control fine-tune, so
that extra training alone cannot pass), then evaluates the start, every control and every QAT model
with full-precision KV and under the recipe's spec on whole 1024-token windows. Two measures per seed:

    recovered = (ppl(control, spec) - ppl(QAT, spec)) / (ppl(control, spec) - ppl(control, fp))
    gap left  = ppl(QAT, spec) / ppl(QAT, fp) - 1

the first against the control of the same seed, the second against the QAT model's own
full-precision KV; the report gives each seed and the mean and sample standard deviation.

Every run lands in OUT/<arm>-seed<S>/ and a finished run (its exported model) is skipped on rerun,
an interrupted one resumes from its last checkpoint, so runs can be split over processes (--only)
and the report assembled by a last plain call.

    python bench/qat_recovery.py                          # 3 seeds x 2 arms (~25 min a run on 1 core)
    python bench/qat_recovery.py --only qat:1 control:1   # some runs (e.g. one process per core)
    python bench/qat_recovery.py --smoke                  # a minute, for CI
    python bench/qat_recovery.py --model smollm2-135m --out bench/results/smollm2/qat_recovery \
        --override=--model.init_args.lr=2e-4 ...          # the recipe on another model (its tokenizer)
    python bench/qat_recovery.py --recipe qat_kivi2_smollm2.yaml --model smollm2-135m --arms qat \
        --spec FOLDER --out ...                           # another spec (a calibrated folder) in the same training
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bench_utils import environment
from kvtrain.callbacks import ExportPretrained, KVQuantCallback
from kvtrain.cli import KVTrainCLI, recipe_path, recipe_spec
from kvtrain.data.lm import PackedDataset, token_stream
from kvtrain.eval import format_table, perplexity, write_json
from kvtrain.home import is_complete
from kvtrain.kv import PRESETS, KVQuantSpec, Spec, attach, detach, resolve_spec
from kvtrain.kv.spec import codec_state_file
from kvtrain.models import REFERENCE, load_model, load_tokenizer

ARMS = ("qat", "control")


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}-seed{seed}"


def train(recipe: Path, out: Path, arm: str, seed: int, overrides: list[str],
          kv: Callable[[], KVQuantCallback] | None = None) -> dict:
    """Fit the recipe (without its KVQuantCallback for the control; with a fresh `kv()` in its place when
    given: a callback starts from its codec state once) into out/; resumes an interrupted run."""
    folder = run_dir(out, arm, seed)
    seeded = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
    cli = KVTrainCLI(args=["--config", str(recipe), f"--trainer.default_root_dir={folder}", *seeded, *overrides],
                     run=False)
    trainer = cli.trainer
    if arm == "control":
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, KVQuantCallback)]
    elif kv is not None:
        trainer.callbacks = [kv() if isinstance(cb, KVQuantCallback) else cb for cb in trainer.callbacks]
    for cb in trainer.callbacks:  # keep each run's files apart
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(folder / "checkpoints")
        if isinstance(cb, ExportPretrained):
            cb.to = str(folder / "model")
    trainer.logger = False
    last = folder / "checkpoints" / "last.ckpt"
    start = time.time()
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    return {"seconds": time.time() - start}


def run_spec(recipe: Path, spec: str | None, codec_state: Path | None) -> tuple[Spec, Path | None]:
    """The spec the QAT runs train with and every model is evaluated under, and the codec state they start
    from: the recipe's, or `spec`'s (a calibrated folder's state with it), with `codec_state` over either."""
    resolved, state = (resolve_spec(spec), codec_state_file(spec)) if spec else recipe_spec(recipe)
    return resolved, codec_state or state


def spec_name(spec: Spec, named: str | None = None) -> str:
    """A preset's name, else the --spec folder's or file's (without .json; the method's folder above a
    generic `calibrated` or `spec` one, as bench/kv_lowrank.py writes them), else "recipe spec"."""
    path = Path(named) if named else None
    while path is not None and path.stem in ("kv_spec", "calibrated", "spec") and path.parent.name:
        path = path.parent
    default = path.stem if path is not None else "recipe spec"
    return next((name for name in PRESETS if spec == KVQuantSpec.preset(name)), default)


def evaluate(models: dict[str, str], spec: Spec, codec_state: Path | None, split: str, seq_len: int,
             max_batches: int | None, tokenizer: str, spec_label: str = "recipe spec") -> list[dict]:
    """Each model with full-precision KV and under the spec, with the codec state it decodes with: a
    QAT model's own (exported beside its kv_spec.json), else the recipe's start (calibrated or fresh)."""
    tokens = token_stream(None, split, load_tokenizer(tokenizer))
    dataset = PackedDataset(tokens, seq_len)
    rows = []
    for name, path in models.items():
        model = load_model(path)
        start = codec_state_file(path) or codec_state
        if start is not None:
            attach(model, spec, start)
            detach(model)  # (kept aside for the attach of the spec below)
        for kv, s in (("full precision", None), (spec_label, spec)):
            result = perplexity(model, dataset, batch_size=4, max_batches=max_batches, desc=f"{name} / {kv}", spec=s)
            rows.append({"model": name, "kv": kv, "split": split, **result})
    return rows


def measures(rows: list[dict], split: str, seed: int) -> dict:
    """Gap left, and (with the control arm) recovered, for one seed."""
    ppl = {(r["model"], r["kv"] == "full precision"): r["ppl"] for r in rows if r["split"] == split}
    qat_q, qat_fp = ppl[f"qat-seed{seed}", False], ppl[f"qat-seed{seed}", True]
    if (f"control-seed{seed}", False) not in ppl:
        return {"gap_left": qat_q / qat_fp - 1}
    control_q, control_fp = ppl[f"control-seed{seed}", False], ppl[f"control-seed{seed}", True]
    return {"recovered": (control_q - qat_q) / (control_q - control_fp), "gap_left": qat_q / qat_fp - 1}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def summary_rows(rows: list[dict], seeds: list[int], splits: list[str]) -> list[dict]:
    """Mean and sd over seeds of each arm's perplexity, plus the start."""
    out = []
    for split in splits:
        for kv in dict.fromkeys(r["kv"] for r in rows):
            pick = {r["model"]: r["ppl"] for r in rows if r["split"] == split and r["kv"] == kv}
            out.append({"model": "start", "kv": kv, "split": split, "ppl mean": pick["start"], "ppl sd": ""})
            for arm in (a for a in ARMS if f"{a}-seed{seeds[0]}" in pick):
                mean, sd = mean_sd([pick[f"{arm}-seed{s}"] for s in seeds])
                out.append({"model": arm, "kv": kv, "split": split, "ppl mean": mean, "ppl sd": sd})
    return out


def report(result: dict) -> str:
    seeds, splits, name = result["seeds"], result["splits"], result["spec_name"]
    per_seed = [{"split": split, "seed": s, "recovered %": 100 * m.get("recovered", float("nan")),
                 "gap left %": 100 * m["gap_left"]} for split, by_seed in result["measures"].items() for s, m in by_seed.items()]
    lines = [f"{result['recipe']} on {result.get('model', REFERENCE)} for {len(seeds)} seeds (data order) per arm; perplexity on whole "
             f"{result['seq_len']}-token windows; Python {result['env']['python']}. Mean and sample sd over seeds:",
             "", format_table(summary_rows(result["rows"], seeds, splits), ["model", "kv", "split", "ppl mean", "ppl sd"]),
             "", f"Per seed: recovered = share of the control's {name} gap that QAT wins back; gap left = "
                 f"ppl(QAT, {name}) / ppl(QAT, full precision) - 1:",
             "", format_table(per_seed, ["split", "seed", "recovered %", "gap left %"]), ""]
    for split in splits:
        by_seed = result["measures"][split].values()
        left = mean_sd([m["gap_left"] for m in by_seed])
        rec = mean_sd([m["recovered"] for m in by_seed]) if all("recovered" in m for m in by_seed) else None
        lines.append(f"- {split}: " + (f"recovered {100 * rec[0]:.1f}% ± {100 * rec[1]:.1f}, " if rec else "")
                     + f"gap left {100 * left[0]:.2f}% ± {100 * left[1]:.2f} (mean ± sd over {len(seeds)} seeds)")
    seconds = result["train_seconds"]
    lines.append("- training wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="qat_kivi2.yaml")
    parser.add_argument("--model", default=REFERENCE, help="the start model (recipe's model replaced; its tokenizer)")
    parser.add_argument("--out", default="bench/results/qat_recovery")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                        help="qat alone skips the control fine-tunes (and the recovered share, which needs them)")
    parser.add_argument("--only", nargs="+", metavar="ARM:SEED", help="train just these runs (no report)")
    parser.add_argument("--max_batches", type=int, default=None,
                        help="evaluate the first N batches of 4 windows per split (default: whole splits)")
    parser.add_argument("--spec", default=None,
                        help="a KV spec (preset, JSON file, or folder with its calibrated state) in place of the recipe's")
    parser.add_argument("--codec_state", type=Path, default=None,
                        help="a kv_codec_state.safetensors (from `kvtrain calibrate`) the QAT runs start from and the start "
                             "and control models are evaluated with, in place of the recipe's (or --spec folder's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 4 steps, 2 eval batches")
    parser.add_argument("--override", action="append", default=[],
                        help="a recipe override, e.g. --override=--trainer.max_steps=60")
    args = parser.parse_args(argv)
    if args.model != REFERENCE:
        args.override.insert(0, f"--model.init_args.model={args.model}")
    if args.smoke:
        args.seeds = args.seeds[:2]
        args.override += ["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
                          "--trainer.enable_progress_bar=false"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    recipe = Path(args.recipe) if Path(args.recipe).is_file() else recipe_path(args.recipe)
    runs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.only:
        runs = [(arm, int(seed)) for arm, seed in (item.split(":") for item in args.only)]
    spec, codec_state = run_spec(recipe, args.spec, args.codec_state)
    name = spec_name(spec, args.spec)
    kv = partial(KVQuantCallback, spec, codec_state=codec_state) if args.spec or args.codec_state else None
    for arm, seed in runs:
        if not is_complete(run_dir(out, arm, seed) / "model"):
            write_json(run_dir(out, arm, seed) / "train.json", train(recipe, out, arm, seed, args.override, kv))
    if args.only:
        return
    models = {"start": args.model, **{f"{a}-seed{s}": str(run_dir(out, a, s) / "model") for a, s in runs}}
    max_batches = 2 if args.smoke else args.max_batches
    rows = [row for split in args.splits
            for row in evaluate(models, spec, codec_state, split, 1024, max_batches, args.model, name)]
    train_seconds = {f"{a}-seed{s}": read_seconds(run_dir(out, a, s)) for a, s in runs}
    result = {"recipe": recipe.name, "model": args.model, "spec_name": name, "seeds": args.seeds, "splits": args.splits,
              "seq_len": 1024, "max_batches": max_batches, "overrides": args.override,
              "spec": args.spec, "codec_state": str(codec_state) if codec_state else None, "env": environment({"start": args.model}), "rows": rows,
              "measures": {split: {s: measures(rows, split, s) for s in args.seeds} for split in args.splits},
              "train_seconds": train_seconds}
    markdown = report(result)
    print(markdown)
    (out / "table.md").write_text(markdown + "\n")
    write_json(out / "results.json", result)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}", file=sys.stderr)


def read_seconds(folder: Path) -> float:
    path = folder / "train.json"
    return json.loads(path.read_text())["seconds"] if path.is_file() else float("nan")


if __name__ == "__main__":
    main()
