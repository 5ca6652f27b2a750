"""Helpers that drive the real ``python -m cropi_pl`` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny_test.yaml"


def run_cli(
    *args: str,
    run_dir: Path,
    config: Path = TINY,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run the CLI with every output path redirected under ``run_dir``.

    The config's checkpoint directory must be ``runs/test/checkpoints``: it is rewritten here.
    """
    text = config.read_text().replace("runs/test", str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    local = run_dir / f"_{config.name}"
    local.write_text(text)
    paths = [f"--trainer.default_root_dir={run_dir}"]
    cmd = [sys.executable, "-m", "cropi_pl", *args[:1], "--config", str(local), *paths, *args[1:]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"CLI failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def event_tags(run_dir: Path) -> dict[str, list[float]]:
    """Scalar tags and values from every TensorBoard event file under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def completions_table(run_dir: Path) -> list[list[str]]:
    """The cells of the last ``completions`` text table logged to TensorBoard under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tables = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        if "completions/text_summary" in acc.Tags()["tensors"]:
            tables += acc.Tensors("completions/text_summary")
    assert tables, f"no completions table under {run_dir}"
    text = tables[-1].tensor_proto.string_val[0].decode()
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in text.splitlines()]


def policy_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}
