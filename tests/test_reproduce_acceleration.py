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


def _run(targeted, untargeted, wall, ci=0.01):
    steps = (0, 9, 18)
    return {
        "targeted": dict(zip(steps, targeted, strict=True)),
        "untargeted": dict(zip(steps, untargeted, strict=True)),
        "targeted_ci95": dict.fromkeys(steps, ci),
        "untargeted_ci95": dict.fromkeys(steps, 2 * ci),
        "wall": dict(zip(steps, wall, strict=True)),
    }


def test_summary_accelerations_by_hand():
    full = _run((0.2, 0.25, 0.3), (0.5, 0.5, 0.5), (0.0, 90.0, 180.0))
    fast = _run((0.2, 0.3, 0.31), (0.5, 0.4, 0.45), (30.0, 120.0, 210.0), ci=0.03)
    never = _run((0.2, 0.21, 0.22), (0.5, 0.5, 0.5), (0.0, 90.0, 180.0))
    summary = accel.summarise({"full": {0: full}, "cropi": {0: fast}, "random": {0: never}}, [0])
    assert summary["full"]["step_acceleration"] == 1.0
    assert summary["cropi"]["step_acceleration"] == 2.0  # full needs 18 steps, cropi 9
    assert summary["cropi"]["wallclock_acceleration"] == pytest.approx(180.0 / 120.0)
    assert summary["cropi"]["final_untargeted"]["per_seed"] == [0.45]
    assert summary["cropi"]["final_untargeted"]["ci95_half_width_per_seed"] == [0.06]
    assert summary["full"]["targeted_gain"]["mean"] == pytest.approx(0.1)
    # final and starting accuracies are two measurements: half-widths add in quadrature
    gain_ci = summary["cropi"]["targeted_gain"]["ci95_half_width_per_seed"][0]
    assert gain_ci == pytest.approx(0.03 * 2**0.5)
    assert summary["random"]["steps_to_full_best_per_seed"] == [None]
    assert summary["random"]["step_acceleration"] == 0.0


def test_targets_overlay_retargets_influence_and_evaluation_sets():
    config = accel.ROOT / "configs" / "cropi_tiny.yaml"
    overlay = accel.targets_overlay(config, ["sub", "cmp"])
    assert list(overlay["targets"]) == ["sub", "cmp"]
    assert overlay["targets"]["cmp"]["init_args"]["families"] == ["cmp"]
    assert overlay["targets"]["cmp"]["init_args"]["split"] == "validation"
    evals = overlay["eval_sets"]
    assert evals["targeted"]["init_args"]["families"] == ["sub", "cmp"]
    assert evals["untargeted"]["init_args"]["families"] == ["add", "mul", "mod", "word"]
    for bad in (["sub", "nope"], ["sub", "sub"], ["add", "sub", "mul", "mod", "cmp", "word"]):
        with pytest.raises(SystemExit, match="--targets"):
            accel.targets_overlay(config, bad)


def test_targets_overlay_parses_through_the_cli(tmp_path):
    """The overlay replaces the config's targets and eval sets (no merge with mul/mod) and,
    with --model and --pool-per-cell, its starting policy and the pool's size (the pool's
    other arguments kept)."""
    from tests.cli_utils import run_cli

    args = accel.argparse.Namespace(
        config="configs/cropi_tiny.yaml",
        targets=["sub", "cmp"],
        steps=3,
        val_every=3,
        stage_steps=3,
        model="embedded:tiny",
        pool_per_cell=160,
    )
    configs = accel.config_args("full", tmp_path / "run", tmp_path / "cache", args, seed=0)
    out = run_cli(
        "fit", *configs[2:], "--print_config", run_dir=tmp_path, config=accel.ROOT / args.config
    ).stdout
    assert accel.yaml.safe_load(out)["model"]["init_args"]["model"] == "embedded:tiny"
    config = accel.yaml.safe_load(out)["data"]["init_args"]
    assert config["pool"]["init_args"]["num_per_cell"] == 160
    assert config["pool"]["init_args"]["split"] == "train"
    assert list(config["targets"]) == ["sub", "cmp"]
    assert config["eval_sets"]["untargeted"]["init_args"]["families"] == [
        "add",
        "mul",
        "mod",
        "word",
    ]


def test_stored_runs_round_trip_and_refuse_other_settings():
    """--merge reads a stored report's raw runs back with int keys, and only for equal settings."""
    run = _run((0.2, 0.25, random.random()), (0.5, 0.5, 0.5), (0.0, 90.0, 180.0))
    settings = {"seeds": [0], "steps": 18, "targets": ["sub", "cmp"]}
    raw = {"full": {"0": {k: {str(a): b for a, b in v.items()} for k, v in run.items()}}}
    report = {"raw": raw, "settings": settings, "total_seconds": 5.0}
    report = json.loads(json.dumps({**report, "trajectory_collection_seconds": {"0": 31.5}}))
    stored = accel.stored_runs(report, settings)
    assert stored["runs"] == {"full": {0: run}} and stored["total_seconds"] == 5.0
    assert stored["collection_seconds"] == {0: 31.5}
    with pytest.raises(SystemExit, match="settings"):
        accel.stored_runs(report, {**settings, "steps": 90})
    with pytest.raises(SystemExit, match="no stored report"):
        accel.stored_runs({}, settings)
