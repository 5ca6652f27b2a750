"""Checkpoints that are written atomically and verified by checksum when they are read back.

A checkpoint damaged on disk (a bad sector, a truncated copy, flipped bytes) used to load without
a word: a few optimizer moments turned into -1e9 and the run went on to NaN. Here every checkpoint
carries the sha256 of its bytes, recorded when it was written, and a mismatch on load stops the
run with an error that names the file.

- A file checkpoint (one process, DDP) is written by :class:`VerifiedCheckpointIO` to a temporary
  file in the same folder, fsynced and renamed over the old one; its digest goes to the sidecar
  ``<name>.sha256``. While the rename happens the sidecar accepts both the new digest and the one
  it replaces, so a kill between the two writes leaves a pair that still verifies.
- A distributed (FSDP2) checkpoint folder is written by :class:`VerifiedModelParallelStrategy`
  under a temporary name, given a ``cropi_checksums.json`` manifest of every file's sha256 and
  renamed into place (:func:`~cropi_pl.atomic.publish_directory`).

Checkpoints without a sidecar or manifest (written before this, or by another tool) load with a
warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from cropi_pl.atomic import publish_directory, sha256_file, write_bytes_atomic

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
MANIFEST = "cropi_checksums.json"


class CheckpointCorrupted(ValueError):
    """A checkpoint's bytes differ from the checksum recorded when it was written."""


def sidecar(path: str | os.PathLike[str]) -> Path:
    """The checksum file of the file checkpoint ``path``."""
    return Path(f"{path}{SIDECAR_SUFFIX}")


def _restore_hint(path: Path) -> str:
    return (
        f"restore {path.name} from a copy, or resume from another checkpoint with --ckpt_path "
        "<file>; without one, start again without --ckpt_path"
    )


def save_verified(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically, recording its sha256 in the sidecar."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(checkpoint, stream)
            stream.flush()
            os.fsync(stream.fileno())
        digest = sha256_file(tmp)
        record = sidecar(target)
        previous = _recorded(record)[:1] if target.exists() else []
        write_bytes_atomic(record, json.dumps({"sha256": [digest, *previous]}).encode())
        os.replace(tmp, target)
        write_bytes_atomic(record, json.dumps({"sha256": [digest]}).encode())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _recorded(record: Path) -> list[str]:
    """The digests a sidecar accepts (the current one first); [] if it is missing or unreadable."""
    try:
        digests = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [d for d in digests if isinstance(d, str)] if isinstance(digests, list) else []


def verify_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointCorrupted` if the file's sha256 is not the one recorded."""
    target = Path(path)
    record = sidecar(target)
    if not record.exists():
        logger.warning("checkpoint %s has no checksum file %s; not verified", target, record.name)
        return
    accepted = _recorded(record)
    digest = sha256_file(target)
    if digest not in accepted:
        raise CheckpointCorrupted(
            f"checkpoint {target} is corrupted: its sha256 {digest[:16]}... is not the "
            f"{(accepted or ['(unreadable)'])[0][:16]}... recorded in {record.name} when it was "
            f"written; {_restore_hint(target)}"
        )


def write_manifest(folder: Path) -> None:
    """Record the sha256 of every file under ``folder`` in its manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True))


def verify_folder(folder: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointCorrupted` naming the first file of a checkpoint folder that is
    missing or differs from its manifest."""
    root = Path(folder)
    manifest = root / MANIFEST
    if not manifest.exists():
        logger.warning("checkpoint folder %s has no %s; not verified", root, MANIFEST)
        return
    try:
        digests = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointCorrupted(f"checkpoint {root}: unreadable {MANIFEST} ({error})") from None
    for name, expected in sorted(digests.items()):
        path = root / name
        if not path.is_file():
            raise CheckpointCorrupted(
                f"checkpoint {root} is incomplete: {name} is missing; {_restore_hint(root)}"
            )
        if sha256_file(path) != expected:
            raise CheckpointCorrupted(
                f"checkpoint {root} is corrupted: {path} differs from the sha256 recorded in "
                f"{MANIFEST} when it was written; {_restore_hint(root)}"
            )


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Verify a file checkpoint or a distributed checkpoint folder (see the module docstring)."""
    if Path(path).is_dir():
        verify_folder(path)
    else:
        verify_file(path)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic writes and a checksum verified on load.

    The CLI installs it on every trainer whose strategy uses the default checkpoint IO.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_verified(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if Path(path).is_file():
            verify_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        sidecar(path).unlink(missing_ok=True)


class VerifiedModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) whose distributed checkpoint folders are published
    atomically with a checksum manifest and verified before they are loaded.

    Every rank writes its shards into one temporary folder (named by rank 0); rank 0 then writes
    the manifest and renames the folder over the old checkpoint.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        target = Path(self.broadcast(filepath))
        tmp = None
        if self.global_rank == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        tmp = Path(self.broadcast(tmp))
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("checkpoint_written")
        if self.global_rank == 0:
            write_manifest(tmp)
            publish_directory(tmp, target)
        self.barrier("checkpoint_published")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        verify_checkpoint(self.broadcast(checkpoint_path))
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


__all__ = [
    "CheckpointCorrupted",
    "VerifiedCheckpointIO",
    "VerifiedModelParallelStrategy",
    "save_verified",
    "verify_checkpoint",
]
