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
    cwd: Path = ROOT,
    script: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m cropi_pl <args[0]> --config config <args[1:]>`` with every output of the
    run under ``run_dir`` (``--trainer.default_root_dir``); this checkout's ``cropi_pl`` is
    imported whatever ``cwd`` is. ``script`` runs that tool instead of ``-m cropi_pl``, with the
    same arguments but no subcommand."""
    paths = [f"--trainer.default_root_dir={run_dir}"]
    if script is None:
        cmd = [sys.executable, "-m", "cropi_pl", *args[:1], "--config", str(config), *paths]
        cmd += args[1:]
    else:
        cmd = [sys.executable, str(script), "--config", str(config), *paths, *args]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"CLI failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


SCRATCH = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under ``root`` but caches and .git."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SCRATCH]
        for name in filenames:
            stat = (Path(dirpath) / name).stat()
            out[str((Path(dirpath) / name).relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


def changed_files(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def fit_in_empty_cwd(run_dir: Path, cwd: Path, *args: str, config: Path = TINY) -> list[str]:
    """Fit with ``--trainer.default_root_dir run_dir`` from an empty ``cwd``; returns the files
    of this checkout the run created or modified (there should be none)."""
    before = tree_state(ROOT)
    run_cli("fit", *args, run_dir=run_dir, config=config, cwd=cwd)
    return changed_files(before, tree_state(ROOT))


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
