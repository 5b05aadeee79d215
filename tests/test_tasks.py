"""Verifiable tasks: the arithmetic generator's chains of thought are right, answer extraction, JSONL."""

import json
import random

import pytest

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


def test_chains_of_thought_are_verbose_at_random():
    rechecks = [p.solution.count("Check:") for p in arithmetic_problems(500, seed=0)]
    assert min(rechecks) == 0 and max(rechecks) == 4
    assert 1.8 < sum(rechecks) / len(rechecks) < 2.2  # uniform 0..4: mean 2
    assert all(p.solution.count("Check:") == 0 for p in arithmetic_problems(50, seed=0, max_rechecks=0))
    assert make_problem(random.Random(0)).solution.endswith("\n")


@pytest.mark.parametrize(("text", "answer"), [
    ("so the total is 12.\n#### 1,234", "1234"), (r"thus \boxed{ -7 } done", "-7"), ("Answer: 42\n", "42"),
    ("Answer: 1\nAnswer: 2", "2"), (r"#### 5 and later \boxed{6}", "6"), ("no number here", None),
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
