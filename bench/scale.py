"""What do ZeRO-2 and ZeRO-3 buy per rank, and what do they cost per step? CPU, 1 and 2 processes.

Runs `kvtrain fit` with kivi2 KV QAT on kvtrain-ref's config (random init) for the same global batch
and steps: plain Lightning (1 process), then ZeRO-2 and ZeRO-3 (KVDeepSpeedStrategy) with 1 and 2
processes (gloo, one thread per rank). Reports each rank's training-state bytes, measured from the
real tensors it holds after the first optimizer step (kvtrain.callbacks.TrainingStateMemory), and the
median step time as a ratio to the plain 1-process run of the same invocation.

    python bench/scale.py            # ~5 min on 2 cores
    python bench/scale.py --smoke    # tiny model, 4 steps, for CI

Fixed global batch: with 2 processes each rank does half the work, so 0.5 is the ideal time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

from bench_utils import environment
from kvtrain.eval import format_table, write_json

HERE = Path(__file__).parent
SETUPS = [("plain", "auto", 1), ("zero2", "zero2", 1), ("zero2", "zero2", 2), ("zero3", "zero3", 1), ("zero3", "zero3", 2)]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


class StepTimer(L.Callback):
    """Wall time of every training step (forward, backward, optimizer), written by rank 0."""

    def __init__(self, path: str):
        self.path, self.times, self._start = path, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.times))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--data", default=None, help="corpus (default: the embedded stdlib corpus)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


def fit(folder: Path, strategy: str, devices: int, args: argparse.Namespace) -> dict:
    folder.mkdir(parents=True)
    overrides = {"config_overrides": TINY} if args.smoke else {}
    recipe = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": strategy, "precision": "32-true",
            "max_steps": args.steps, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "gradient_clip_val": 1.0,
            "callbacks": [
                {"class_path": "kvtrain.callbacks.KVQuantCallback", "init_args": {"spec": "kivi2"}},
                {"class_path": "kvtrain.callbacks.TrainingStateMemory", "init_args": {"path": "memory.json"}},
                {"class_path": "scale.StepTimer", "init_args": {"path": "steps.json"}},
            ],
        },
        "model": {"class_path": "kvtrain.modules.CausalLMModule",
                  "init_args": {"model": "kvtrain-ref", "init": "random", "warmup_steps": 2, **overrides}},
        "data": {"class_path": "kvtrain.data.LMDataModule",
                 "init_args": {"data": args.data, "seq_len": args.seq_len, "batch_size": args.global_batch // devices}},
    }
    (folder / "recipe.json").write_text(json.dumps(recipe))
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}  # one core per rank
    done = subprocess.run([sys.executable, "-m", "kvtrain.cli", "fit", "--config", "recipe.json"], cwd=folder,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{strategy} x{devices} failed:\n{done.stderr[-4000:]}")
    steps = json.loads((folder / "steps.json").read_text())[args.warmup:]
    ranks = json.loads((folder / "memory.json").read_text())["ranks"]
    return {"step_s": statistics.median(steps), "ranks": ranks}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.seq_len, args.global_batch = 4, 1, 64, 4
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtrain-scale-") as tmp:
        for name, strategy, devices in SETUPS:
            print(f"{name} x{devices} ...", file=sys.stderr, flush=True)
            result = fit(Path(tmp) / f"{name}-{devices}", strategy, devices, args)
            worst = max(result["ranks"], key=lambda r: r["total"])
            rows.append({"setup": name, "processes": devices, "step_s": round(result["step_s"], 4),
                         **{f"{k}_MiB": round(v / 2**20, 3) for k, v in worst.items()}})
    base = rows[0]
    for row in rows:
        row["step_ratio"] = round(row["step_s"] / base["step_s"], 3)
        row["memory_ratio"] = round(row["total_MiB"] / base["total_MiB"], 3)
    columns = ["setup", "processes", "parameters_MiB", "gradients_and_optimizer_MiB", "total_MiB",
               "memory_ratio", "step_s", "step_ratio"]
    header = (f"kivi2 KV QAT of kvtrain-ref's config ({'tiny smoke' if args.smoke else 'random init'}), global batch "
              f"{args.global_batch} x {args.seq_len} tokens, fp32, CPU, gloo, 1 thread per process; per-rank "
              f"training state (largest rank) measured from the tensors held after the first step; step time: "
              f"median of {args.steps - args.warmup} steps; ratios vs plain Lightning, 1 process, same run:\n")
    table = header + "\n" + format_table(rows, columns)
    print(table)
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.md").write_text(table + "\n")
        write_json(out / "scale.json", {"rows": rows, "args": vars(args), "env": environment()})
        print(f"wrote {out / 'scale.md'} and {out / 'scale.json'}")


if __name__ == "__main__":
    main()
