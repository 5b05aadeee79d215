"""TaskDataModule: batches of {"prompt": [...], "answer": [...]} for GRPOModule (and SFT text)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from kvtrain.data.lm import ResumableLoader, resumable_loader

from .arithmetic import Problem, arithmetic_problems
from .jsonl import load_jsonl


class ProblemDataset(Dataset):
    def __init__(self, problems: list[Problem]):
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> dict[str, str]:
        p = self.problems[i]
        return {"prompt": p.prompt, "answer": p.answer, "solution": p.solution}


class TaskDataModule(L.LightningDataModule):
    """Prompts and answers of a verifiable task.

    Args:
        task: "arithmetic" (the embedded task), or a JSONL file of {"prompt", "answer"} lines.
        val_task: held-out JSONL for a JSONL task (the embedded task draws its own).
        train_size, val_size: problems drawn for the embedded task (train and val use different seeds).
        batch_size: prompts per training step (each is sampled num_generations times).
        seed: shuffling and problem-drawing seed.
    """

    def __init__(self, task: str = "arithmetic", val_task: str | None = None, train_size: int = 2000,
                 val_size: int = 100, batch_size: int = 8, eval_batch_size: int | None = None, seed: int = 1234):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.task, self.val_task, self.train_size, self.val_size = task, val_task, train_size, val_size
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size or batch_size, seed
        self.datasets: dict[str, ProblemDataset] = {}

    def dataset(self, split: str) -> ProblemDataset:
        if split not in self.datasets:
            self.datasets[split] = ProblemDataset(self._problems(split))
        return self.datasets[split]

    def _problems(self, split: str) -> list[Problem]:
        if self.task == "arithmetic":
            size, seed = (self.train_size, self.seed) if split == "train" else (self.val_size, self.seed + 1)
            return arithmetic_problems(size, seed=seed)
        if split == "train":
            return load_jsonl(self.task)
        if self.val_task is None:
            raise ValueError(f"task {self.task!r} is a JSONL file: pass val_task=<held-out JSONL> to validate")
        return load_jsonl(self.val_task)

    def train_dataloader(self) -> ResumableLoader:
        return resumable_loader(self.trainer, self.dataset("train"), self.batch_size, self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.eval_batch_size)
