"""A callback that SIGKILLs its own process: a real crash, for resume tests."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Kills the process at the end of optimizer step ``step`` (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
