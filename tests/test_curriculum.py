"""Stage boundaries and the subset served by the DataModule, with a stub module (no LM needed)."""

import json

import lightning as L
import torch

from cropi_pl.curriculum.callback import CurriculumCallback
from cropi_pl.data.datamodule import CurriculumDataModule
from cropi_pl.influence.selection import RandomSelector
from cropi_pl.tasks.arithmetic import SyntheticTasks


class RecordingModule(L.LightningModule):
    """Records the prompt ids of every training batch, keyed by the step it trained."""

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


def _fit(tmp_path, max_steps=9, stage_steps=3, reselect=True):
    dm = CurriculumDataModule(
        pool=SyntheticTasks(families=["add", "sub"], difficulties=[2], num_per_cell=20),
        batch_size=2,
    )
    module = RecordingModule()
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


def test_gradient_method_reaches_the_scorer():
    assert CurriculumCallback(method="hooks").scorer.method == "hooks"
    assert CurriculumCallback().scorer.method is None  # POPIGradients picks by device
