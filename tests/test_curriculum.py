"""Stage boundaries and the subset served by the DataModule, with a stub module (no LM needed)."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from cropi_pl.curriculum.callback import CurriculumCallback
from cropi_pl.data.datamodule import CurriculumDataModule
from cropi_pl.influence.selection import RandomSelector
from cropi_pl.tasks.arithmetic import SyntheticTasks


class RecordingModule(L.LightningModule):
    """Records the prompt ids of every training batch, keyed by the step it trained. It meets
    the stage contract's policy side; random selection never asks it for a model."""

    optimizer_steps_per_batch = 1

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen[self.global_step] = [row["id"] for row in batch]
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def initial_policy(self):
        raise AssertionError("random selection needs no policy")

    current_policy = trajectory_collector = initial_policy


def _fit(tmp_path, max_steps=9, stage_steps=3, reselect=True, module=None, reload=1):
    dm = CurriculumDataModule(
        pool=SyntheticTasks(families=["add", "sub"], difficulties=[2], num_per_cell=20),
        batch_size=2,
    )
    module = module or RecordingModule()
    callback = CurriculumCallback(
        selector=RandomSelector(),
        ratio=0.25,
        stage_steps=stage_steps,
        reselect=reselect,
        progress=False,
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[callback],
        reload_dataloaders_every_n_epochs=reload,
    )
    trainer.fit(module, dm)
    return module, dm, tmp_path / "selections"


def _selection(path):
    return json.loads(path.read_text())["ids"]


def test_stage_boundaries_and_served_subset_equals_selection(tmp_path):
    module, dm, selections = _fit(tmp_path)
    assert sorted(p.name for p in selections.glob("stage-*[0-9].json")) == [
        "stage-000.json",
        "stage-001.json",
        "stage-002.json",
    ]
    stages = [set(_selection(selections / f"stage-{m:03d}.json")) for m in range(3)]
    assert all(len(s) == 10 for s in stages)  # 25% of 40
    assert stages[0] != stages[1] != stages[2]
    assert sorted(module.seen) == list(range(9))
    for step, ids in module.seen.items():
        assert set(ids) <= stages[step // 3], f"step {step} trained outside its stage's subset"
    assert dm.subset_stage == 2


def test_static_selection_keeps_stage_zero(tmp_path):
    module, _, selections = _fit(tmp_path, reselect=False)
    assert [p.name for p in selections.glob("stage-*[0-9].json")] == ["stage-000.json"]
    stage0 = set(_selection(selections / "stage-000.json"))
    assert all(set(ids) <= stage0 for ids in module.seen.values())


def test_the_stage_contract_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        _fit(tmp_path, reload=0)

    with pytest.raises(TypeError, match="CurriculumPolicy .GRPOModule., got BoringModel"):
        _fit(tmp_path, module=BoringModel())


def test_gradient_method_reaches_the_scorer():
    assert CurriculumCallback(method="hooks").scorer.method == "hooks"
    assert CurriculumCallback().scorer.method is None  # POPIGradients picks by device


def test_stage_summary_names_size_method_time_families_and_pass_rate_band():
    from collections import Counter

    from cropi_pl.curriculum.callback import stage_summary
    from cropi_pl.influence.selection import Selection, SelectionContext

    ids = [f"p{i}" for i in range(10)]
    rates = torch.tensor([0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 0.5, 0.375, 0.0, 0.625])
    chosen = [3, 1, 9, 4]
    selection = Selection([ids[i] for i in chosen], chosen, [0.9, 0.8, 0.7, 0.6], "influence", 2)
    families = Counter({"mul": 3, "add": 1})
    line = stage_summary(
        selection,
        10,
        families,
        SelectionContext(ids=ids, pass_rate=rates),
        {"curriculum/selection_seconds": 12.34},
    )
    assert line == (
        "stage 2: selected 4 of 10 prompts (40.0%) by influence in 12.3 s; families mul 3, add 1; "
        "behaviour pass rate 0.12-0.75 (median 0.50; pool median 0.38)"
    )
    plain = stage_summary(selection, 10, families, SelectionContext(ids=ids), {})
    assert plain.endswith("in 0.0 s; families mul 3, add 1")  # random/full: no pass rates
