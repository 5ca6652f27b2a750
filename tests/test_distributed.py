"""2-process CPU training (gloo) with DDP and FSDP2 matches a single process, and so does the HF
export written at the end of fit (under FSDP2 gathered from the shards).

What is compared carries information: two optimizer steps per rollout (``num_iterations=2``), so
the second step's loss is not the identically-zero value of a ratio of 1 with centred
advantages, and the updated weights after two rollouts, which move far more than the tolerance.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cropi_pl.checkpointing import MANIFEST, CheckpointCorrupted
from cropi_pl.policy.build import resolve_model_path
from cropi_pl.policy.export import module_from_checkpoint
from tests.cli_utils import ROOT, event_tags, run_cli, run_cli_process

pytestmark = pytest.mark.distributed
RTOL, ATOL = 1e-4, 1e-6
UPDATE_RTOL, UPDATE_ATOL = 1e-2, 1e-6  # on the weight updates (exported - initial) themselves


@pytest.fixture(scope="module")
def initial():
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny"))
    return model.state_dict()


def _outputs(run_dir):
    """(train losses, grad norms, rewards, exported tensors) of a fit."""
    tags = event_tags(run_dir)
    exported = load_file(run_dir / "hf_model" / "model.safetensors")
    return tuple(torch.tensor(tags[k]) for k in ("loss", "grad_norm", "reward")) + (exported,)


ARGS = (
    "fit",
    "--trainer.max_steps=4",  # two rollouts of two optimizer steps each
    "--trainer.val_check_interval=2",
    "--model.init_args.num_iterations=2",
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_cli(*ARGS, run_dir=run_dir)
    return _outputs(run_dir)


def test_the_single_process_reference_is_informative(single, initial):
    loss, grad_norm, _, exported = single
    assert loss.abs().max() > 1e-4  # the second step of each rollout has a non-zero loss
    assert grad_norm.max() > 0
    moved = max((value - initial[key]).abs().max().item() for key, value in exported.items())
    assert moved > 50 * UPDATE_ATOL, moved  # the updates are far above their tolerance


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_updates_and_export_match_single_process(strategy, single, initial, tmp_path):
    config = str(ROOT / "configs" / "strategy" / f"{strategy}.yaml")
    # the strategy launches its ranks as processes re-running the command: a real subprocess
    run_cli_process(*ARGS, "--config", config, run_dir=tmp_path)
    loss, grad_norm, reward, exported = _outputs(tmp_path)
    ref_loss, ref_grad_norm, ref_reward, ref_exported = single
    torch.testing.assert_close(reward, ref_reward, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_norm, ref_grad_norm, rtol=1e-4, atol=1e-6)
    assert exported.keys() == ref_exported.keys()
    for key, value in ref_exported.items():
        torch.testing.assert_close(exported[key], value, rtol=RTOL, atol=ATOL, msg=key)
        torch.testing.assert_close(
            exported[key] - initial[key],
            value - initial[key],
            rtol=UPDATE_RTOL,
            atol=UPDATE_ATOL,
            msg=f"update of {key}",
        )
    if strategy == "fsdp":  # a distributed checkpoint folder exports to the same tensors
        folder = tmp_path / "checkpoints" / "last.ckpt"
        assert folder.is_dir() and (folder / MANIFEST).is_file()
        policy = module_from_checkpoint(folder).policy
        state = policy.state_dict()
        for key, value in exported.items():
            assert torch.equal(state[key], value), key
        shard = sorted(folder.glob("*.distcp"))[-1]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(CheckpointCorrupted, match=rf"{shard.name} differs"):
            module_from_checkpoint(folder)
        proc = run_cli_process(
            "fit", "--config", config, "--ckpt_path=last", run_dir=tmp_path, check=False
        )
        assert proc.returncode != 0 and f"{shard.name} differs" in proc.stderr
