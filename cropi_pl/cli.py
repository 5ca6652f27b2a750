"""The ``python -m cropi_pl`` command line: LightningCLI in subclass mode."""

from __future__ import annotations

import warnings
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from cropi_pl.data.datamodule import CurriculumDataModule
from cropi_pl.grpo.module import GRPOModule
from cropi_pl.progress import StepProgressBar

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def _without_hp_metric(logger: Any) -> None:
    """TensorBoard loggers in the config write no placeholder ``hp_metric`` (-1) scalar."""
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, Namespace) and entry.get("class_path") in (
            TENSORBOARD,
            "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
        ):
            entry.init_args.default_hp_metric = False


class CROPICLI(LightningCLI):
    """LightningCLI with the project's defaults: TensorBoard without the placeholder
    ``hp_metric``, one step-counting progress bar (:class:`~cropi_pl.progress.StepProgressBar`)
    unless the config names its own or disables it, and an overwritable run config."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        _without_hp_metric(config.trainer.get("logger"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        wants_bar = trainer.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None, run: bool = True) -> CROPICLI:
    """Parse ``args`` (default ``sys.argv``); ``run=False`` only instantiates (for tools)."""
    # GRPO steps inside training_step; checkpoints are meant to hold the post-step state.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return CROPICLI(
        model_class=GRPOModule,
        datamodule_class=CurriculumDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


__all__ = ["CROPICLI", "main"]
