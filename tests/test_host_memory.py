"""Freed host memory stays in the process: glibc's own accounting (``mallinfo2``) of a tensor's
block, in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cropi_pl import cli, host_memory

BLOCK = """
import ctypes, sys
import torch
from cropi_pl.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # glibc's documented starting values (128 KiB), held fixed so the control is stable
    assert libc.mallopt(-3, 128 << 10) == 1 and libc.mallopt(-1, 128 << 10) == 1
before = libc.mallinfo2()
tensor = torch.ones(6 << 20)  # 24 MiB, written
during = libc.mallinfo2()
del tensor
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, after.arena - before.arena)
"""
MIB = 1 << 20


def block_accounting(mode: str) -> tuple[int, int]:
    """(bytes the tensor took as its own mmap, heap bytes still held after it was freed)."""
    out = subprocess.run(
        [sys.executable, "-c", BLOCK, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_a_freed_tensor_block_stays_in_the_heap() -> None:
    """Kept: the 24 MiB block comes from the heap and the heap keeps it after the tensor is
    freed, so the next tensor reuses pages already faulted in. glibc's starting values: the
    block is a private mmap, unmapped (and faulted in again) every time."""
    mapped, held = block_accounting("keep")
    assert mapped == 0 and held >= 16 * MIB, (mapped, held)  # less what the heap had free
    mapped, held = block_accounting("default")
    assert mapped >= 24 * MIB and held < 8 * MIB, (mapped, held)


def test_opt_out_and_no_glibc_set_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: str) -> None:
        raise AssertionError(f"loaded {name} although nothing should be set")

    monkeypatch.setattr(host_memory.ctypes, "CDLL", no_libc)
    monkeypatch.setenv(host_memory.OPT_OUT, "0")
    assert host_memory.keep_freed_memory() is False

    def missing(name: str) -> None:
        raise OSError(f"{name}: not found")

    monkeypatch.delenv(host_memory.OPT_OUT)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", missing)
    assert host_memory.keep_freed_memory() is False


def test_the_cli_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls: list[None] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(None) or True)
    cli.main(
        ["--config", "configs/cropi_tiny.yaml", "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )
    assert len(calls) == 1


HUGE = """
import sys
from cropi_pl.host_memory import huge_pages_for_large_tensors
promised = huge_pages_for_large_tensors()
import torch
tensor = torch.ones(16 << 20)  # 64 MiB, written
with open("/proc/self/smaps_rollup") as smaps:
    huge = next(int(line.split()[1]) for line in smaps if line.startswith("AnonHugePages:"))
print(promised, huge << 10)
"""


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no transparent huge pages")
def test_large_tensors_sit_on_huge_pages_unless_opted_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked before torch is imported: the 64 MiB tensor sits on huge pages. Opted out
    (``THP_MEM_ALLOC_ENABLE=0``), it does not where the kernel only gives them on request."""

    def run() -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", HUGE], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    monkeypatch.delenv(host_memory.HUGE_PAGES, raising=False)
    promised, huge = run()
    assert promised == "True" and huge >= 48 * MIB, huge
    monkeypatch.setenv(host_memory.HUGE_PAGES, "0")
    promised, huge = run()
    assert promised == "False"
    if _thp_mode() == "madvise":
        assert huge < 16 * MIB, huge


def test_huge_pages_are_too_late_once_torch_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(host_memory.HUGE_PAGES, raising=False)
    assert "torch" in sys.modules  # this test process imported it
    assert host_memory.huge_pages_for_large_tensors() is False
    assert host_memory.HUGE_PAGES not in os.environ


ENTRY = """
import os, runpy, sys
sys.argv = ["cropi_pl", "--help"]
try:
    runpy.run_module("cropi_pl", run_name="__main__")
except SystemExit:
    pass
print(os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


def test_the_entry_point_asks_for_huge_pages_before_importing_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Set at all means it ran before torch was imported (afterwards it sets nothing)."""
    monkeypatch.delenv(host_memory.HUGE_PAGES, raising=False)
    out = subprocess.run(
        [sys.executable, "-c", ENTRY], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-1] == "1", out[-5:]


BENCH = """
import os, sys
sys.path.insert(0, "tools")
import bench_influence
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), bench_influence.HUGE_PAGES)
"""


def test_the_influence_bench_asks_for_huge_pages_as_the_cli_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tools/bench_influence.py measures what a fit runs: it asks before importing torch."""
    monkeypatch.delenv(host_memory.HUGE_PAGES, raising=False)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", BENCH], capture_output=True, text=True, check=True, cwd=root
    ).stdout.split()
    assert out[-2:] == ["1", "True"], out[-5:]
