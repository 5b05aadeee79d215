"""User tasks as JSONL: one {"prompt": ..., "answer": ...} object per line."""

from __future__ import annotations

import json
from pathlib import Path

from .answers import extract_answer
from .arithmetic import Problem


def load_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file. `answer` may be the bare answer or a GSM8K-style solution ending
    in `#### 42` / `\\boxed{42}`; the extracted answer is what completions are checked against."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"prompt", "answer"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number} lacks {sorted(missing)}; each line needs 'prompt' and 'answer'")
        answer = str(row["answer"])
        problems.append(Problem(prompt=row["prompt"], answer=extract_answer(answer) or answer.strip(),
                                solution=row.get("solution", "")))
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems
