"""The ``python -m cropi_pl`` command line: LightningCLI in subclass mode."""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from cropi_pl.data.datamodule import CurriculumDataModule
from cropi_pl.grpo.module import GRPOModule


class CROPICLI(LightningCLI):
    """LightningCLI with the project's defaults (TensorBoard, overwritable run config)."""


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
