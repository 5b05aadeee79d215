"""StepTime: log each training step's wall-clock seconds, the per-step cost benchmarks compare."""

from __future__ import annotations

import time

import lightning as L


class StepTime(L.Callback):
    """Logs `time/step_s`, the wall seconds from the start of a training batch to its end (for RL
    modules: rollouts, rewards and every policy update of the step), and keeps them in `seconds`."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        self.seconds.append(time.perf_counter() - self._start)
        pl_module.log("time/step_s", self.seconds[-1], on_step=True, on_epoch=False, batch_size=1)
