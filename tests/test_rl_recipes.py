"""The RL recipes as shipped, through LightningCLI, on a tiny random model: each one trains with its
own reward, advantage, loss and KV cache, logs, checkpoints and exports; the DLER pipeline raises a
learnable reward; bench/rl_length.py runs end to end at smoke size against TRL."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from kvtrain.cli import KVTrainCLI
from kvtrain.kv import KVQuantSpec
from kvtrain.models import load_model

# head_dim 32, so the kivi value groups of 32 channels fit (TINY's head_dim is 16)
TINY_RL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
BUDGET = 12


@pytest.fixture(scope="module")
def tiny_rl_model_dir(tmp_path_factory, home):
    from kvtrain.models import load_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-rl-llama")
    load_model("kvtrain-ref", init="random", config_overrides=TINY_RL).save_pretrained(str(path))
    load_tokenizer("kvtrain-ref").save_pretrained(str(path))
    return path


def fit_recipe(recipe, tmp_path, monkeypatch, steps, edits=(), **model):
    """Fit `recipe` tiny (`edits`: (old, new) text replacements in its YAML, for settings nested in a list)."""
    monkeypatch.chdir(tmp_path)  # the recipe's runs/ land here
    config = REPO / "recipes" / recipe
    if edits:
        text = config.read_text()
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new)
        config = tmp_path / recipe
        config.write_text(text)
    args = ["--config", str(config), "--model.init_args.model=kvtrain-ref",
            "--model.init_args.init=random", f"--model.init_args.config_overrides={json.dumps(TINY_RL)}",
            f"--model.init_args.max_new_tokens={BUDGET}", *[f"--model.init_args.{k}={v}" for k, v in model.items()],
            f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--data.init_args.train_size=64",
            "--data.init_args.val_size=4", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4"]
    torch.manual_seed(0)
    cli = KVTrainCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    name = recipe.removesuffix(".yaml")
    rows = list(csv.DictReader((tmp_path / "runs" / name / "version_0" / "metrics.csv").open()))
    return cli, rows, tmp_path / "runs" / name


def series(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dler.yaml", "grpo_lambda.yaml", "drpo.yaml", "dler_kivi2.yaml", "dler_h2o.yaml"])
def test_rl_recipe_runs_tiny_logs_checkpoints_and_exports(recipe, tmp_path, monkeypatch, home):
    # tiny answers hold fewer than dler_h2o's 48 tokens: it keeps 8, deciding every 4 tokens
    edits = [("budget: 48, interval: 16", "budget: 8, interval: 4")] if recipe == "dler_h2o.yaml" else []
    with pytest.warns(UserWarning, match="hit max_new_tokens"):  # a random model never stops: named, not silent
        cli, rows, run = fit_recipe(recipe, tmp_path, monkeypatch, steps=4, edits=edits)
    lengths = series(rows, "train/length")
    assert len(lengths) == 4 and all(0 < n <= BUDGET for n in lengths)
    assert len(series(rows, "time/step_s")) == 4 and min(series(rows, "time/step_s")) > 0
    assert series(rows, "train/accuracy") == [0.0] * 4  # random weights do not do arithmetic
    assert series(rows, "train/reward") == [0.0] * 4
    # every group is flat, so no recipe may move the policy: zero advantages (DRPO: no group with both kinds
    # of answer) make the loss exactly 0; and the first importance ratio is 1 (the training forward sees the
    # K/V the rollout's cache held, 2-bit for dler_kivi2, the survivors of H2O's decisions for dler_h2o), so
    # nothing is clipped
    assert series(rows, "train/loss") == [0.0] * 4
    assert series(rows, "train/clip_fraction") == [0.0] * 4
    assert len(series(rows, "val/accuracy")) == 1 and 0 < series(rows, "val/length")[0] <= BUDGET  # greedy
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "model" / "config.json").is_file()
    hparams = cli.model.hparams
    if recipe == "dler.yaml":
        assert (hparams.advantage, hparams.reward["truncation_factor"], hparams.dynamic_sampling) == ("dler", 0.0, True)
        # every group is flat (all 0): both extra generation rounds are spent, every group dropped each round
        assert series(rows, "train/resampled_rounds") == [2.0] * 4 and series(rows, "train/dropped_groups") == [12.0] * 4
    if recipe == "grpo_lambda.yaml":
        assert (hparams.advantage, hparams.reward["grpo_lambda"], hparams.reward["lambda_alpha"]) == ("group", 0.5, 0.6)
    if recipe == "drpo.yaml":
        assert (hparams.loss, hparams.drpo_temperature, hparams.drpo_tau) == ("drpo", 0.1, 10.0)
    if recipe == "dler_h2o.yaml":  # every 4 tokens H2O keeps 8 of each head's tokens
        from kvtrain.kv import resolve_spec

        spec = resolve_spec(str(run / "model"))
        assert (spec.eviction.selector, spec.eviction.budget, spec.eviction.interval) == ("h2o", 8, 4)
        # prompt + BUDGET tokens (> 11), 8 to 8 + 3 held after the last decision, each over 2 layers x 1 KV head x
        # (K and V of 32 fp32 dims + an int32 position + an fp32 accumulated score) = 2 x 264 bytes
        measured = series(rows, "train/kv_bytes_per_answer")[0]
        assert 2 * 264 * 8 <= measured <= 2 * 264 * 11
    if recipe == "dler_kivi2.yaml":
        spec = KVQuantSpec.resolve(str(run / "model"))  # exported with the model
        assert (spec.key_bits, spec.value_bits, spec.key_group_size, spec.residual) == (2, 2, 16, 16)
        # Each answer's cache holds its prompt + BUDGET tokens (a random model never stops), n < 32 tokens, over
        # 2 layers x 1 KV head x 32 dims: keys all fp32 (no 16-token group is older than the 16-token window
        # yet) = 128 bytes/token; values fp32 in the window, older ones 2-bit + fp16 scale and zero = 12 bytes.
        def expected(n):
            return 2 * (128 * n + 128 * min(n, 16) + 12 * max(0, n - 16))

        tokenizer = cli.model.tokenizer
        prompts = [len(tokenizer(p.prompt, add_special_tokens=False).input_ids)
                   for p in cli.datamodule.dataset("train").problems]
        measured = series(rows, "train/kv_bytes_per_answer")[0]
        assert expected(min(prompts) + BUDGET) <= measured <= expected(max(prompts) + BUDGET)
        # `kvtrain eval` takes the GRPOModule checkpoint (not only CausalLMModule's) with the spec it trained with
        from kvtrain.cli import main

        out = tmp_path / "eval.json"
        main(["eval", f"--model={run / 'checkpoints' / 'last.ckpt'}", "--kv=model", "--seq_len=32", "--max_batches=1",
              "--baseline=false", f"--output={out}"])
        evaluated = json.loads(out.read_text())
        assert [r["kv"] for r in evaluated["rows"]] == ["full precision", "model's spec"]
        assert KVQuantSpec(**evaluated["specs"]["model's spec"]) == spec
        assert evaluated["rows"][1]["kv_bytes_per_token"] < evaluated["rows"][0]["kv_bytes_per_token"]


@pytest.mark.slow
def test_instruct_recipe_asks_in_the_chat_template(tmp_path, monkeypatch, home):
    # recipes/dler_smollm2.yaml on the tiny model, its tokenizer given a chat template (SmolLM2's is ChatML)
    from kvtrain.models import load_tokenizer

    chat = load_tokenizer("kvtrain-ref")
    chat.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    chat.save_pretrained(tmp_path / "chat-tokenizer")
    with pytest.warns(UserWarning, match="hit max_new_tokens"):
        cli, rows, run = fit_recipe("dler_smollm2.yaml", tmp_path, monkeypatch, steps=2,
                                    tokenizer=str(tmp_path / "chat-tokenizer"))
    problems = cli.datamodule.dataset("train").problems + cli.datamodule.dataset("val").problems
    instruction = 'Show your work, then write "The answer is <number>."'
    assert all(p.prompt.startswith("<user>Compute ") and p.prompt.endswith(f". {instruction}<assistant>") for p in problems)
    assert {p.prompt.count("(") for p in problems} == {0, 1}  # one or two operations
    assert (cli.model.hparams.advantage, cli.model.hparams.reward["truncation_factor"]) == ("dler", 0.0)
    assert series(rows, "train/loss") == [0.0] * 2 and series(rows, "train/accuracy") == [0.0] * 2
    assert (run / "model" / "config.json").is_file()


@pytest.mark.slow
def test_hub_template_runs_on_a_local_model_and_user_jsonl(tmp_path, monkeypatch, tiny_rl_model_dir):
    rows = [{"prompt": f"What is {a} + {a}?\n", "answer": f"#### {2 * a}"} for a in range(12)]
    for name, part in (("train.jsonl", rows[:8]), ("test.jsonl", rows[8:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO / "recipes" / "dler_kivi2_hub.yaml"), f"--model.init_args.model={tiny_rl_model_dir}",
            "--model.init_args.max_new_tokens=8", "--model.init_args.lora.r=4", "--trainer.accelerator=cpu",
            "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=4"]
    cli = KVTrainCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = list(csv.DictReader((tmp_path / "runs" / "dler_kivi2_hub" / "version_0" / "metrics.csv").open()))
    assert len(series(metrics, "train/reward")) == 2 and len(series(metrics, "val/accuracy")) == 1
    assert 0 < cli.model.hparams.lora["r"] == 4
    exported = tmp_path / "runs" / "dler_kivi2_hub" / "model"
    assert KVQuantSpec.resolve(str(exported)) == KVQuantSpec.preset("kivi2")
    assert not (exported / "adapter_config.json").exists()  # merged: a plain model folder


@pytest.mark.slow
def test_dler_recipe_raises_a_learnable_reward(tmp_path, monkeypatch, home):
    # The recipe's pipeline (DLER advantages, dynamic sampling, clip-higher) with a reward a random model
    # can learn (the share of digits) and truncation not penalized (nothing stops within 12 tokens).
    _, rows, _ = fit_recipe("dler.yaml", tmp_path, monkeypatch, steps=16, verifier="test_grpo.digit_reward",
                            reward='{"truncation_factor": 1.0}', lr=1e-2)
    reward = series(rows, "train/reward")
    assert len(reward) == 16
    assert sum(reward[-4:]) / 4 > 2 * sum(reward[:4]) / 4, reward


@pytest.mark.slow
def test_rl_length_bench_smoke_reports_every_run_and_trl(tmp_path, tiny_rl_model_dir):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "bench/rl_length.py", "--smoke", f"--sft={tiny_rl_model_dir}", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "rl_length.json").read_text())["results"]
    assert set(report) == {"sft", "dler", "grpo_lambda", "drpo", "dler_kivi2", "kvtrain_trl_settings", "trl"}
    for name, result in report.items():
        fp = result["evals"]["full precision"]
        assert fp["problems"] == 16 and len(fp["lengths"]) == 16 and 0 < fp["length"] <= 24
        assert len(result["step_s"]) == (0 if name == "sft" else 2)
        assert len(fp["kv_bytes"]) == 16 and fp["kv_bytes_per_answer"] == pytest.approx(sum(fp["kv_bytes"]) / 16)
    assert set(report["dler_kivi2"]["evals"]) == {"full precision", "2-bit (dler_kivi2's spec)"}
    two_bit = report["dler_kivi2"]["evals"]["2-bit (dler_kivi2's spec)"]
    assert two_bit["kv_bytes_per_answer"] < report["dler_kivi2"]["evals"]["full precision"]["kv_bytes_per_answer"]
    # the peer pair trained in turns: ours, TRL, ours, TRL, never at the same time
    spans = sorted((a, b, name) for name in ("kvtrain_trl_settings", "trl") for a, b in report[name]["step_stamps"])
    assert [name for _, _, name in spans] == ["kvtrain_trl_settings", "trl"] * 2
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))
    markdown = (out / "rl_length.md").read_text()
    assert "time per step median, ours / TRL" in markdown and "| trl |" in markdown
    assert "trained in turns" in markdown and " ± " in markdown  # paired standard errors
    assert (out / "rl_length.png").stat().st_size > 10_000
    for name in ("dler", "trl"):  # kvtrain's export and TRL's save_pretrained are both plain model folders
        assert load_model(str(out / name / "model")).config.hidden_size == TINY_RL["hidden_size"]


def test_rl_length_asks_held_out_problems_as_the_recipes_do(monkeypatch, tmp_path):
    """bench/rl_length.py draws its held-out problems with the recipes' operations and chat template, and
    refuses recipes that ask differently (their accuracies would not share a held-out set)."""
    from argparse import Namespace

    from kvtrain.models import load_tokenizer

    sys.path.insert(0, str(REPO / "bench"))
    import rl_length

    chat = load_tokenizer("kvtrain-ref")
    chat.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    monkeypatch.setattr(rl_length, "load_tokenizer", lambda name: chat)
    assert rl_length.task_format("dler") == ((2, 4), False, "")
    args = Namespace(recipes=["dler_smollm2"], eval_size=40, eval_split="test", sft="smollm2-135m")
    problems = rl_length.held_out_problems(args)
    assert all(p.prompt.startswith("<user>Compute ") and p.prompt.endswith('"The answer is <number>."<assistant>')
               for p in problems)
    assert {p.prompt.count("(") for p in problems} == {0, 1}  # one or two operations, as the recipe trains
    with pytest.raises(SystemExit, match="ask the task differently"):
        rl_length.held_out_problems(Namespace(recipes=["dler", "dler_smollm2"], eval_size=4, eval_split="test", sft="x"))
