"""Length-penalized RL on the verbose SFT model: how much shorter, at what accuracy, and how fast?

Starts every run from the SFT warm start (`recipes/sft_reasoning.yaml`: kvtrain-ref fine-tuned on
chains of thought that re-check themselves 0-4 times, accurate but verbose), runs each RL recipe for
the same number of steps, and evaluates every model greedily on held-out problems (a seed no recipe
trains or validates on): accuracy, mean completion length, truncation and KV bytes per answer.
`dler_kivi2` trained under a 2-bit cache is evaluated under that cache, beside the SFT model under
the same cache (its baseline) and DLER trained in full precision.

Held-out problems come from the task's test split, which is disjoint from every training and
validation set by construction (a hash of each problem decides its split). Each accuracy difference
to the SFT model comes with its paired standard error over the same problems. KV bytes per answer are
measured: each answer's prompt and completion in a real cache of its own, in the model's dtype.

The peer: TRL's GRPOTrainer and kvtrain's GRPOModule with the same model, prompts, reward (DLER's
truncation reward), group size, budget, batch-std advantages, token-mean loss, clip-higher, learning
rate and steps (no dynamic sampling: TRL has none), in two processes that take turns step by step
(one trains while the other waits, so neither shares the CPU with the other), with the timestamps of
every step: held-out length and accuracy, and the median seconds per step with their ratio.

Each run's result lands in OUT/<run>/result.json as soon as it is finished; a rerun skips finished
runs (--fresh redoes them) and resumes an interrupted fit from its last checkpoint, so the runs can
be split over processes (--only) and the report assembled by a last plain call.

    python bench/rl_length.py                                   # all runs, then the report
    python bench/rl_length.py --only dler grpo_lambda           # a subset (e.g. one per core)
    python bench/rl_length.py --smoke --sft <model folder>      # CI: 2 steps, 16 problems
    python bench/rl_length.py --sft smollm2-135m --recipes dler_smollm2 --no-peer --steps 20 \
        --eval-size 100 --out bench/results/smollm2/rl_length   # the real instruct model, no SFT

The held-out problems are asked as the recipes ask theirs (recipes/dler_smollm2.yaml: one or two
operations, in the model's chat template with an instruction), so the recipes of one call must agree.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from transformers import TrainerCallback

from bench_utils import environment

from kvtrain.callbacks import ExportPretrained, KVQuantCallback, StepTime
from kvtrain.cli import KVTrainCLI, recipe_path
from kvtrain.data.tasks import TaskDataModule, arithmetic_problems, in_chat, is_correct
from kvtrain.eval import answer_accuracy, format_table, write_json
from kvtrain.kv import KVQuantSpec
from kvtrain.models import SMOLLM2, load_model, load_tokenizer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

RECIPES = ("dler", "grpo_lambda", "drpo", "dler_kivi2")
PEER_RUNS = ("kvtrain_trl_settings", "trl")
HELD_OUT_SEED = 4321  # draws from the task's test split, which no recipe trains or validates on
COMPRESSED = "dler_kivi2"  # its recipe's KV spec is the compressed cache every "2-bit" row uses


# -- taking turns -------------------------------------------------------------------------------
class Baton:
    """Two processes that train in turns: side `me` runs a step only while it holds the turn, so the
    two never share the CPU while timed. A side that has finished training hands the turn over for
    good, then waits for the other to finish before its (untimed) evaluation."""

    def __init__(self, ctx):
        self.cond, self.turn, self.done = ctx.Condition(), ctx.Value("i", 0), ctx.Array("i", 2)

    def acquire(self, me: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn.value == me or self.done[1 - me])

    def release(self, me: int) -> None:
        with self.cond:
            self.turn.value = 1 - me
            self.cond.notify_all()

    def finish(self, me: int) -> None:
        with self.cond:
            self.done[me] = 1
            self.turn.value = 1 - me
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.done[1 - me])


class Turns:
    """Holds the baton around every training step of one side (a validation runs at the start of the
    turn of the step after it); records each step's wall-clock (start, end) as Unix timestamps."""

    def __init__(self, baton: Baton, me: int):
        self.baton, self.me, self.stamps = baton, me, []

    def begin(self) -> None:
        self.baton.acquire(self.me)
        self.stamps.append([time.time()])

    def end(self) -> None:
        self.stamps[-1].append(time.time())
        self.baton.release(self.me)


class LightningTurns(L.Callback):
    def __init__(self, turns: Turns):
        self.turns = turns

    def on_train_batch_start(self, *args, **kwargs):
        self.turns.begin()

    def on_train_batch_end(self, *args, **kwargs):
        self.turns.end()

    def on_validation_start(self, *args, **kwargs):  # validate in our turn, then take our step in it too
        self.turns.baton.acquire(self.turns.me)


class TrainerTurns(TrainerCallback):
    def __init__(self, turns: Turns):
        self.turns = turns

    def on_step_begin(self, *args, **kwargs):
        self.turns.begin()

    def on_step_end(self, *args, **kwargs):
        self.turns.end()


# -- runs ---------------------------------------------------------------------------------------
def fit_recipe(recipe: str, sft: str, out: Path, overrides: list[str], turns: Turns | None = None) -> dict:
    """Fit a recipe from the SFT model into out/; returns the exported folder and the step times."""
    args = ["--config", str(recipe_path(f"{recipe}.yaml")), f"--model.init_args.model={sft}", *overrides]
    cli = KVTrainCLI(args=args, run=False)
    trainer = cli.trainer
    if turns is not None:  # first, so that StepTime starts its clock after the wait for the turn
        trainer.callbacks.insert(0, LightningTurns(turns))
    for cb in trainer.callbacks:  # keep each run's files under out/
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(out / "checkpoints")
        if isinstance(cb, ExportPretrained):
            cb.to = str(out / "model")
    trainer.loggers = [CSVLogger(out, name="", version="")]
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, StepTime))
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    return {"model": str(out / "model"), "step_s": timer.seconds, **stamps(turns)}


def stamps(turns: Turns | None) -> dict:
    return {} if turns is None else {"step_stamps": turns.stamps}


def held_out_problems(args) -> list:
    """The held-out problems, asked as the runs' recipes ask theirs (operations per problem, chat template
    and instruction): the recipes must agree on it."""
    asked = {task_format(name) for name in args.recipes}
    if len(asked) > 1:
        sys.exit(f"the recipes {args.recipes} ask the task differently ({sorted(asked)}): run them separately")
    operations, chat, instruction = asked.pop()
    problems = arithmetic_problems(args.eval_size, seed=HELD_OUT_SEED, split=args.eval_split, operations=operations)
    return in_chat(problems, load_tokenizer(args.sft), instruction) if chat else problems


def task_format(recipe: str) -> tuple[tuple[int, int], bool, str]:
    data = TaskDataModule(**yaml.safe_load(recipe_path(f"{recipe}.yaml").read_text())["data"]["init_args"])
    return data.operations, data.chat, data.instruction


def recipe_settings(recipe: str) -> dict:
    """The recipe's GRPOModule and data arguments (`seed` is the data's: it draws the problems): the
    peer gets exactly these."""
    config = yaml.safe_load(recipe_path(f"{recipe}.yaml").read_text())
    return {**config["model"]["init_args"], **config["data"]["init_args"], "seed_everything": config["seed_everything"]}


def fit_trl(sft: str, settings: dict, steps: int, out: Path, turns: Turns | None = None) -> dict:
    """TRL's GRPOTrainer with the recipe's settings and DLER's truncation reward."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from kvtrain.rl import truncation_penalty

    tokenizer, budget = load_tokenizer(sft), settings["max_new_tokens"]

    def dler_reward(prompts, completions, completion_ids, answer, **_):
        correct = torch.tensor([is_correct(c, a) for c, a in zip(completions, answer)])
        truncated = torch.tensor([len(ids) >= budget and ids[-1] != tokenizer.eos_token_id for ids in completion_ids])
        return truncation_penalty(correct, truncated, settings["reward"]["truncation_factor"]).tolist()

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    problems = arithmetic_problems(settings["train_size"], seed=settings["seed"], split="train")
    data = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    config = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=steps, seed=settings["seed_everything"],
        per_device_train_batch_size=settings["batch_size"] * settings["num_generations"],
        num_generations=settings["num_generations"], max_completion_length=budget,
        temperature=settings["temperature"], top_p=1.0, learning_rate=settings["lr"], lr_scheduler_type="constant",
        max_grad_norm=settings["grad_clip"], epsilon=settings["eps_low"], epsilon_high=settings["eps_high"],
        scale_rewards="batch", loss_type="dapo", beta=0.0,  # dapo: token mean over the batch, as ours
        use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,  # fp32, as ours
        logging_steps=1, save_strategy="no", report_to="none",
    )
    timer = Timer()
    callbacks = ([TrainerTurns(turns)] if turns is not None else []) + [timer]  # the turn first, then the clock
    trainer = GRPOTrainer(model=load_model(sft), reward_funcs=dler_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=callbacks)
    trainer.train()
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"model": str(out / "model"), "step_s": timer.seconds, **stamps(turns)}


# -- evaluation ---------------------------------------------------------------------------------
def evaluate(path: str, problems: list, spec: KVQuantSpec | None, max_new_tokens: int, batch_size: int, label: str) -> dict:
    model, tokenizer = load_model(path), load_tokenizer(path)
    return answer_accuracy(model, tokenizer, problems, max_new_tokens, batch_size, spec=spec, desc=label,
                           kv_bytes=True)


def run_one(name: str, args, out: Path, problems: list, turns: tuple | None = None) -> dict:
    """Train (unless it is the SFT start) and evaluate one run; its result.json makes it resumable.
    `turns` (baton, side): train in turns with another process (the peer pair)."""
    result_file = out / name / "result.json"
    if result_file.is_file() and not args.fresh:
        return json.loads(result_file.read_text())
    if args.fresh and (out / name).exists():
        shutil.rmtree(out / name)
    torch.set_num_threads(args.threads)
    side = Turns(*turns) if turns else None
    trained = train(name, args, out / name, side)
    if turns:
        turns[0].finish(turns[1])
    compressed = compressed_spec(args)
    evals = {"full precision": None}
    if name == "sft" or name.startswith("dler"):  # the start and every DLER run, also under the 2-bit cache
        evals["2-bit (dler_kivi2's spec)"] = compressed
    result = {"run": name, "step_s": trained["step_s"], "step_stamps": trained.get("step_stamps"),
              "env": environment(), "evals": {}}
    for kv, spec in evals.items():
        result["evals"][kv] = evaluate(trained["model"], problems, spec, args.max_new_tokens, args.eval_batch_size,
                                       f"{name} / {kv}")
    write_json(result_file, result)
    return result


def train(name: str, args, out: Path, turns: Turns | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if name == "sft":
        return {"model": args.sft, "step_s": []}
    steps = [f"--trainer.max_steps={args.steps}", *args.override]
    if name not in PEER_RUNS:
        return fit_recipe(name, args.sft, out, steps)
    settings = peer_settings(args)
    if name == "trl":
        return fit_trl(args.sft, settings, args.steps, out, turns)
    # kvtrain with exactly the settings TRL gets
    matched = [f"--model.init_args.{k}={settings[k]}" for k in ("num_generations", "max_new_tokens", "lr")]
    matched += [f"--data.init_args.batch_size={settings['batch_size']}", "--model.init_args.advantage=batch",
                "--model.init_args.dynamic_sampling=false"]
    return fit_recipe("dler", args.sft, out, [*steps, *matched], turns)


def run_peer_pair(args, out: Path, problems: list) -> None:
    """Ours with TRL's settings and TRL, in two processes that train in turns, step by step."""
    todo = [n for n in PEER_RUNS if args.fresh or not (out / n / "result.json").is_file()]
    if len(todo) == 1:  # one side is done: no turns to take
        run_one(todo[0], args, out, problems)
    if len(todo) < 2:
        return
    ctx = multiprocessing.get_context("spawn")
    baton = Baton(ctx)
    load = os.getloadavg()
    procs = [ctx.Process(target=run_one, args=(name, args, out, problems, (baton, side)))
             for side, name in enumerate(PEER_RUNS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [n for n, p in zip(PEER_RUNS, procs) if p.exitcode]
    if failed:
        sys.exit(f"the peer pair failed: {failed}")
    write_json(out / "peer_pair.json", {"load_average_at_start": load, "order": list(PEER_RUNS)})


def peer_settings(args) -> dict:
    settings = recipe_settings("dler")
    if args.smoke:
        settings.update(SMOKE_SETTINGS)
    return settings


def compressed_spec(args) -> KVQuantSpec:
    callbacks = yaml.safe_load(recipe_path(f"{COMPRESSED}.yaml").read_text())["trainer"]["callbacks"]
    init = next(cb["init_args"] for cb in callbacks if cb["class_path"].endswith("KVQuantCallback"))
    return KVQuantCallback(**init).spec


# -- report -------------------------------------------------------------------------------------
def paired_se(a: list[bool], b: list[bool]) -> float:
    """Standard error of mean(a) - mean(b) over the same problems (sd of the per-problem differences / sqrt n)."""
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    return statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")


def report(results: dict[str, dict], out: Path, start: str = "sft") -> str:
    """`start`: how the starting model's rows are labelled."""
    sft = results["sft"]["evals"]
    rows = []
    for name, result in results.items():
        for kv, ev in result["evals"].items():
            base = sft[kv]
            rows.append({
                "run": start if name == "sft" else name, "kv cache at eval": kv, "accuracy": round(100 * ev["accuracy"], 1),
                "accuracy_vs_sft": f"{100 * (ev['accuracy'] - base['accuracy']):+.1f} "
                                   f"± {100 * paired_se(ev['correct'], base['correct']):.1f}",
                "length": round(ev["length"], 1), "length_vs_sft": f"{100 * (ev['length'] / base['length'] - 1):+.1f}%",
                "truncated": round(ev["truncated"], 3), "kv_bytes_per_answer": round(ev["kv_bytes_per_answer"]),
                "step_s": round(statistics.median(result["step_s"]), 2) if result["step_s"] else "",
            })
    columns = list(rows[0])
    lines = [format_table([r for r in rows if r["run"] not in PEER_RUNS], columns)]
    if all(name in results for name in PEER_RUNS):
        lines += ["", *peer_lines(results), "", format_table([r for r in rows if r["run"] in PEER_RUNS], columns)]
    lines += ["", *verdicts(results)]
    plot_lengths(results, out / "rl_length.png", start)
    return "\n".join(lines)


def peer_lines(results: dict[str, dict]) -> list[str]:
    ours, peer = (results[n] for n in PEER_RUNS)
    ratio = statistics.median(ours["step_s"]) / statistics.median(peer["step_s"])
    ev_ours, ev_peer = ours["evals"]["full precision"], peer["evals"]["full precision"]
    diff = 100 * (ev_ours["accuracy"] - ev_peer["accuracy"])
    lines = [f"Same settings as TRL (DLER reward, batch-std advantages, no dynamic sampling), same steps; "
             f"time per step median, ours / TRL = **{ratio:.3f}**; accuracy ours - TRL {diff:+.1f} "
             f"± {100 * paired_se(ev_ours['correct'], ev_peer['correct']):.1f} points (paired s.e.)."]
    stamps_ours, stamps_peer = ours.get("step_stamps"), peer.get("step_stamps")
    if stamps_ours and stamps_peer:
        spans = sorted([(a, b, "ours") for a, b in stamps_ours] + [(a, b, "trl") for a, b in stamps_peer])
        overlap = sum(max(0.0, prev[1] - nxt[0]) for prev, nxt in zip(spans, spans[1:]))
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(spans[0][0]))
        lines.append(f"The two trained in turns, one step each in alternation ({len(stamps_ours)} + {len(stamps_peer)} "
                     f"steps from {start} UTC over {(spans[-1][1] - spans[0][0]) / 60:.1f} min; overlap of timed "
                     f"steps {overlap:.2f} s); per-step timestamps in each run's result.json.")
    return lines


def verdicts(results: dict[str, dict]) -> list[str]:
    """The issue's bar for DLER: length at least 50% shorter, accuracy at most 2 points lower."""
    lines = []
    for name in [n for n in results if n.startswith("dler")]:
        for kv, ev in results[name]["evals"].items():
            base = results["sft"]["evals"][kv]
            cut = 1 - ev["length"] / base["length"]
            drop = round(100 * (base["accuracy"] - ev["accuracy"]), 9)  # 100 * (0.23 - 0.21) is 2.0000000000000018
            ok = cut >= 0.5 and drop <= 2.0
            lines.append(f"- {name} / {kv}: length cut {100 * cut:.1f}% (>= 50%), accuracy {-drop:+.1f} points "
                         f"(>= -2): {'meets' if ok else 'MISSES'} the bar")
    return lines


def plot_lengths(results: dict[str, dict], path: Path, start: str = "sft") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(max(r["evals"]["full precision"]["lengths"]) for r in results.values())
    for name, result in results.items():
        ax.hist(result["evals"]["full precision"]["lengths"], bins=range(0, int(top) + 8, 4), histtype="step",
                linewidth=1.5, label=start if name == "sft" else name)
    ax.set(xlabel="completion length (tokens), held-out problems, greedy", ylabel="problems",
           title=f"Answer length before ({start}) and after length-penalized RL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SMOKE_SETTINGS = {"batch_size": 2, "num_generations": 4, "max_new_tokens": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="runs/sft_reasoning/model",
                        help=f"the starting model: the SFT warm start (a model folder), or {SMOLLM2}")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES),
                        help="the RL recipes to run from it (e.g. dler_smollm2 from smollm2-135m)")
    parser.add_argument("--steps", type=int, default=40, help="RL steps of every run")
    parser.add_argument("--eval-size", type=int, default=500, help="held-out problems")
    parser.add_argument("--eval-split", default="test", choices=("val", "test"),
                        help="the task split to evaluate on: choose settings on val, report on test")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="evaluation budget (the SFT chains fit)")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--only", nargs="+",
                        help="run just these (either peer run runs the pair, in turns)")
    parser.add_argument("--no-peer", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the same for ours and TRL)")
    parser.add_argument("--out", default="bench/results/rl_length")
    parser.add_argument("--fresh", action="store_true", help="redo finished runs")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 16 problems, tiny batches: for CI")
    parser.add_argument("--override", action="append", default=[], help="recipe override for every kvtrain run")
    args = parser.parse_args()
    unknown = sorted(set(args.only or []) - {"sft", *args.recipes, *PEER_RUNS})
    if unknown:
        parser.error(f"--only {unknown}: choose from sft, {', '.join(args.recipes)}, {', '.join(PEER_RUNS)}")
    if args.sft != SMOLLM2 and not Path(args.sft).is_dir():
        sys.exit(f"no SFT model at {args.sft}: run `kvtrain fit --config recipes/sft_reasoning.yaml` first, or pass --sft")
    if args.smoke:
        args.steps, args.eval_size, args.max_new_tokens = 2, 16, 24
        args.override += [f"--data.init_args.{k}={v}" for k, v in SMOKE_SETTINGS.items() if k == "batch_size"]
        args.override += [f"--model.init_args.{k}={v}" for k, v in SMOKE_SETTINGS.items() if k != "batch_size"]
        args.override += ["--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                          "--trainer.enable_progress_bar=false"]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    problems = held_out_problems(args)
    if args.only:  # no report: another process may be running the other runs
        for name in args.only:
            if name not in PEER_RUNS:
                run_one(name, args, out, problems)
        if set(PEER_RUNS) & set(args.only):
            run_peer_pair(args, out, problems)
        return
    results = {name: run_one(name, args, out, problems) for name in ["sft", *args.recipes]}
    if not args.no_peer:
        run_peer_pair(args, out, problems)
        results.update({name: run_one(name, args, out, problems) for name in PEER_RUNS})
    markdown = report(results, out, start="sft" if Path(args.sft).is_dir() else args.sft)
    header = (f"Held-out: {args.eval_size} arithmetic problems of the task's {args.eval_split} split (disjoint from every "
              f"training{' and validation' if args.eval_split == 'test' else ''} set by construction; seed "
              f"{HELD_OUT_SEED}), greedy, budget "
              f"{args.max_new_tokens} tokens; every RL run {args.steps} steps from {args.sft}; "
              f"{args.threads} torch thread(s); Python {environment()['python']}. accuracy in %, accuracy_vs_sft "
              f"in points ± its paired standard error, length in tokens, kv_bytes_per_answer: mean over answers of "
              f"each answer's measured cache (prompt + completion, fp32 model).\n\n")
    (out / "rl_length.md").write_text(header + markdown + "\n")
    write_json(out / "rl_length.json", {"args": vars(args), "env": environment(), "results": results})
    print(header + markdown)


if __name__ == "__main__":
    main()
