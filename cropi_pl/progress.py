"""The console progress display of a run: one bar at a time, counting optimizer steps.

Lightning's default display (Rich when installed) counts batches per epoch and prints
``Epoch 2/-2`` for runs bounded by ``max_steps``; it also draws a second bar for validation.
GRPO runs are bounded by steps, and a curriculum stage is an epoch whose selection pass draws its
own bars between epochs. So this bar:

- opens at each epoch start as ``epoch N`` counting ``global_step`` toward ``max_steps`` (a
  resumed run starts at its step), and stays on screen when the epoch ends, one line per epoch;
- shows validation inside that bar (``validating 3/12``) instead of opening a second one;
- is closed between epochs, so what runs there (trajectory collection, influence passes, the
  curriculum's one-line stage summary) has the console to itself.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """A per-epoch bar of optimizer steps toward ``max_steps`` (module docstring)."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=True)
        self._train_description = ""
        self._val_done = 0
        self._val_total = 0

    def on_train_start(self, *_: Any) -> None:
        """No bar yet: each epoch opens its own."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._train_description = f"epoch {trainer.current_epoch}"
        self.train_progress_bar = Tqdm(
            desc=self._train_description,
            total=total,
            initial=trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        bar = self._train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total or 0):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self._train_progress_bar
        if bar is not None:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.close()

    def on_train_end(self, *_: Any) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._inline_validation(trainer):
            super().on_validation_start(trainer, pl_module)
            return
        self._val_done = 0
        self._val_total = int(sum(trainer.num_val_batches))
        self._train_progress_bar.set_description(f"{self._train_description} validating")

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.sanity_checking or not self._inline_validation(trainer):
            super().on_validation_batch_start(trainer, *args, **kwargs)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.sanity_checking or not self._inline_validation(trainer):
            super().on_validation_batch_end(trainer, *args, **kwargs)
            return
        self._val_done += 1
        self._train_progress_bar.set_description(
            f"{self._train_description} validating {self._val_done}/{self._val_total}"
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._inline_validation(trainer):
            super().on_validation_end(trainer, pl_module)
            return
        bar = self._train_progress_bar
        bar.set_description(self._train_description, refresh=False)
        bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics without the logger's version number."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _inline_validation(self, trainer: L.Trainer) -> bool:
        """Validation inside ``fit`` while an epoch bar is open is shown in that bar."""
        bar = self._train_progress_bar  # tqdm marks a closed bar disabled
        return trainer.state.fn == "fit" and bar is not None and not bar.disable
