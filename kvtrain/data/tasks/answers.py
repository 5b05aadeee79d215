"""Answer extraction and checking for verifiable tasks."""

from __future__ import annotations

import re

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_PATTERNS = [
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),  # \boxed{42}
    re.compile(r"####\s*(" + _NUMBER + r")"),  # GSM8K: #### 42
    re.compile(r"[Aa]nswer\s*[:=]\s*(" + _NUMBER + r")"),  # Answer: 42
    re.compile(r"[Aa]nswer is\s*(" + _NUMBER + r")"),  # The answer is 42. (how chat models phrase it)
]


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the last \\boxed{...}, GSM8K `#### ...`, `Answer: ...` or `the answer
    is ...` number, in that order of preference (commas dropped), or None if there is none."""
    for pattern in _PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].replace(",", "")
    return None


def is_correct(completion: str, answer: str) -> bool:
    """True when the completion's extracted answer equals `answer` as a number (or as text)."""
    got = extract_answer(completion)
    if got is None:
        return False
    try:
        return float(got) == float(str(answer).replace(",", ""))
    except ValueError:
        return got.strip() == str(answer).strip()
