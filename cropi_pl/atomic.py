"""Atomic writes (a file or folder appears complete under its final name or not at all) and
file digests.

Model folders (the converted embedded model, the HF export at the end of ``fit``), checkpoints,
trajectory shards, manifests, projected gradients and benchmark results are read by other
processes and tools; a crash or a full disk mid-write must never leave a half-written artifact
that a later run trusts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and replaces ``path`` in
    one ``os.replace``, so readers never see a half-written file (a crash leaves the old one)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it becomes ``path``.

    The temporary folder lives in the same parent (same file system), so publishing it is one
    ``os.rename`` after its files are fsynced. An existing ``path`` is renamed aside first and
    deleted once the new folder is in place (it is put back if that rename fails). On error the
    temporary folder is removed and ``path`` is left untouched. Concurrent writers of the same
    ``path`` must be serialised by the caller (a file lock, or one rank writing).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(tmp: Path, target: Path) -> None:
    """Make the finished folder ``tmp`` (a sibling of ``target``) become ``target``: its files
    are fsynced, then one rename puts it in place (an old ``target`` is swapped out first).
    For writers that fill the folder from several processes (FSDP2 checkpoint shards)."""
    _finish_files(tmp)
    _publish(tmp, target)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in chunks (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _finish_files(folder: Path) -> None:
    """fsync every file, and give the folder the permissions of a plain ``mkdir``/``open``
    (``mkdtemp`` makes it private, and safetensors writes 0600), so a shared cache is shared."""
    umask = os.umask(0o022)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _publish(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.rename(target, aside / "previous")
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside / "previous", target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary folders a killed :func:`atomic_directory` left next to ``path``.

    Only safe while no other process writes ``path`` (hold its lock). Returns what was removed.
    """
    target = Path(path)
    removed = []
    for pattern in (f".{target.name}.*.tmp", f".{target.name}.*.old"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed
