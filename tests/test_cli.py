"""The real CLI on the tiny test config: fit, validate, print_config, resume."""

import subprocess
import sys

import torch

from tests.cli_utils import ROOT, TINY, completions_table, event_tags, policy_state, run_cli

# Metric names shared with TRL's GRPOTrainer (kl needs a reference model: kl_coef > 0).
TRL_NAMES = (
    "reward",
    "reward_std",
    "rewards/exact_number/mean",
    "rewards/exact_number/std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "entropy",
    "loss",
    "grad_norm",
)


def test_fit_writes_tensorboard_reward_and_validation(tmp_path):
    run_cli("fit", run_dir=tmp_path)
    tags = event_tags(tmp_path)
    assert "reward" in tags and len(tags["reward"]) == 4
    assert all(0.0 <= r <= 1.0 for r in tags["reward"])
    assert tags["rewards/exact_number/mean"] == tags["reward"]  # one reward of weight 1
    for tag in TRL_NAMES + ("val/targeted/accuracy", "accuracy", "learning_rate"):
        assert tag in tags, f"missing {tag}; have {sorted(tags)}"
    assert "hp_metric" not in tags
    assert all(0.0 <= v <= 1.0 for v in tags["completions/clipped_ratio"])
    assert all(v <= 24 for v in tags["completions/max_length"])  # max_completion_length
    table = completions_table(tmp_path)
    assert table[0] == ["prompt", "completion", "exact_number", "reward", "advantage"]
    assert len(table) == 2 + 4 * 4  # header, rule, 4 prompts x 4 completions
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
