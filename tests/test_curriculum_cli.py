"""The CROPI curriculum through the real CLI: stages, saved selections, resume after SIGKILL,
and the stage statistics in a logger other than TensorBoard."""

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cropi_pl.curriculum.resampling import ResampledStore
from cropi_pl.influence.cache import TrajectoryCache
from cropi_pl.influence.popi import behaviour_logps
from cropi_pl.policy.build import resolve_model_path
from tests.cli_utils import CROPI, event_tags, policy_state, run_cli, run_cli_process

KILL = "--trainer.callbacks+=tests.kill.KillAtStep"


def _selections(run_dir):
    return {
        p.name: json.loads(p.read_text())["ids"]
        for p in sorted((run_dir / "selections").glob("stage-*[0-9].json"))
    }


@pytest.fixture
def straight_run(cropi_fit):
    """The uninterrupted run, from an empty working directory: (run dir, cwd, checkout files
    the run changed)."""
    return cropi_fit


@pytest.fixture
def straight(straight_run):
    return straight_run[0]


def test_every_output_lives_under_default_root_dir(straight_run):
    run_dir, cwd, changed = straight_run
    layout = ["checkpoints", "hf_model", "resampled", "selections", "tensorboard", "trajectories"]
    assert sorted(p.name for p in run_dir.iterdir()) == layout
    assert list(cwd.iterdir()) == [], "the run wrote into its working directory"
    assert changed == [], f"the run wrote into the checkout: {changed}"


def test_three_stages_selected_logged_and_saved(straight):
    selections = _selections(straight)
    assert list(selections) == ["stage-000.json", "stage-001.json", "stage-002.json"]
    # at most 25% of 16 prompts: prompts whose cached rewards are all equal are never selected
    assert all(1 <= len(ids) <= 4 for ids in selections.values())
    tags = event_tags(straight)
    for tag in (
        "curriculum/stage",
        "curriculum/influence_seconds",
        "curriculum/selection_size",
        "curriculum/kl_behaviour_current",
        "curriculum/ess_fraction",
        "curriculum/resample/prompts",
        "reward",
    ):
        assert tag in tags, f"missing {tag}"
    assert tags["curriculum/stage"] == [0.0, 1.0, 2.0]
    assert (straight / "trajectories" / "manifest.json").exists()
    assert tags["curriculum/resample/prompts"] == [5.0, 5.0]  # stages 1 and 2, capped at 5


def test_resampled_rows_replace_stale_prompts_from_the_current_policy(straight):
    cache = TrajectoryCache(straight / "trajectories").load("pool").to_dict()
    stale = {pid for pid, r in zip(cache["id"], cache["rewards"], strict=True) if len(set(r)) == 1}
    store = ResampledStore(straight / "resampled")
    first, second = store.load(1), store.load(2)
    assert len(first) == len(second) == 5
    assert set(first) <= stale  # stage 1 re-samples prompts whose stored rewards are all equal
    beta = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny")).eval()
    for t in first.values():  # behaviour log-probs of the stage-1 policy, not of beta
        assert len(t.completion_ids) == 4
        at_beta = behaviour_logps(beta, t.prompt_ids, t.completion_ids)
        flat = [
            a - b
            for x, y in zip(at_beta, t.behaviour_logps, strict=True)
            for a, b in zip(x, y, strict=True)
        ]
        gap = max(map(abs, flat))
        assert gap > 1e-5


def test_resume_after_sigkill_mid_stage_matches_uninterrupted(straight, tmp_path):
    # a real SIGKILL needs its own process; the resume and the straight run are in-process
    proc = run_cli_process(
        "fit",
        KILL,
        "--trainer.callbacks.init_args.step=3",
        config=CROPI,
        run_dir=tmp_path,
        check=False,
    )
    assert proc.returncode == -9, "the run should have been killed by SIGKILL"
    killed_at = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert (
        killed_at["global_step"] == 2
    )  # mid stage 1 (steps 2-3): the kill came before step 3's save
    run_cli("fit", "--ckpt_path=last", config=CROPI, run_dir=tmp_path)
    assert _selections(tmp_path) == _selections(straight)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    assert a["CurriculumDataModule"] == b["CurriculumDataModule"]
    wa, wb = (
        policy_state(straight / "checkpoints" / "last.ckpt"),
        policy_state(tmp_path / "checkpoints" / "last.ckpt"),
    )
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_csv_logger_gets_the_stage_statistics_and_the_learning_rate(tmp_path):
    """Scalars go through the Lightning logger API: a CSVLogger receives what TensorBoard does."""
    csv_logger = "--trainer.logger=lightning.pytorch.loggers.CSVLogger"
    args = (f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=csv")
    run_cli("fit", "--trainer.max_steps=2", csv_logger, *args, config=CROPI, run_dir=tmp_path)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value != ""}
    for key in (
        "curriculum/stage",
        "curriculum/selection_size",
        "curriculum/influence_seconds",
        "curriculum/selection_seconds",
        "curriculum/zero_gradient_prompts",
        "curriculum/kl_behaviour_current",
        "curriculum/ess_fraction",
        "reward",
        "loss",
        "lr-AdamW",
    ):
        assert key in logged, f"missing {key}; have {sorted(logged)}"
    assert any(key.startswith("curriculum/family/") for key in logged)
    assert [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")] == [1e-4, 1e-4]
    assert not list(tmp_path.glob("tensorboard")), "an explicit logger replaces TensorBoard"
