"""Freed host memory stays in the process: glibc's own accounting (``mallinfo2``) of a tensor's
block, in fresh processes."""

from __future__ import annotations

import subprocess
import sys

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
