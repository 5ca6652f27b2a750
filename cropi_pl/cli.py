"""The ``python -m cropi_pl`` command line: LightningCLI in subclass mode."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cropi_pl.checkpointing import VerifiedCheckpointIO
from cropi_pl.curriculum.callback import CurriculumCallback
from cropi_pl.data.datamodule import CurriculumDataModule
from cropi_pl.grpo.module import GRPOModule
from cropi_pl.host_memory import keep_freed_memory
from cropi_pl.policy.export import HFExport
from cropi_pl.progress import StepProgressBar

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
LOGGER_NAME = "tensorboard"
CHECKPOINT_DIR = "checkpoints"


def _without_hp_metric(logger: Any) -> None:
    """TensorBoard loggers in the config write no placeholder ``hp_metric`` (-1) scalar."""
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, Namespace) and entry.get("class_path") in (
            TENSORBOARD,
            "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
        ):
            entry.init_args.default_hp_metric = False


class CROPICLI(LightningCLI):
    """LightningCLI whose run writes everything under ``trainer.default_root_dir``.

    Besides ``trainer``, ``model`` and ``data`` it has three top-level keys, so a config or a
    method overlay sets one of them without repeating a whole ``trainer.callbacks`` list:

    - ``checkpoint``: a ``ModelCheckpoint`` (``save_last: true``, ``save_top_k: 0``); its
      ``dirpath`` defaults to ``<default_root_dir>/checkpoints``. Off with
      ``trainer.enable_checkpointing: false``.
    - ``curriculum``: an optional ``CurriculumCallback`` (``class_path`` + ``init_args``; a later
      config's ``init_args`` update the earlier ones).
    - ``export``: ``HFExport``, the HF folder written at the end of ``fit``
      (``<default_root_dir>/hf_model``; ``folder: null`` turns it off).

    Without a ``trainer.logger``, TensorBoard logs go to ``<default_root_dir>/tensorboard``;
    TensorBoard loggers write no placeholder ``hp_metric``. One step-counting progress bar
    (:class:`~cropi_pl.progress.StepProgressBar`) unless the config names its own or disables it,
    and a ``LearningRateMonitor`` logging every step's learning rate (``lr-<optimizer class>``)
    unless the config names its own or has no logger.
    Checkpoints are written atomically with a checksum verified on load
    (:class:`~cropi_pl.checkpointing.VerifiedCheckpointIO`, installed unless a strategy or plugin
    brings its own checkpoint IO).
    ``--ckpt_path last`` with no last checkpoint is an error unless ``--resume_if_missing true``,
    and ``precision: 16-mixed`` on CPU is refused (Lightning would run bf16-mixed instead).

    Its own defaults, so ``CROPICLI(args=[...])`` is the whole command line: any
    ``LightningModule``/``LightningDataModule`` by ``class_path`` (defaults ``GRPOModule`` and
    ``CurriculumDataModule``), ``seed_everything: 0``, the resolved config saved with the logs
    (overwritten on resume), and no automatic ``optimizer``/``lr_scheduler`` keys: the module
    takes them as its own ``optimizer``/``lr_scheduler`` arguments.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        defaults: dict[str, Any] = {
            "model_class": GRPOModule,
            "datamodule_class": CurriculumDataModule,
            "subclass_mode_model": True,
            "subclass_mode_data": True,
            "seed_everything_default": 0,
            "save_config_kwargs": {"overwrite": True},
            "auto_configure_optimizers": False,
        }
        super().__init__(args=args, run=run, **{**defaults, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(
            CurriculumCallback, "curriculum", subclass_mode=True, required=False
        )
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_argument(
            "--resume_if_missing",
            type=bool,
            default=False,
            help="with --ckpt_path last: go on without a checkpoint when there is no last one "
            "(default: that is an error, so a resumed run never silently restarts)",
        )

    def before_fit(self) -> None:
        self._check_last_checkpoint()

    def before_validate(self) -> None:
        self._check_last_checkpoint()

    def before_test(self) -> None:
        self._check_last_checkpoint()

    def _check_last_checkpoint(self) -> None:
        """Refuse ``--ckpt_path last`` without a last checkpoint unless ``resume_if_missing``
        (Lightning only warns and starts from scratch)."""
        config = self.config[self.subcommand]
        if config.get("ckpt_path") != "last" or config.get("resume_if_missing"):
            return
        folders = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if cb.dirpath]
        found = [path for folder in folders for path in folder.glob("last*.ckpt")]
        if not found:
            where = ", ".join(map(str, folders)) or "nowhere (checkpointing is off)"
            raise FileNotFoundError(
                f"--ckpt_path last: no last checkpoint in {where}; to start this run from scratch "
                "anyway add --resume_if_missing true"
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or os.getcwd())
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path=TENSORBOARD,
                init_args=Namespace(save_dir=str(root), name=LOGGER_NAME),
            )
        _without_hp_metric(config.trainer.logger)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / CHECKPOINT_DIR)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer with the ``checkpoint``/``curriculum``/``export`` callbacks that are on,
        the progress bar and the learning-rate monitor; with a curriculum, the training loader
        is rebuilt every epoch (``reload_dataloaders_every_n_epochs=1``).

        A ``ModelCheckpoint`` listed in ``trainer.callbacks`` replaces the ``checkpoint`` key's;
        a ``CurriculumCallback`` there and the ``curriculum`` key together are refused.
        """
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        listed = config.get("callbacks") or []
        listed = list(listed) if isinstance(listed, list) else [listed]
        keyed = [
            self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys
        ]
        keyed = [c for c in keyed if c is not None]
        if any(isinstance(c, CurriculumCallback) for c in listed) and any(
            isinstance(c, CurriculumCallback) for c in keyed
        ):
            raise ValueError(
                "two curricula: a CurriculumCallback in trainer.callbacks and the `curriculum` "
                "key; keep one (the `curriculum` key merges across --config files)"
            )
        curriculum = any(isinstance(c, CurriculumCallback) for c in [*listed, *keyed])
        if curriculum and not config.get("reload_dataloaders_every_n_epochs"):
            config["reload_dataloaders_every_n_epochs"] = 1  # a stage is an epoch with its loader
        if config.get("enable_checkpointing") is False or any(
            isinstance(c, ModelCheckpoint) for c in listed
        ):
            keyed = [c for c in keyed if not isinstance(c, ModelCheckpoint)]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in listed):
            listed.append(StepProgressBar())
        has_logger = config.get("logger") not in (False, None, [])
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in listed):
            listed.append(LearningRateMonitor(logging_interval="step"))
        trainer = self._instantiate_trainer({**config, "callbacks": listed}, keyed)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default one
            trainer.strategy.checkpoint_io = VerifiedCheckpointIO()
        if str(config.get("precision")) in ("16", "16-mixed") and isinstance(
            trainer.accelerator, CPUAccelerator
        ):
            raise ValueError(
                f"precision {config['precision']!r} needs a GPU: float16 AMP does not run on CPU "
                "(Lightning would silently switch to bf16-mixed); use precision: bf16-mixed "
                "(configs/precision/bf16-mixed.yaml) or 32-true on CPU"
            )
        return trainer


def main(args: list[str] | None = None, run: bool = True) -> CROPICLI:
    """Parse ``args`` (default ``sys.argv``); ``run=False`` only instantiates (for tools).
    Freed host memory stays in the process (:func:`~cropi_pl.host_memory.keep_freed_memory`)."""
    keep_freed_memory()
    # GRPO steps inside training_step; checkpoints are meant to hold the post-step state.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return CROPICLI(args=args, run=run)


__all__ = ["CROPICLI", "main"]
