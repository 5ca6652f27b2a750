"""atomic_directory: a folder appears whole under its name, or the old one stays."""

import os

import pytest

from cropi_pl import atomic
from cropi_pl.atomic import atomic_directory, remove_leftovers


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_new_folder_replaces_the_old_with_plain_permissions(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.bin").write_bytes(b"\0" * 10)
        os.chmod(tmp / "sub" / "new.bin", 0o600)  # as safetensors writes it
        assert not (target / "sub").exists() and (target / "old.txt").exists()
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/new.bin"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert (target / "sub" / "new.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_error_inside_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "old.txt").read_text() == "old"


def test_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # moving the new folder into place
            raise OSError("simulated")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_remove_leftovers_only_touches_this_targets_temporaries(tmp_path):
    for name in (".model.x1.tmp", ".model.x2.old", ".other.x3.tmp", "model"):
        (tmp_path / name).mkdir()
    removed = remove_leftovers(tmp_path / "model")
    assert sorted(p.name for p in removed) == [".model.x1.tmp", ".model.x2.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x3.tmp", "model"]
