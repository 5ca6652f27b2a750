"""The non-finite guard: a step with a NaN/inf loss or gradient norm makes no update, is counted,
and a run of them stops training with an error naming the step and the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from cropi_pl.cli import main
from cropi_pl.grpo.module import GRPOModule
from tests.cli_utils import TINY


def _cli(tmp_path: Path, *args: str):
    return main(["--config", str(TINY), f"--trainer.default_root_dir={tmp_path}", *args], run=False)


def _weights(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


class Recorder(L.Callback):
    """Policy weights before and after every training batch, and the guard's count."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before.append(_weights(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after.append(_weights(module))
        self.counts.append(module.nonfinite_steps)


class NaNGradAt(GRPOModule):
    """A gradient norm of NaN at the second rollout only."""

    def _grad_norm(self) -> torch.Tensor:
        norm = super()._grad_norm()
        return norm * torch.nan if self._rollouts == 1 else norm

    def training_step(self, batch, batch_idx):
        self._rollouts = getattr(self, "_rollouts", -1) + 1
        return super().training_step(batch, batch_idx)


def test_one_nonfinite_step_is_skipped_without_an_update_and_counted(tmp_path: Path) -> None:
    cli = _cli(tmp_path, "--model=tests.test_nonfinite.NaNGradAt", "--trainer.max_steps=3")
    recorder = Recorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert recorder.counts == [0, 1, 1, 1]  # 4 rollouts for 3 updates: one was skipped
    assert cli.trainer.global_step == 3
    for i, (before, after) in enumerate(zip(recorder.before, recorder.after, strict=True)):
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (i == 1), i
    assert all(torch.isfinite(v).all() for v in recorder.after[-1].values())
    assert cli.trainer.callback_metrics["train/nonfinite_steps"] == 1


class PoisonAt(L.Callback):
    """Set one policy weight to NaN before the second rollout (as a corrupted state would)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 1:
            with torch.no_grad():
                next(module.policy.parameters()).view(-1)[0] = torch.nan


def test_nonfinite_steps_in_a_row_stop_naming_step_and_last_checkpoint(tmp_path: Path) -> None:
    cli = _cli(tmp_path, "--trainer.max_steps=8", "--model.init_args.max_nonfinite_steps=3")
    recorder = Recorder()
    cli.trainer.callbacks += [PoisonAt(), recorder]
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(
        FloatingPointError, match=r"stopped at step 1: 3 optimizer steps in a row"
    ) as info:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert f"the last checkpoint is {last}" in str(info.value)
    assert recorder.counts == [0, 1, 2]  # the third skip raised before its batch ended
    assert torch.load(last, weights_only=False)["global_step"] == 1  # the pre-NaN state


def test_max_nonfinite_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        GRPOModule(max_nonfinite_steps=-1)
