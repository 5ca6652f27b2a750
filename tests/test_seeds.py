"""``seed_everything`` is the one seed a user sets: every component seed follows it unless set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightning.pytorch import seed_everything

from cropi_pl.data.datamodule import CurriculumDataModule, TrajectorySettings
from cropi_pl.grpo.module import GRPOModule
from cropi_pl.influence.cache import TrajectoryCache
from cropi_pl.influence.projection import ProjectionConfig
from cropi_pl.influence.scorer import InfluenceScorer
from cropi_pl.seeding import run_seed
from cropi_pl.tasks.arithmetic import SyntheticTasks
from tests.cli_utils import CROPI, run_cli


@pytest.fixture
def restore_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # monkeypatch restores it afterwards


def test_component_seeds_follow_seed_everything_unless_set(restore_seed) -> None:
    assert run_seed() == 0  # no seed_everything: 0, as before
    seed_everything(7)
    pool = SyntheticTasks(families=["add"], difficulties=[1], num_per_cell=2)
    assert run_seed() == 7
    assert GRPOModule().sampling_seed == 7
    assert CurriculumDataModule(pool).seed == 7
    assert TrajectorySettings().seed == 7
    assert ProjectionConfig().seed == 7
    assert InfluenceScorer().seed == 7
    assert GRPOModule(seed=3).sampling_seed == 3  # an explicit seed wins
    assert CurriculumDataModule(pool, seed=3).seed == 3
    assert TrajectorySettings(seed=3).seed == 3
    assert ProjectionConfig(seed=3).seed == 3


def _stage0(run_dir: Path) -> tuple[list[str], list]:
    selection = json.loads((run_dir / "selections" / "stage-000.json").read_text())["ids"]
    rewards = TrajectoryCache(run_dir / "trajectories").load("pool")["rewards"]
    return selection, rewards


def test_another_seed_everything_gives_another_run(tmp_path: Path) -> None:
    runs = {}
    for seed in (0, 1):
        run_dir = tmp_path / f"seed{seed}"
        run_cli(
            "fit",
            f"--seed_everything={seed}",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            config=CROPI,
            run_dir=run_dir,
        )
        runs[seed] = _stage0(run_dir)
    (ids0, rewards0), (ids1, rewards1) = runs[0], runs[1]
    assert rewards0 != rewards1  # the trajectory cache was sampled with another seed
    assert ids0 != ids1  # and so the selection differs
