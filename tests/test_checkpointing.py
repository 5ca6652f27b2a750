"""Checkpoints: atomic writes, a checksum written with each one, verified when it is read back."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from cropi_pl.checkpointing import (
    MANIFEST,
    CheckpointCorrupted,
    VerifiedCheckpointIO,
    save_verified,
    sidecar,
    verify_checkpoint,
    write_manifest,
)
from tests.cli_utils import run_cli


def _flip_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"state_dict": {"w": torch.randn(64, 64, generator=generator)}, "global_step": seed}


def test_round_trip_and_flipped_bytes_are_refused_naming_the_file(tmp_path: Path) -> None:
    io = VerifiedCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_state(1), path)
    io.save_checkpoint(_state(2), path)  # overwrite: the sidecar follows
    assert json.loads(sidecar(path).read_text())["sha256"] == [
        hashlib.sha256(path.read_bytes()).hexdigest()
    ]
    loaded = io.load_checkpoint(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], _state(2)["state_dict"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]
    _flip_middle(path)
    with pytest.raises(CheckpointCorrupted, match=r"checkpoint .*last\.ckpt is corrupted"):
        io.load_checkpoint(path, weights_only=True)
    io.remove_checkpoint(path)
    assert not list(tmp_path.iterdir())


def test_a_kill_between_file_and_sidecar_still_verifies(tmp_path: Path) -> None:
    # The sidecar is rewritten to accept the new digest and the old one before the rename: a
    # kill right after it leaves the old file with a sidecar that still accepts it.
    path = tmp_path / "last.ckpt"
    save_verified(_state(1), path)
    old = path.read_bytes()
    save_verified(_state(2), path)
    new_digest = json.loads(sidecar(path).read_text())["sha256"][0]
    old_digest = hashlib.sha256(old).hexdigest()
    sidecar(path).write_text(json.dumps({"sha256": [new_digest, old_digest]}))
    path.write_bytes(old)
    verify_checkpoint(path)


def test_missing_sidecar_loads_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "old.ckpt"
    torch.save(_state(3), path)
    with caplog.at_level(logging.WARNING):
        VerifiedCheckpointIO().load_checkpoint(path, weights_only=True)
    assert "no checksum file" in caplog.text


def test_folder_manifest_names_the_damaged_or_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    for rank in range(2):
        torch.save(_state(rank), folder / f"__{rank}_0.distcp")
    torch.save({"global_step": 2}, folder / "meta.pt")
    write_manifest(folder)
    assert set(json.loads((folder / MANIFEST).read_text())) == {
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    }
    verify_checkpoint(folder)
    _flip_middle(folder / "__1_0.distcp", 8)
    with pytest.raises(CheckpointCorrupted, match=r"__1_0\.distcp differs"):
        verify_checkpoint(folder)
    (folder / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointCorrupted, match=r"incomplete: __1_0\.distcp is missing"):
        verify_checkpoint(folder)


def test_resuming_from_a_corrupted_real_checkpoint_stops_naming_it(tmp_path: Path) -> None:
    run_cli("fit", "--trainer.max_steps=2", "--trainer.val_check_interval=2", run_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert sidecar(last).is_file()
    _flip_middle(last)
    proc = run_cli("fit", "--ckpt_path=last", run_dir=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"checkpoint {last} is corrupted" in proc.stderr
