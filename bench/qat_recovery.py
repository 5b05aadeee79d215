"""How much of the perplexity that a 2-bit KV cache costs does KV QAT win back?

Runs `recipes/qat_kivi2.yaml` twice from the same start, data and steps: once as written (QAT: the
spec attached) and once with KVQuantCallback removed (the control fine-tune, so that extra training
alone cannot pass). Then evaluates start, control and QAT models with full-precision KV and under
the recipe's spec and reports

    recovery = (ppl(control, spec) - ppl(QAT, spec)) / (ppl(control, spec) - ppl(control, full precision))

    python bench/qat_recovery.py                       # the recipe as shipped (~15 min on 2 cores)
    python bench/qat_recovery.py --smoke               # a minute, for CI
    python bench/qat_recovery.py --override=--model.init_args.distill_weight=0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvtrain.callbacks import ExportPretrained, KVQuantCallback
from kvtrain.cli import KVTrainCLI, recipe_path
from kvtrain.data.lm import PackedDataset, token_stream
from kvtrain.eval import format_table, perplexity, write_json
from kvtrain.kv import PRESETS, KVQuantSpec
from kvtrain.models import load_model, load_tokenizer
from lightning.pytorch.callbacks import ModelCheckpoint


def train(recipe: Path, out: Path, quantized: bool, overrides: list[str]) -> tuple[Path, object, float]:
    """Fit the recipe into `out`; returns (exported model folder, the recipe's KV spec, seconds)."""
    cli = KVTrainCLI(args=["--config", str(recipe), f"--trainer.default_root_dir={out}", *overrides], run=False)
    trainer = cli.trainer
    spec = next(cb.spec for cb in trainer.callbacks if isinstance(cb, KVQuantCallback))
    if not quantized:
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, KVQuantCallback)]
    for cb in trainer.callbacks:  # keep each run's files apart
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(out / "checkpoints")
        if isinstance(cb, ExportPretrained):
            cb.to = str(out / "model")
    trainer.logger = False
    start = time.time()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    return out / "model", spec, time.time() - start


def evaluate(models: dict[str, str], spec, split: str, seq_len: int, max_batches: int | None) -> list[dict]:
    tokens = token_stream(None, split, load_tokenizer("kvtrain-ref"))
    dataset = PackedDataset(tokens, seq_len)
    rows = []
    for name, path in models.items():
        model = load_model(path)
        for kv, s in (("full precision", None), (spec_name(spec), spec)):
            result = perplexity(model, dataset, batch_size=4, max_batches=max_batches, desc=f"{name} / {kv}", spec=s)
            rows.append({"model": name, "kv": kv, "split": split, **result})
    return rows


def spec_name(spec) -> str:
    return next((name for name in PRESETS if spec == KVQuantSpec.preset(name)), "recipe spec")


def recovery(rows: list[dict], split: str) -> float:
    ppl = {(r["model"], r["kv"] == "full precision"): r["ppl"] for r in rows if r["split"] == split}
    gap = ppl["control", False] - ppl["control", True]
    return (ppl["control", False] - ppl["qat", False]) / gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="qat_kivi2.yaml")
    parser.add_argument("--out", default="bench/results/qat_recovery")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--smoke", action="store_true", help="4 steps, 2 eval batches")
    parser.add_argument("--override", action="append", default=[], help="a recipe override, e.g. --override=--trainer.max_steps=60")
    args = parser.parse_args()
    out = Path(args.out)
    overrides = list(args.override)
    if args.smoke:
        overrides += ["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1"]
    recipe = Path(args.recipe) if Path(args.recipe).is_file() else recipe_path(args.recipe)
    qat, spec, qat_s = train(recipe, out / "qat", True, overrides)
    control, _, control_s = train(recipe, out / "control", False, overrides)
    models = {"start": "kvtrain-ref", "control": str(control), "qat": str(qat)}
    max_batches = 2 if args.smoke else None
    rows = [row for split in args.splits for row in evaluate(models, spec, split, 1024, max_batches)]
    recoveries = {split: recovery(rows, split) for split in args.splits}
    table = format_table(rows, ["model", "kv", "split", "tokens", "ppl"])
    summary = ", ".join(f"{s}: {100 * r:.1f}%" for s, r in recoveries.items())
    report = f"{table}\n\nrecovery of the {spec_name(spec)} gap ({summary}); training {qat_s:.0f} s QAT, {control_s:.0f} s control"
    print(report)
    (out / "table.md").write_text(report + "\n")
    write_json(out / "results.json", {"rows": rows, "recovery": recoveries, "overrides": overrides,
                                      "train_seconds": {"qat": qat_s, "control": control_s}})


if __name__ == "__main__":
    main()
