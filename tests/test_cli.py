"""The real CLI on the tiny test config: fit, validate, print_config, resume."""

import subprocess
import sys

import torch

from tests.cli_utils import ROOT, TINY, event_tags, policy_state, run_cli


def test_fit_writes_tensorboard_reward_and_validation(tmp_path):
    run_cli("fit", run_dir=tmp_path)
    tags = event_tags(tmp_path)
    assert "reward" in tags and len(tags["reward"]) == 4
    assert all(0.0 <= r <= 1.0 for r in tags["reward"])
    for tag in ("val/targeted/accuracy", "train/loss", "train/grad_norm", "completion/length_mean"):
        assert tag in tags, f"missing {tag}; have {sorted(tags)}"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_print_config_and_validate(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cropi_pl", "fit", "--config", str(TINY), "--print_config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "class_path: cropi_pl.grpo.module.GRPOModule" in out
    assert "num_generations: 4" in out
    proc = run_cli("validate", run_dir=tmp_path)
    assert "val/targeted/accuracy" in proc.stdout


def test_resume_continues_same_step_and_data(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli("fit", run_dir=straight)
    run_cli("fit", "--trainer.max_steps=2", run_dir=split)
    first = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    run_cli("fit", "--ckpt_path=last", run_dir=split)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    dm_key = next(k for k in a if k.endswith("CurriculumDataModule"))
    assert a[dm_key] == b[dm_key]
    wa = policy_state(straight / "checkpoints" / "last.ckpt")
    wb = policy_state(split / "checkpoints" / "last.ckpt")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
