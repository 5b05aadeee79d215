"""TaskDataModule: prompt/answer batches for GRPOModule, or tokenized prompt + solution for SFT."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from kvtrain.data.lm import ResumableLoader, resumable_loader

from .arithmetic import Problem, arithmetic_problems
from .jsonl import load_jsonl
from .recall import recall_problems


class ProblemDataset(Dataset):
    def __init__(self, problems: list[Problem]):
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> dict[str, str]:
        p = self.problems[i]
        return {"prompt": p.prompt, "answer": p.answer, "solution": p.solution}


def in_chat(problems: list[Problem], tokenizer: PreTrainedTokenizerBase, instruction: str = "") -> list[Problem]:
    """The problems with each prompt rendered as one user turn of the tokenizer's chat template, the
    instruction after the question, the assistant's turn opened: how an instruct model is asked."""
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: use chat=False for this model")

    def render(prompt: str) -> str:
        turn = [{"role": "user", "content": f"{prompt.strip()} {instruction}".strip()}]
        return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)

    return [replace(p, prompt=render(p.prompt)) for p in problems]


class SFTCollator:
    """prompt + solution + EOS, right-padded; loss_mask marks the solution and EOS (the targets)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        prompts = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
        solutions = tok([r["solution"] for r in rows], add_special_tokens=False)["input_ids"]
        pairs = [(p, s + [tok.eos_token_id]) for p, s in zip(prompts, solutions)]
        width = min(self.max_len, max(len(p) + len(s) for p, s in pairs))
        batch = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in ("input_ids", "attention_mask", "loss_mask")}
        batch["input_ids"].fill_(tok.pad_token_id)
        for i, (p, s) in enumerate(pairs):
            ids = (p + s)[:width]
            batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][i, : len(ids)] = 1
            batch["loss_mask"][i, len(p) : len(ids)] = 1
        return batch


class TaskDataModule(L.LightningDataModule):
    """Problems of a verifiable task: {"prompt", "answer"} batches for RL (format "rl"), or tokenized
    prompt + chain of thought with the loss on the chain only, for supervised warm starts ("sft").

    Args:
        task: "arithmetic" or "recall" (the embedded tasks: `kvtrain.data.tasks.recall` is key-value
            recall over `pairs` lines), or a JSONL file of {"prompt", "answer"} lines.
        val_task: held-out JSONL for a JSONL task (the embedded task draws its own).
        train_size, val_size: problems drawn for the embedded task (its train and val problems are disjoint
            by construction: a hash of each problem decides its split).
        batch_size: prompts per training step (each is sampled num_generations times).
        seed: shuffling and problem-drawing seed.
        format: "rl" or "sft" (needs solutions: the embedded task has them; JSONL rows may carry "solution").
        tokenizer: for "sft" and chat; default: the tokenizer of the model being trained.
        max_len: for "sft": tokens per example at most.
        operations: (least, most) operations per problem of the embedded task.
        chat: ask in the tokenizer's chat template (instruct models), `instruction` after the question.
        pairs: lines of a recall prompt; recall_queries: names a training prompt's solution answers;
            needle: the asked name is always the same (a needle in a haystack).
    """

    def __init__(self, task: str = "arithmetic", val_task: str | None = None, train_size: int = 2000,
                 val_size: int = 100, batch_size: int = 8, eval_batch_size: int | None = None, seed: int = 1234,
                 format: Literal["rl", "sft"] = "rl", tokenizer: str | None = None, max_len: int = 256,
                 operations: tuple[int, int] = (2, 4), chat: bool = False, instruction: str = "", pairs: int = 48,
                 recall_queries: int = 1, needle: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.task, self.val_task, self.train_size, self.val_size = task, val_task, train_size, val_size
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size or batch_size, seed
        self.format, self.tokenizer_name, self.max_len = format, tokenizer, max_len
        self.operations, self.chat, self.instruction, self.pairs = tuple(operations), chat, instruction, pairs
        self.recall_queries, self.needle = recall_queries, needle
        if instruction and not chat:
            raise ValueError("instruction is said inside the chat template: set chat=True to use it")
        self.datasets: dict[str, ProblemDataset] = {}

    def dataset(self, split: str) -> ProblemDataset:
        if split not in self.datasets:
            problems = self._problems(split)
            if self.chat:
                problems = in_chat(problems, self._tokenizer(), self.instruction)
            self.datasets[split] = ProblemDataset(problems)
        return self.datasets[split]

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        from kvtrain.models import REFERENCE, load_tokenizer

        module = self.trainer.lightning_module if self.trainer else None
        return load_tokenizer(self.tokenizer_name or getattr(module, "tokenizer_name", REFERENCE))

    def _problems(self, split: str) -> list[Problem]:
        size = self.train_size if split == "train" else self.val_size
        if self.task == "arithmetic":  # the splits are disjoint by construction
            return arithmetic_problems(size, seed=self.seed, split=split, operations=self.operations)
        if self.task == "recall":
            # training answers `recall_queries` names per prompt (more signal), held-out prompts one
            return recall_problems(size, seed=self.seed, split=split, pairs=self.pairs,
                                   queries=self.recall_queries if split == "train" else 1, needle=self.needle)
        if split == "train":
            return load_jsonl(self.task)
        if self.val_task is None:
            raise ValueError(f"task {self.task!r} is a JSONL file: pass val_task=<held-out JSONL> to validate")
        held_out = load_jsonl(self.val_task)
        seen = {p.prompt for p in self.dataset("train").problems}
        overlap = sum(p.prompt in seen for p in held_out)
        if overlap:
            raise ValueError(f"{overlap} of the {len(held_out)} prompts of val_task {self.val_task!r} also occur in "
                             f"task {self.task!r}: a held-out set must not repeat training prompts")
        return held_out

    def _collate(self):
        if self.format == "rl":
            return None  # the default collation: lists of strings
        if not all(p.solution for p in self.dataset("train").problems):
            raise ValueError(f"format='sft' needs a solution for every problem; {self.task!r} has problems without one")
        return SFTCollator(self._tokenizer(), self.max_len)

    def train_dataloader(self) -> ResumableLoader:
        return resumable_loader(self.trainer, self.dataset("train"), self.batch_size, self.seed,
                                collate_fn=self._collate())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.eval_batch_size, collate_fn=self._collate())
