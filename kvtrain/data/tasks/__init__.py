"""Verifiable tasks for RL: the embedded arithmetic task and user JSONL, with answer checking."""

from .answers import extract_answer, is_correct
from .arithmetic import Problem, arithmetic_problems
from .datamodule import TaskDataModule, in_chat
from .jsonl import load_jsonl

__all__ = ["Problem", "TaskDataModule", "arithmetic_problems", "extract_answer", "in_chat", "is_correct", "load_jsonl"]
