"""TrainingStateMemory: log what each rank holds for parameters, gradients and optimizer state."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from kvtrain.memory import training_state_bytes

MiB = 2**20


class TrainingStateMemory(L.Callback):
    """After the first optimizer step, measure every rank's training-state bytes (real tensors,
    ZeRO partitions included), log the largest rank's figures in MiB, and optionally write all
    ranks' figures to a JSON file.

    Args:
        path: JSON file for {"ranks": [{"parameters", "gradients_and_optimizer", "total"}, ...]}.
    """

    def __init__(self, path: str | None = None):
        self.path = path
        self.ranks: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.ranks or trainer.global_step < 1:
            return
        mine = training_state_bytes(pl_module, trainer.optimizers[0])
        # On the module's device: NCCL gathers only CUDA tensors.
        mine_tensor = torch.tensor(list(mine.values()), dtype=torch.float64, device=pl_module.device)
        gathered = trainer.strategy.all_gather(mine_tensor).reshape(-1, len(mine)).tolist()
        self.ranks = [dict(zip(mine, map(int, row))) for row in gathered]
        for key in mine:
            pl_module.log(f"memory/{key}_MiB", max(r[key] for r in self.ranks) / MiB, rank_zero_only=True)
        if self.path and trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"ranks": self.ranks}, indent=1))
