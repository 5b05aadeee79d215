"""A verifiable reasoning task that runs on CPU and has overthinking to remove.

Each problem chains 2-4 operations by default (+ or - by 1-9, * by 2 or 3) on a start in 1-9. Its supervised
chain of thought does one line per step and then re-checks earlier steps ("Check: 3 + 4 = 7.
Correct.") a random 0-4 times: a model fine-tuned on it is accurate but verbose, and every re-check line
is tokens (and KV cache) that a length-penalized RL run can teach it to drop.

Train, validation and test problems are disjoint by construction: a hash of the problem's prompt
(the canonical expression) decides its split, as for corpus documents, and a draw for a split keeps
only that split's problems. Different seeds draw different samples of the same split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvtrain.data.corpus import SPLITS, split_of

OPS = ["+", "-", "*"]
HELD_OUT_PERCENT = 5  # of all problems, each to val and test


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    solution: str = ""  # the supervised chain of thought, ending in "Answer: <answer>"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problem(rng: random.Random, max_rechecks: int = 4, operations: tuple[int, int] = (2, 4)) -> Problem:
    steps = rng.randint(*operations)
    value = rng.randint(1, 9)
    expression, lines = str(value), []
    for _ in range(steps):
        op = rng.choice(OPS)
        # small operands keep results to two digits mostly: learnable by a 5M-parameter model on a CPU
        # budget, so that what RL has to remove is the re-checking, not the arithmetic errors
        operand = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
        result = _apply(value, op, operand)
        lines.append(f"{value} {op} {operand} = {result}")
        expression = f"({expression} {op} {operand})"
        value = result
    prompt = f"Compute {expression[1:-1]}.\n"
    rechecks = [f"Check: {rng.choice(lines)}. Correct." for _ in range(rng.randint(0, max_rechecks))]
    body = lines + rechecks
    return Problem(prompt=prompt, answer=str(value), solution="\n".join(body) + f"\nAnswer: {value}\n")


def problem_split(problem: Problem) -> str:
    return split_of(problem.prompt, HELD_OUT_PERCENT)


def arithmetic_problems(n: int, seed: int = 0, split: str = "train", max_rechecks: int = 4,
                        operations: tuple[int, int] = (2, 4)) -> list[Problem]:
    """`n` problems of one split ("train", "val" or "test"), drawn i.i.d. from the task's
    distribution restricted to that split (a problem may repeat), deterministic in `seed`, with
    between operations[0] and operations[1] operations each (1 suits a small pretrained model)."""
    if n < 1:
        raise ValueError(f"need at least one problem, got n={n}")
    if not 1 <= operations[0] <= operations[1]:
        raise ValueError(f"operations must be (least, most) with 1 <= least <= most, got {tuple(operations)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng, problems = random.Random(seed), []
    while len(problems) < n:
        problem = make_problem(rng, max_rechecks, tuple(operations))
        if problem_split(problem) == split:
            problems.append(problem)
    return problems
