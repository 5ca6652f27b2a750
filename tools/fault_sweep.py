"""Fault injection: every reliability probe of the project, run for real, in one table.

    python tools/fault_sweep.py [--work runs/fault_sweep] [--out results]

Each probe breaks something the way it breaks in practice (flipped bytes in a checkpoint, a
deleted or corrupted cache shard, a hanging reward, bad data files, a SIGKILL during trajectory
collection, during a selection pass and during training, NaN weights, ...), then checks what the
project does about it against what it should do. The killed runs are resumed and compared with an
uninterrupted run of the same config (trajectory shard bytes, every stage's selection, the final
weights). The runs use the seconds-long test configs (``tests/configs``), one thread each.

Prints ``probe | expected | observed | ok`` and writes ``<out>/fault_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import machine_info  # noqa: E402

CROPI = ROOT / "tests" / "configs" / "cropi_test.yaml"
TINY = ROOT / "tests" / "configs" / "tiny_test.yaml"
SHARDS = "--data.init_args.trajectories.shard_size=4"  # several shards per split, to kill between
WEIGHT_TOLERANCE = 1e-6


# ----------------------------------------------------------------- injected into the runs
class Crash(L.Callback):
    """SIGKILL this process (a real crash: no cleanup, no handler runs) ``during``
    ``collection`` (after the ``after``-th trajectory shard is written), ``selection`` (inside
    the ``after``-th influence pass, at its first projection) or ``training`` (at the end of
    optimizer step ``after``, before that step's checkpoint)."""

    def __init__(self, during: str, after: int) -> None:
        if during not in ("collection", "selection", "training"):
            raise ValueError(f"during must be collection, selection or training, got {during!r}")
        self.during = during
        self.after = after

    @staticmethod
    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from cropi_pl.influence.cache import TrajectoryCache
        from cropi_pl.influence.scorer import InfluenceScorer

        count = [0]
        if self.during == "collection":
            write = TrajectoryCache.write_shard

            def write_then_die(*args: Any, **kwargs: Any) -> None:
                write(*args, **kwargs)
                count[0] += 1
                if count[0] >= self.after:
                    self._die()

            TrajectoryCache.write_shard = staticmethod(write_then_die)
        elif self.during == "selection":
            score, project = InfluenceScorer.score, InfluenceScorer.project

            def counted_score(scorer: Any, *args: Any, **kwargs: Any) -> Any:
                count[0] += 1
                return score(scorer, *args, **kwargs)

            def project_or_die(scorer: Any, *args: Any, **kwargs: Any) -> Any:
                if count[0] >= self.after:
                    self._die()
                return project(scorer, *args, **kwargs)

            InfluenceScorer.score = counted_score
            InfluenceScorer.project = project_or_die

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.during == "training" and trainer.global_step == self.after:
            self._die()


class PoisonWeights(L.Callback):
    """Set one policy weight to NaN before the rollout at ``step`` (as a corrupted state)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.policy.parameters()).view(-1)[0] = torch.nan


def hanging_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward that never returns (a stuck solver)."""
    while True:
        time.sleep(1)


# ----------------------------------------------------------------- helpers
def cli(work: Path, *args: str, config: Path = CROPI, script: str | None = None) -> tuple:
    """(return code, stdout + stderr, seconds) of ``python -m cropi_pl`` (or a tool script)."""
    head = [sys.executable, script] if script else [sys.executable, "-m", "cropi_pl", args[0]]
    rest = args if script else args[1:]
    cmd = [*head, "--config", str(config), f"--trainer.default_root_dir={work}", *rest]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tools")]),
    }
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def last_line(text: str, needle: str) -> str:
    """The last line of ``text`` that contains ``needle`` (stripped), or '(not found)'."""
    lines = [line.strip() for line in text.splitlines() if needle in line]
    return lines[-1] if lines else f"(no line with {needle!r})"


def shards(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted((run / "trajectories").rglob("shard-*.parquet"))
    }


def selections(run: Path) -> dict[str, list[str]]:
    return {
        p.name: json.loads(p.read_text())["ids"]
        for p in sorted((run / "selections").glob("stage-*[0-9].json"))
    }


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("policy.")}


def max_weight_gap(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def flip_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def overlay(path: Path, config: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


Row = dict[str, Any]


def row(probe: str, expected: str, observed: str, ok: bool) -> Row:
    return {"probe": probe, "expected": expected, "observed": observed, "ok": bool(ok)}


# ----------------------------------------------------------------- probes
def kill_and_resume(work: Path, straight: Path, during: str, after: int) -> Row:
    """SIGKILL during ``during``, resume, compare everything with the straight run."""
    run = work / f"killed-{during}"
    crash = [
        "--trainer.callbacks+=fault_sweep.Crash",
        f"--trainer.callbacks.init_args.during={during}",
        f"--trainer.callbacks.init_args.after={after}",
    ]
    code, _, _ = cli(run, "fit", SHARDS, *crash)
    killed = code == -signal.SIGKILL
    ckpt = run / "checkpoints" / "last.ckpt"
    at = torch.load(ckpt, weights_only=False)["global_step"] if ckpt.exists() else None
    code, text, _ = cli(run, "fit", SHARDS, "--ckpt_path=last", "--resume_if_missing=true")
    same_shards = shards(run) == shards(straight)
    same_selections = selections(run) == selections(straight)
    gap = max_weight_gap(run, straight) if code == 0 else float("nan")
    observed = (
        f"{'SIGKILLed' if killed else f'NOT killed (rc {code})'}"
        f"{f' after step {at}' if at is not None else ' before any checkpoint'}; resumed: "
        f"rc {code}, shards {'identical' if same_shards else 'DIFFER'}, "
        f"{len(selections(run))} selections {'identical' if same_selections else 'DIFFER'}, "
        f"final weights max |diff| {gap:.1e}"
    )
    ok = killed and code == 0 and same_shards and same_selections and gap <= WEIGHT_TOLERANCE
    return row(
        f"SIGKILL during {during}, resume",
        "resumes to the uninterrupted run's cache, selections and weights",
        observed,
        ok,
    )


def corrupted_checkpoint(work: Path, run: Path) -> Row:
    ckpt = run / "checkpoints" / "last.ckpt"
    flip_middle(ckpt)
    code, text, _ = cli(run, "fit", SHARDS, "--ckpt_path=last")
    line = last_line(text, "is corrupted")
    return row(
        "64 bytes flipped in last.ckpt, resume",
        "refused, naming the file (no NaN run)",
        f"rc {code}: {line[:160]}",
        code != 0 and str(ckpt) in line,
    )


def deleted_shard(straight: Path) -> Row:
    before = shards(straight)
    victim = straight / sorted(before)[1]
    victim.unlink()
    code, text, _ = cli(straight, SHARDS, script="tools/collect_trajectories.py")
    line = last_line(text, "re-collected")
    same = shards(straight) == before
    return row(
        "cache shard deleted, tools/collect_trajectories.py",
        "that shard re-collected alone, same bytes, reported",
        f"rc {code}: {line[:120]}; bytes {'identical' if same else 'DIFFER'}",
        code == 0 and same and victim.name in line,
    )


def corrupted_shard(work: Path, straight: Path) -> Row:
    run = work / "corrupted-shard"
    shutil.copytree(straight / "trajectories", run / "trajectories")
    before = shards(run)
    victim = run / sorted(before)[0]
    flip_middle(victim, 8)
    code, text, _ = cli(run, "fit", SHARDS, "--trainer.max_steps=1")
    line = last_line(text, "re-collected")
    same = shards(run) == before
    return row(
        "cache shard corrupted (8 bytes flipped), fit",
        "that shard re-collected alone before training, same bytes",
        f"rc {code}: {line[:120]}; bytes {'identical' if same else 'DIFFER'}",
        code == 0 and same and victim.name in line,
    )


def other_seed(work: Path, straight: Path) -> Row:
    run = work / "seed1"
    code, _, _ = cli(run, "fit", SHARDS, "--seed_everything=1", "--trainer.max_steps=2")
    a, b = selections(straight)["stage-000.json"], selections(run)["stage-000.json"]
    cache_differs = shards(run) != shards(straight)
    return row(
        "--seed_everything 1 vs 0",
        "another trajectory cache and selection",
        f"rc {code}; cache {'differs' if cache_differs else 'IDENTICAL'}; stage-0 selections "
        f"{'differ' if a != b else 'IDENTICAL'} ({len(set(a) & set(b))} of {len(a)} shared)",
        code == 0 and cache_differs and a != b,
    )


def hanging(work: Path) -> Row:
    run = work / "hanging-reward"
    config = overlay(
        run / "overlay.yaml",
        {
            "model": {
                "init_args": {"rewards": ["fault_sweep.hanging_reward"], "reward_timeout_s": 2}
            }
        },
    )
    code, text, seconds = cli(
        run,
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        config=TINY,
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, float] = {}
    for events in run.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars.update({t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]})
    step_s = scalars.get("time/reward_and_prep_s", float("nan"))
    timeouts = scalars.get("rewards/hanging_reward/timeouts", float("nan"))
    return row(
        "reward that never returns (reward_timeout_s 2)",
        "the step's scoring takes about the timeout; every completion counted",
        f"rc {code}; reward+prep {step_s:.1f} s; rewards/hanging_reward/timeouts {timeouts:.0f}"
        f" of 16",
        code == 0 and step_s < 2 + 1.5 and timeouts == 16,
    )


def math_verify_timeouts() -> Row:
    code = (
        "from cropi_pl.rewards import MathVerifyReward, safe_rewards\n"
        "r = MathVerifyReward(timeout_s=0.3, max_answer_chars=10**7)\n"
        "t = ['\\\\boxed{10!!!!!!}', '\\\\boxed{1}']\n"
        "print(safe_rewards(r, t, t, ['7', '1'], [{}, {}], timeout_s=30))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    out = last_line(proc.stdout, "RewardOutcome")
    return row(
        "math-verify's own timeout (10!!!!!! in 0.3 s)",
        "counted in rewards/<name>/timeouts",
        out,
        "timeouts=1" in out,
    )


def data_errors(work: Path) -> list[Row]:
    from cropi_pl.tasks.loading import PromptFile

    good = b'{"question": "q", "answer": "#### 1"}\n'
    cases = {
        "empty.jsonl": (b"", "empty file"),
        "latin1.jsonl": (good + b'{"question": "caf\xe9", "answer": "#### 1"}\n', "line 2"),
        "notjson.jsonl": (good * 2 + b"question: q\n", "line 3"),
        "unclosed.jsonl": (good + b'{"question": "q", "answer": "\\\\boxed{1"}\n', "row 2"),
    }
    rows = []
    for name, (content, where) in cases.items():
        path = work / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        try:
            PromptFile(str(path)).load()
            message = "(loaded without an error)"
        except Exception as error:  # what a user would see
            message = f"{type(error).__name__}: {error}"
        rows.append(
            row(
                f"data file: {name}",
                f"an error naming the file and {where}",
                message.replace(str(work / "data") + "/", "")[:140],
                f"{name}" in message and where in message,
            )
        )
    return rows


def quiet_surprises(work: Path) -> list[Row]:
    run = work / "no-checkpoint"
    code, text, _ = cli(run, "fit", "--ckpt_path=last", config=TINY)
    rows = [
        row(
            "--ckpt_path last without a checkpoint",
            "an error (opt in: --resume_if_missing true)",
            f"rc {code}: {last_line(text, 'no last checkpoint')[:140]}",
            code != 0 and "no last checkpoint" in text,
        )
    ]
    from cropi_pl.cli import main
    from cropi_pl.grpo.module import GRPOModule

    checks = {
        "precision 16-mixed on CPU": (
            lambda: main(["--config", str(TINY), "--trainer.precision=16-mixed"], run=False),
            "needs a GPU",
        ),
        "model path that does not exist": (
            lambda: GRPOModule(model="runs/nowhere/hf_model"),
            "does not exist",
        ),
    }
    for probe, (call, needle) in checks.items():
        try:
            call()
            message = "(accepted)"
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
        rows.append(row(probe, "refused with a message", message[:140], needle in message))
    return rows


def nonfinite(work: Path) -> Row:
    run = work / "nan-weights"
    code, text, _ = cli(
        run,
        "fit",
        "--trainer.max_steps=8",
        "--trainer.callbacks+=fault_sweep.PoisonWeights",
        "--trainer.callbacks.init_args.step=2",
        config=TINY,
    )
    line = last_line(text, "FloatingPointError")
    saved = weights(run) if (run / "checkpoints" / "last.ckpt").exists() else {}
    finite = bool(saved) and all(torch.isfinite(v).all() for v in saved.values())
    return row(
        "NaN in the weights from step 2",
        "steps skipped, then stop naming step and last checkpoint (finite)",
        f"rc {code}: {line[:150]}; last.ckpt {'finite' if finite else 'NOT finite'}",
        code != 0 and "stopped at step 2" in line and "last.ckpt" in line and finite,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/fault_sweep")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    work, out = ROOT / args.work, ROOT / args.out
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(1)
    started = time.perf_counter()
    straight = work / "straight"
    code, text, seconds = cli(straight, "fit", SHARDS)
    if code != 0:
        raise SystemExit(f"the uninterrupted reference run failed:\n{text[-3000:]}")
    print(f"uninterrupted reference run: {seconds:.0f} s", flush=True)
    probes: list[Callable[[], Row | list[Row]]] = [
        lambda: kill_and_resume(work, straight, "collection", 2),
        lambda: kill_and_resume(work, straight, "selection", 2),
        lambda: kill_and_resume(work, straight, "training", 3),
        lambda: corrupted_checkpoint(work, work / "killed-training"),
        lambda: corrupted_shard(work, straight),
        lambda: other_seed(work, straight),
        lambda: deleted_shard(straight),  # last of those that read the reference run
        lambda: hanging(work),
        math_verify_timeouts,
        lambda: data_errors(work),
        lambda: quiet_surprises(work),
        lambda: nonfinite(work),
    ]
    rows: list[Row] = []
    for probe in probes:
        t0 = time.perf_counter()
        result = probe()
        for r in result if isinstance(result, list) else [result]:
            r["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(r)
            print(f"[{'ok' if r['ok'] else 'FAIL'}] {r['probe']}: {r['observed']}", flush=True)
    total = time.perf_counter() - started
    print("\n| probe | expected | observed | ok |\n|---|---|---|---|")
    for r in rows:
        observed = r["observed"].replace("|", "\\|")
        print(f"| {r['probe']} | {r['expected']} | {observed} | {'yes' if r['ok'] else 'NO'} |")
    report = {
        "rows": rows,
        "all_ok": all(r["ok"] for r in rows),
        "total_seconds": round(total, 1),
        "load_average_at_end": os.getloadavg(),
        "machine": info,
    }
    (out / "fault_sweep.json").write_text(json.dumps(report, indent=1))
    print(
        f"\n{sum(r['ok'] for r in rows)} of {len(rows)} probes as expected in {total / 60:.1f} min"
        f"; wrote {out / 'fault_sweep.json'}"
    )
    if not report["all_ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
