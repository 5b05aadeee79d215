"""Verifiable tasks: the arithmetic generator's chains of thought are right, answer extraction, JSONL."""

import json
import random

import pytest
import torch

from kvtrain.data.tasks import arithmetic_problems, extract_answer, is_correct, load_jsonl
from kvtrain.data.tasks.arithmetic import make_problem


def test_arithmetic_problems_are_deterministic_and_correct():
    problems = arithmetic_problems(200, seed=3)
    assert problems == arithmetic_problems(200, seed=3)
    assert problems != arithmetic_problems(200, seed=4)
    for p in problems:
        expression = p.prompt.removeprefix("Compute ").strip().rstrip(".")
        assert str(eval(expression)) == p.answer, p  # the prompt's expression evaluates to the answer
        assert is_correct(p.solution, p.answer)
        for line in p.solution.splitlines()[:-1]:  # every step and re-check line is true arithmetic
            lhs, rhs = line.removeprefix("Check: ").removesuffix(". Correct.").split(" = ")
            assert eval(lhs) == int(rhs), line


def test_operations_per_problem_are_a_range():
    counts = {p.solution.count(" = ") - p.solution.count("Check:") for p in arithmetic_problems(300, seed=1, operations=(1, 2))}
    assert counts == {1, 2}  # one line per operation (re-check lines also hold " = ")
    assert {p.prompt.count("(") for p in arithmetic_problems(100, seed=1, operations=(3, 3))} == {2}
    assert arithmetic_problems(50, seed=5) == arithmetic_problems(50, seed=5, operations=(2, 4))  # the default draw
    with pytest.raises(ValueError, match=r"1 <= least <= most, got \(2, 1\)"):
        arithmetic_problems(1, operations=(2, 1))


def test_problems_in_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from kvtrain.data.tasks import TaskDataModule, in_chat
    from kvtrain.models import load_tokenizer

    tok = load_tokenizer("kvtrain-ref")
    with pytest.raises(ValueError, match="has no chat template"):
        in_chat(arithmetic_problems(1), tok)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    (problem,) = arithmetic_problems(1, seed=2)
    (asked,) = in_chat([problem], tok, 'End with "The answer is N."')
    assert asked.prompt == f'<user>{problem.prompt.strip()} End with "The answer is N."<a>'
    assert (asked.answer, asked.solution) == (problem.answer, problem.solution)
    tok.save_pretrained(tmp_path / "tok")
    data = TaskDataModule(train_size=4, val_size=2, tokenizer=str(tmp_path / "tok"), chat=True, instruction="Go.")
    assert all(p.prompt.startswith("<user>Compute ") and p.prompt.endswith(". Go.<a>") for p in data.dataset("val").problems)
    with pytest.raises(ValueError, match="set chat=True"):
        TaskDataModule(instruction="Go.")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template == tok.chat_template


def test_chains_of_thought_are_verbose_at_random():
    rechecks = [p.solution.count("Check:") for p in arithmetic_problems(500, seed=0)]
    assert min(rechecks) == 0 and max(rechecks) == 4
    assert 1.8 < sum(rechecks) / len(rechecks) < 2.2  # uniform 0..4: mean 2
    assert all(p.solution.count("Check:") == 0 for p in arithmetic_problems(50, seed=0, max_rechecks=0))
    assert make_problem(random.Random(0)).solution.endswith("\n")


@pytest.mark.parametrize(("text", "answer"), [
    ("so the total is 12.\n#### 1,234", "1234"), (r"thus \boxed{ -7 } done", "-7"), ("Answer: 42\n", "42"),
    ("Answer: 1\nAnswer: 2", "2"), (r"#### 5 and later \boxed{6}", "6"), ("no number here", None),
    ("5 * 3 = 15\n\nThe answer is 15.", "15"), ("the answer is -2, so Answer: 3", "3"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_is_correct_compares_numbers():
    assert is_correct("Answer: 3.0", "3") and is_correct("#### 1,000", "1000")
    assert not is_correct("Answer: 4", "3") and not is_correct("I give up", "3")


def test_load_jsonl(tmp_path):
    path = tmp_path / "tasks.jsonl"
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "Janet has...", "answer": "She has 3 + 4 = 7.\n#### 7"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = load_jsonl(path)
    assert [(p.prompt, p.answer) for p in problems] == [("1+1?", "2"), ("Janet has...", "7")]
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"tasks.jsonl:1 lacks \['prompt'\]"):
        load_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no problems"):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError, match="no task file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_sft_batches_put_the_loss_on_the_chain_of_thought_only(home):
    from kvtrain.data.tasks import TaskDataModule
    from kvtrain.data.tasks.datamodule import SFTCollator
    from kvtrain.loss import next_token_nll
    from kvtrain.models import load_tokenizer

    tok = load_tokenizer("kvtrain-ref")
    data = TaskDataModule(format="sft", train_size=8, batch_size=4, seed=0)
    rows = [data.dataset("train")[i] for i in range(4)]
    batch = SFTCollator(tok, max_len=256)(rows)
    for i, row in enumerate(rows):
        n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert tok.decode(ids[:n_prompt]) == row["prompt"]
        target = batch["input_ids"][i][batch["loss_mask"][i].bool()].tolist()
        assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]) == row["solution"]
    # the loss counts exactly the solution tokens and EOS
    logits = torch.zeros(*batch["input_ids"].shape, len(tok))
    _, n = next_token_nll(logits, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert n == batch["loss_mask"].sum()
    short = SFTCollator(tok, max_len=8)(rows)
    assert short["input_ids"].shape[1] == 8


def test_sft_format_needs_solutions(tmp_path):
    from kvtrain.data.tasks import TaskDataModule

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="format='sft' needs a solution for every problem"):
        TaskDataModule(task=str(path), format="sft")._collate()


def test_answer_accuracy_scores_greedy_completions_in_batches(monkeypatch):
    import kvtrain.rl.rollout as rollout
    from kvtrain.eval import answer_accuracy
    from kvtrain.rl.rollout import Rollouts

    completions = {"a?": ("x\nAnswer: 5\n", 4, False), "b?": ("#### 7", 2, False), "c?": ("Check: 1", 6, True)}
    calls = []

    def fake_sample(model, tokenizer, prompts, num_generations, max_new_tokens, temperature, spec=None):
        calls.append((list(prompts), temperature, spec))
        texts, lengths, truncated = zip(*(completions[p] for p in prompts))
        mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
        empty = torch.zeros(len(prompts), 6)
        return Rollouts(empty, empty, empty.long(), mask, empty, torch.tensor(truncated), list(texts))

    monkeypatch.setattr(rollout, "sample", fake_sample)
    model = torch.nn.Linear(1, 1)
    problems = [{"prompt": "a?", "answer": "5"}, {"prompt": "b?", "answer": "8"}, {"prompt": "c?", "answer": "1"}]
    result = answer_accuracy(model, None, problems, max_new_tokens=6, batch_size=2, spec="kivi2")
    assert calls == [(["a?", "b?"], 0.0, "kivi2"), (["c?"], 0.0, "kivi2")]  # greedy, under the spec, batched
    assert result["correct"] == [True, False, False] and result["accuracy"] == pytest.approx(1 / 3)
    assert result["lengths"] == [4, 2, 6] and result["length"] == 4.0 and result["truncated"] == pytest.approx(1 / 3)
    assert model.training  # restored
    with pytest.raises(ValueError, match="no problems"):
        answer_accuracy(model, None, [])


def test_task_splits_are_disjoint_by_construction():
    from kvtrain.data.tasks.arithmetic import problem_split

    draws = {split: arithmetic_problems(300, seed=7, split=split) for split in ("train", "val", "test")}
    for split, problems in draws.items():
        assert all(problem_split(p) == split for p in problems)
    prompts = {split: {p.prompt for p in problems} for split, problems in draws.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    with pytest.raises(ValueError, match="split must be one of"):
        arithmetic_problems(1, split="held-out")


def _recipe_task_data(path):
    import yaml

    config = yaml.safe_load(path.read_text())
    data = config.get("data", {})
    if not data.get("class_path", "").endswith("TaskDataModule"):
        return None
    return data.get("init_args", {})


def test_no_held_out_prompt_occurs_in_any_training_stream():
    # Every recipe's training problems (the SFT warm start and each RL pool) against the held-out sets the
    # benchmark and the notebook evaluate on and the validation problems of every recipe.
    from pathlib import Path

    from kvtrain.data.tasks import TaskDataModule

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    # the problems as drawn (a chat recipe only wraps each prompt in its template afterwards)
    modules = [TaskDataModule(**{**args, "chat": False, "instruction": ""})
               for args in filter(None, map(_recipe_task_data, recipes))]
    modules = [m for m in modules if m.task == "arithmetic"]
    assert len(modules) >= 6  # sft_reasoning, dler, grpo_lambda, drpo, dler_kivi2, dler_smollm2
    trained = {p.prompt for m in modules for p in m.dataset("train").problems}
    held_out = {p.prompt for m in modules  # bench/rl_length.py, asked as each recipe asks
                for p in arithmetic_problems(500, seed=4321, split="test", operations=m.operations)}
    validated = {p.prompt for m in modules for p in m.dataset("val").problems}
    assert len(trained) > 5000 and len(held_out) > 300
    assert not trained & held_out and not trained & validated
    # the old draw (another seed of the same distribution) shared 38% of these prompts with training
    old = {p.prompt for p in _unsplit_draw(500, 4321)}
    assert len(old & trained) > 100


def _unsplit_draw(n, seed):
    import random

    from kvtrain.data.tasks.arithmetic import make_problem

    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def test_jsonl_validation_set_must_not_repeat_training_prompts(tmp_path):
    from kvtrain.data.tasks import TaskDataModule

    rows = [{"prompt": f"{a} + {a}?", "answer": str(2 * a)} for a in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:] + [{"prompt": "9?", "answer": "9"}]))
    data = TaskDataModule(task=str(tmp_path / "train.jsonl"), val_task=str(tmp_path / "val.jsonl"))
    with pytest.raises(ValueError, match="2 of the 3 prompts of val_task"):
        data.dataset("val")


def test_recall_prompts_are_deterministic_disjoint_and_three_tokens_a_line(home):
    from kvtrain.data.corpus import split_of
    from kvtrain.data.tasks.arithmetic import HELD_OUT_PERCENT
    from kvtrain.data.tasks.recall import NAMES, NEEDLE, NEEDLE_WORDS, WORDS, recall_problems
    from kvtrain.models import load_tokenizer

    assert len(set(NAMES)) == len(NAMES) == 127 and not set(NAMES) & set(WORDS)
    problems = recall_problems(50, seed=2, pairs=16)
    assert problems == recall_problems(50, seed=2, pairs=16) != recall_problems(50, seed=3, pairs=16)
    tokenizer = load_tokenizer("kvtrain-ref")
    for p in problems:
        *lines, asked = p.prompt.split("\n")
        table = dict(line.split(" ") for line in lines)
        assert len(table) == 16 and table[asked] == p.answer and p.solution == f" {p.answer}"
        assert len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"]) == 3 * 16 + 1
        assert tokenizer(p.solution, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("Ġ" + p.answer)]
    draws = {split: {p.prompt for p in recall_problems(200, seed=1, split=split)} for split in ("train", "val", "test")}
    assert all(split_of(prompt, HELD_OUT_PERCENT) == split for split, prompts in draws.items() for prompt in prompts)
    assert not draws["train"] & draws["val"] and not draws["train"] & draws["test"] and not draws["val"] & draws["test"]
    with pytest.raises(ValueError, match=r"pairs must be in 1..127 \(the distinct names\), got 128"):
        recall_problems(1, pairs=128)
    assert not set(NEEDLE_WORDS) & (set(WORDS) | set(NAMES)) and NEEDLE not in NAMES
    for p in recall_problems(20, seed=4, pairs=16, needle=True):
        *lines, end = p.prompt.split("\n")
        table = dict(line.split(" ") for line in lines)
        assert end == "" and p.solution == f"{NEEDLE} {p.answer}" and table[NEEDLE] == p.answer in NEEDLE_WORDS
        assert sum(word in NEEDLE_WORDS for word in table.values()) == 1  # the needle's word is in no other line
    train = recall_problems(4, seed=5, pairs=6, queries=3)
    assert all(p.solution.count("\n") == 2 and p.solution.startswith(f" {p.answer}\n") for p in train)
