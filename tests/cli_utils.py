"""Helpers that drive the real CLI: in this process through ``cropi_pl.cli.main`` (the
default: no interpreter start-up, no re-import of torch and Lightning), or in a fresh
``python -m cropi_pl`` subprocess where a separate process is the point (a SIGKILL, a launcher
that spawns ranks, a tool script)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cropi_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny_test.yaml"
CROPI = ROOT / "tests" / "configs" / "cropi_test.yaml"


@dataclass
class CLIRun:
    """What a CLI run left behind: exit status (0 on success) and its console text."""

    returncode: int
    stdout: str
    stderr: str


def _cli_args(args: tuple[str, ...], run_dir: Path, config: Path) -> list[str]:
    """``<args[0]> --config config --trainer.default_root_dir=run_dir <args[1:]>`` (no
    subcommand when ``args`` is empty)."""
    return [*args[:1], "--config", str(config), f"--trainer.default_root_dir={run_dir}", *args[1:]]


def _checked(run: CLIRun, check: bool) -> CLIRun:
    if check and run.returncode != 0:
        raise AssertionError(
            f"CLI failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
        )
    return run


@contextlib.contextmanager
def _isolated():
    """What a run changes in this process is undone afterwards: the environment (Lightning
    sets ``PL_GLOBAL_SEED``, ``MASTER_PORT``, ...), a process group it initialised, the thread
    count. The run gets one intra-op thread, as a subprocess does with ``OMP_NUM_THREADS=1``, so
    it computes the same numbers here as in a fresh process."""
    environ = dict(os.environ)
    threads = torch.get_num_threads()
    had_group = dist.is_initialized()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if dist.is_initialized() and not had_group:
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def run_cli(
    *args: str, run_dir: Path, config: Path = TINY, check: bool = True, cwd: Path = ROOT
) -> CLIRun:
    """Run ``cropi_pl.cli.main([args[0], "--config", config, ...])`` in this process from
    ``cwd``, with every output of the run under ``run_dir`` (``--trainer.default_root_dir``).

    stdout, stderr and Lightning's console log are captured; an exception or ``SystemExit``
    becomes a non-zero ``returncode`` with the traceback in ``stderr``, as a subprocess's would.
    """
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    code = 0
    try:
        with (
            contextlib.chdir(cwd),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            _isolated(),
        ):
            try:
                main(_cli_args(args, run_dir, config))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        lightning_log.removeHandler(handler)
    return _checked(CLIRun(code, out.getvalue(), err.getvalue()), check)


def run_cli_process(
    *args: str,
    run_dir: Path,
    config: Path = TINY,
    timeout: float = 300,
    check: bool = True,
    script: Path | None = None,
) -> CLIRun:
    """``run_cli`` in a fresh ``python -m cropi_pl`` process (this checkout's ``cropi_pl``).
    ``script`` runs that tool instead, with the same arguments but no subcommand."""
    if script is None:
        cmd = [sys.executable, "-m", "cropi_pl", *_cli_args(args, run_dir, config)]
    else:
        cmd = [sys.executable, str(script), *_cli_args((), run_dir, config), *args]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return _checked(CLIRun(proc.returncode, proc.stdout, proc.stderr), check)


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
