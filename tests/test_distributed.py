"""2-process CPU training (gloo) with DDP and FSDP2 matches a single process."""

import pytest
import torch

from tests.cli_utils import ROOT, event_tags, run_cli

pytestmark = pytest.mark.distributed


def _losses(run_dir, *extra):
    run_cli(
        "fit", "--trainer.max_steps=2", "--trainer.val_check_interval=2", *extra, run_dir=run_dir
    )
    tags = event_tags(run_dir)
    return torch.tensor(tags["loss"]), torch.tensor(tags["reward"])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_loss_matches_single_process(strategy, single, tmp_path):
    config = str(ROOT / "configs" / "strategy" / f"{strategy}.yaml")
    loss, reward = _losses(tmp_path, "--config", config)
    ref_loss, ref_reward = single
    torch.testing.assert_close(reward, ref_reward, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
