"""tools/reproduce_acceleration.py: step bookkeeping and the acceleration summary by hand."""

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import reproduce_acceleration as accel  # noqa: E402


def test_curve_keys_are_optimizer_steps_done():
    """Lightning logs the validation after step s at s - 1; the curve keys it by s."""
    base = random.random()
    tags = {"val/targeted/accuracy": [(8, 0.3), (17, 0.4)]}
    assert accel.curve(tags, "val/targeted/accuracy", base) == {0: base, 9: 0.3, 18: 0.4}


def test_train_seconds_add_collection_selections_and_steps(tmp_path):
    per_step = [random.uniform(0.5, 2.0) for _ in range(4)]
    tags = {"time/training_s": list(enumerate(per_step))}
    selections = tmp_path / "selections"
    selections.mkdir()
    for stage, seconds in ((0, 3.0), (1, 5.0)):
        metrics = {"curriculum/selection_seconds": seconds}
        (selections / f"stage-{stage:03d}.metrics.json").write_text(json.dumps(metrics))
    wall = accel.train_seconds_by_step(tmp_path, tags, collection_s=10.0, stage_steps=2)
    expected = {0: 10.0, 1: 13.0 + per_step[0], 2: 13.0 + sum(per_step[:2])}
    expected[3] = 18.0 + sum(per_step[:3])
    expected[4] = 18.0 + sum(per_step)
    assert wall == pytest.approx(expected)


def test_summary_accelerations_by_hand():
    full = {"targeted": {0: 0.2, 9: 0.25, 18: 0.3}, "untargeted": {0: 0.5, 9: 0.5, 18: 0.5}}
    full["wall"] = {0: 0.0, 9: 90.0, 18: 180.0}
    fast = {"targeted": {0: 0.2, 9: 0.3, 18: 0.31}, "untargeted": {0: 0.5, 9: 0.4, 18: 0.45}}
    fast["wall"] = {0: 30.0, 9: 120.0, 18: 210.0}
    never = {"targeted": {0: 0.2, 9: 0.21, 18: 0.22}, "untargeted": {0: 0.5, 9: 0.5, 18: 0.5}}
    never["wall"] = {0: 0.0, 9: 90.0, 18: 180.0}
    summary = accel.summarise({"full": {0: full}, "cropi": {0: fast}, "random": {0: never}}, [0])
    assert summary["full"]["step_acceleration"] == 1.0
    assert summary["cropi"]["step_acceleration"] == 2.0  # full needs 18 steps, cropi 9
    assert summary["cropi"]["wallclock_acceleration"] == pytest.approx(180.0 / 120.0)
    assert summary["cropi"]["final_untargeted_mean"] == 0.45
    assert summary["random"]["steps_to_full_best_per_seed"] == [None]
    assert summary["random"]["step_acceleration"] == 0.0
