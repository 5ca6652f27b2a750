"""2-process CPU training (gloo) with DDP and FSDP2 matches a single process, and so does the HF
export written at the end of fit (under FSDP2 gathered from the shards)."""

import pytest
import torch
from safetensors.torch import load_file

from cropi_pl.policy.export import module_from_checkpoint
from tests.cli_utils import ROOT, event_tags, run_cli, run_cli_process

pytestmark = pytest.mark.distributed


def _outputs(run_dir):
    """(train losses, rewards, exported tensors) of a fit."""
    tags = event_tags(run_dir)
    exported = load_file(run_dir / "hf_model" / "model.safetensors")
    return torch.tensor(tags["loss"]), torch.tensor(tags["reward"]), exported


ARGS = ("fit", "--trainer.max_steps=2", "--trainer.val_check_interval=2")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_cli(*ARGS, run_dir=run_dir)
    return _outputs(run_dir)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_loss_and_export_match_single_process(strategy, single, tmp_path):
    config = str(ROOT / "configs" / "strategy" / f"{strategy}.yaml")
    # the strategy launches its ranks as processes re-running the command: a real subprocess
    run_cli_process(*ARGS, "--config", config, run_dir=tmp_path)
    loss, reward, exported = _outputs(tmp_path)
    ref_loss, ref_reward, ref_exported = single
    torch.testing.assert_close(reward, ref_reward, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert exported.keys() == ref_exported.keys()
    for key, value in ref_exported.items():
        torch.testing.assert_close(exported[key], value, rtol=1e-4, atol=1e-6, msg=key)
    if strategy == "fsdp":  # a distributed checkpoint folder exports to the same tensors
        assert (tmp_path / "checkpoints" / "last.ckpt").is_dir()
        policy = module_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt").policy
        state = policy.state_dict()
        for key, value in exported.items():
            assert torch.equal(state[key], value), key
