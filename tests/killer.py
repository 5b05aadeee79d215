"""A callback that SIGKILLs its own process: the crash that resume must survive (used via PYTHONPATH)."""

import os
import signal

import lightning as L


class SigkillAtStep(L.Callback):
    """Kills the process at the end of optimizer step `step`, before that step's checkpoint is written
    (Lightning runs checkpoint callbacks after all others)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
