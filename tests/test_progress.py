"""The console: one step-counting bar per epoch, validation inside it, and the CLI's defaults
(that bar unless disabled or replaced; no placeholder hp_metric)."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from cropi_pl.cli import main
from cropi_pl.progress import StepProgressBar
from tests.cli_utils import TINY


def test_one_bar_per_epoch_counts_steps_toward_max_steps(capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=6,
        limit_train_batches=2,  # 3 epochs of 2 steps, the way curriculum stages run
        limit_val_batches=3,
        val_check_interval=2,
        num_sanity_val_steps=0,
        callbacks=[StepProgressBar()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    out = capsys.readouterr().out
    finals = [re.findall(r"epoch (\d):[^\r\n]*?(\d+)/(\d+) \[", part) for part in out.split("\n")]
    last_per_epoch = {epoch: (int(n), int(total)) for line in finals for epoch, n, total in line}
    assert last_per_epoch == {"0": (2, 6), "1": (4, 6), "2": (6, 6)}
    assert "-2" not in out and "Epoch" not in out
    assert "validating 3/3" in out  # validation shown inside the epoch's bar ...
    assert "Validation" not in out  # ... not in a second bar


def _trainer_of(*args: str) -> L.Trainer:
    return main(["--config", str(TINY), *args], run=False).trainer


def test_cli_installs_the_step_bar_unless_disabled_or_replaced(tmp_path) -> None:
    root = f"--trainer.default_root_dir={tmp_path}"
    enabled = _trainer_of(root, "--trainer.enable_progress_bar=true")
    assert type(enabled.progress_bar_callback) is StepProgressBar
    assert _trainer_of(root).progress_bar_callback is None  # the test config disables it
    own = _trainer_of(
        root,
        "--trainer.enable_progress_bar=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
    )
    assert type(own.progress_bar_callback) is TQDMProgressBar
    assert own.logger._default_hp_metric is False  # no placeholder hp_metric scalar
