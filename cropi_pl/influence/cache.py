"""Offline trajectory cache: K responses per prompt sampled ONCE from the behaviour policy.

POPI (docs/method.md section 3) never regenerates responses: every stage reweights the same stored
samples of beta. This module stores token ids, beta's per-token log-probs, rewards
and decoded texts as parquet shards, and hands them back as ``datasets.Dataset`` rows or
:class:`~cropi_pl.influence.trajectories.PromptTrajectories`.

Layout under ``root``::

    manifest.json                      written by rank 0 only
    splits/<quoted split>/shard-00000.parquet, shard-00001.parquet, ...

Multi-process design. Shard ``j`` always holds prompts ``rows[j*S:(j+1)*S]`` (S = shard_size)
and rank ``r`` of ``W`` writes the shards ``j`` with ``j % W == r``. The layout therefore does not
depend on the world size: one process and N ranks write byte-identical files, and an interrupted
collection can resume with a different number of ranks. Every shard is self-describing (its
parquet footer holds the model/data/sampling fingerprints and its row range), so ranks never
coordinate while collecting: a rank skips its shards that are already there and valid, and only
rank 0 touches the manifest. The driver protocol is: ``collect`` on every rank, barrier,
``mark_complete`` on rank 0 (``collect`` does this itself when ``world_size == 1``), barrier, load.

Files are written through :func:`~cropi_pl.atomic.atomic_file` (a hidden tmp file next to the
target, moved into place with ``os.replace``); tmp files a killed run left behind are removed when
the split is marked complete. Sampling seeds depend only on (settings.seed, split, prompt id, sample
index), so a resumed collection produces exactly the files an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cropi_pl.atomic import atomic_file, sha256_file
from cropi_pl.influence.collector import (
    Collector,
    SamplingSettings,
    check_collector_output,
    seed_tag,
)
from cropi_pl.influence.trajectories import PromptTrajectories, pass_rate, trajectories_from_columns

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_SHARD_META_KEY = b"cropi_pl.trajectories"
# shard files and the tmp files of interrupted writes (``atomic_file``'s or older fixed names)
_SHARD_NAME = re.compile(r"\.?shard-(\d{5,})\.parquet(\.\w+)?(\.tmp)?")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*")
_REBUILD_HINT = "pass rebuild=True (config: `trajectories.rebuild: true`)"
REPAIR_HINT = (
    "run `python tools/collect_trajectories.py --config <the run's configs>` (or `fit` again): "
    "a missing or corrupted shard is re-collected alone, with the same rows and seeds"
)

# Token ids fit int32 for any real vocabulary; log-probs are float32, which is what the model
# computes them in (float64 inputs are rounded to float32 on write).
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "completion_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "behaviour_logps": datasets.List(datasets.List(datasets.Value("float32"))),
        "rewards": datasets.List(datasets.Value("float64")),
        "texts": datasets.List(datasets.Value("string")),
        "truncated": datasets.List(datasets.Value("bool")),
    }
)


def _read_table(source: Any, path: Path) -> pa.Table:
    """A parquet table from ``source`` (a path or a buffer) without its footer metadata."""
    try:
        return pq.read_table(source).replace_schema_metadata(None)
    except (OSError, pa.ArrowException) as err:
        raise TrajectoryCacheError(f"cannot read trajectory shard {path}: {err}") from err


class TrajectoryCacheError(RuntimeError):
    """A split that is missing, incomplete or corrupted on disk."""


class CacheMismatchError(TrajectoryCacheError):
    """Stored trajectories were sampled from a different model, data set or sampling setup."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _flatten(identity: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in identity.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted field, stored value, wanted value) for every field that differs."""
    old, new = _flatten(stored), _flatten(wanted)
    return [
        (k, old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def _mismatch(what: str, diffs: list[tuple[str, Any, Any]], delete: Path) -> CacheMismatchError:
    lines = [f"  {field}: stored {_short(old)} vs now {_short(new)}" for field, old, new in diffs]
    message = (
        f"{what} was sampled with different inputs:\n"
        + "\n".join(lines)
        + f"\nDelete {delete} or {_REBUILD_HINT} to resample it."
    )
    return CacheMismatchError(message, [field for field, _, _ in diffs])


def _shard_meta(path: Path) -> dict[str, Any] | None:
    """The identity stored in a shard's footer; None if the file is missing or unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[_SHARD_META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None


class TrajectoryCache:
    """Offline trajectories of named splits (``"pool"``, ``"target/gsm8k"``) under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    # ------------------------------------------------------------------ paths and manifest
    def path(self, split: str) -> Path:
        """The folder holding ``split``'s shards."""
        if not _SPLIT_NAME.fullmatch(split):
            raise ValueError(
                f"invalid split name {split!r}: use letters, digits, '_', '-', '.' and '/' "
                "(each '/'-separated part starting with a letter or digit)"
            )
        return self.root / "splits" / quote(split, safe="")

    def manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one if nothing was collected yet."""
        if not self.manifest_path.is_file():
            return {"version": MANIFEST_VERSION, "model": None, "splits": {}}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except ValueError as err:
            raise TrajectoryCacheError(f"unreadable manifest {self.manifest_path}: {err}") from err
        if manifest.get("version") != MANIFEST_VERSION:
            raise TrajectoryCacheError(
                f"manifest {self.manifest_path} has version {manifest.get('version')!r}; this code "
                f"reads version {MANIFEST_VERSION}. Delete {self.root} to resample."
            )
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))

    @staticmethod
    def _identity(model_fp: str, data_fp: str, settings: SamplingSettings) -> dict[str, Any]:
        return {"model": model_fp, "data": data_fp, "sampling": settings.as_dict()}

    def check(self, split: str, model_fp: str, data_fp: str, settings: SamplingSettings) -> None:
        """Raise :class:`CacheMismatchError` if stored data of ``split`` (or, for the model, of
        any split) came from other inputs; a split not collected yet passes."""
        manifest = self.manifest()
        wanted = self._identity(model_fp, data_fp, settings)
        entry = manifest["splits"].get(split)
        if entry is not None:
            stored = {
                "model": manifest["model"],
                "data": entry["data"],
                "sampling": entry["sampling"],
            }
            diffs = _differences(stored, wanted)
        elif manifest["splits"] and manifest["model"] != model_fp:
            diffs = [("model", manifest["model"], model_fp)]
        else:
            return
        if diffs:
            every_split = any(field == "model" for field, _, _ in diffs)
            delete = self.root if every_split else self.path(split)
            where = f"trajectory cache {self.root}" + ("" if every_split else f" split {split!r}")
            raise _mismatch(where, diffs, delete)

    def _entry(self, split: str, manifest: dict[str, Any]) -> dict[str, Any]:
        entry = manifest["splits"].get(split)
        if entry is None:
            raise TrajectoryCacheError(
                f"no trajectories for split {split!r} in {self.root} (collected: "
                f"{sorted(manifest['splits'])}); run the trajectory collection first"
            )
        return entry

    def is_complete(self, split: str) -> bool:
        entry = self.manifest()["splits"].get(split)
        return bool(entry and entry["complete"])

    # ------------------------------------------------------------------ collection
    def collect(
        self,
        split: str,
        rows: datasets.Dataset,
        collector: Collector,
        settings: SamplingSettings,
        model_fp: str,
        data_fp: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        shard_size: int = 64,
        progress: bool = True,
        rebuild: bool = False,
    ) -> dict[str, bool]:
        """Sample and store this rank's shards of ``rows``, skipping shards already stored.

        ``rebuild=True`` replaces trajectories made from other inputs instead of raising; shards
        that match are kept (resampling them would reproduce the same files). Of a complete
        split, only the shards that are missing or whose bytes differ from the manifest's
        checksum are sampled again, alone, with the same rows and seeds. Returns those repaired
        shards of this rank, each with whether it came back with the recorded bytes.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if "id" not in rows.column_names:
            raise ValueError(f"rows of split {split!r} lack an 'id' column ({rows.column_names})")
        ids = rows["id"]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise ValueError(f"split {split!r}: duplicate prompt id {i!r}")
            seen.add(i)
        directory = self.path(split)
        if not rebuild:
            self.check(split, model_fp, data_fp, settings)
        identity = self._identity(model_fp, data_fp, settings)
        manifest = self.manifest()
        entry = manifest["splits"].get(split)
        done = (
            entry is not None
            and entry["complete"]
            and not _differences(
                {"model": manifest["model"], "data": entry["data"], "sampling": entry["sampling"]},
                identity,
            )
        )
        damaged: set[str] = set()
        if done:  # keep the stored layout; collection below only repairs damaged shards
            shard_size = entry["shard_size"]
            damaged = set(self.damaged_shards(split))
        elif rank == 0:
            manifest = self._start_split(manifest, split, identity, len(rows), shard_size)
        directory.mkdir(parents=True, exist_ok=True)
        num_shards = math.ceil(len(rows) / shard_size)
        mine = range(rank, num_shards, world_size)
        tag = seed_tag(split, settings)
        total = sum(min(len(rows), (j + 1) * shard_size) - j * shard_size for j in mine)
        bar = tqdm(total=total, desc=f"trajectories {split}", disable=not progress or rank != 0)
        wrote = False
        repaired: dict[str, bool] = {}
        with bar:
            for j in mine:
                start, stop = j * shard_size, min(len(rows), (j + 1) * shard_size)
                path = directory / f"shard-{j:05d}.parquet"
                meta = {**identity, "split": split, "shard": j, "start": start, "stop": stop}
                if path.name in damaged:
                    logger.warning(
                        "trajectory shard %s (rows %d:%d) is missing or corrupted: re-collecting "
                        "it alone",
                        path,
                        start,
                        stop,
                    )
                elif not self._needs_sampling(path, meta, rebuild):
                    bar.update(stop - start)
                    continue
                columns = self.sample_columns(
                    rows.select(range(start, stop)).to_list(), collector, settings, tag
                )
                self.write_shard(path, columns, meta)
                wrote = True
                if path.name in damaged:
                    repaired[path.name] = sha256_file(path) == entry["checksums"][path.name]
                bar.update(stop - start)
                if rank == 0:
                    self._record_progress(split, manifest)
        if world_size == 1 and (wrote or not done):
            self.mark_complete(split)
        return repaired

    def damaged_shards(self, split: str) -> list[str]:
        """The shards of a complete split that are missing or whose bytes differ from the
        checksum recorded when it was completed ([] for a split not complete)."""
        entry = self.manifest()["splits"].get(split)
        if not entry or not entry["complete"]:
            return []
        directory = self.path(split)
        return [
            name
            for name in entry["shards"]
            if not (directory / name).is_file()
            or sha256_file(directory / name) != entry["checksums"][name]
        ]

    def _start_split(
        self,
        manifest: dict[str, Any],
        split: str,
        identity: dict[str, Any],
        num_prompts: int,
        shard_size: int,
    ) -> dict[str, Any]:
        """Rank 0: record the split as in progress; a new model drops every other split."""
        if manifest["model"] != identity["model"]:
            dropped = sorted(set(manifest["splits"]) - {split})
            if dropped:
                logger.warning(
                    "trajectory cache %s: model changed, dropping splits %s from the manifest",
                    self.root,
                    dropped,
                )
            manifest = {"version": MANIFEST_VERSION, "model": identity["model"], "splits": {}}
        manifest["splits"][split] = {
            "data": identity["data"],
            "sampling": identity["sampling"],
            "num_prompts": num_prompts,
            "shard_size": shard_size,
            "shards": [],
            "checksums": {},
            "complete": False,
        }
        self._write_manifest(manifest)
        return manifest

    def _record_progress(self, split: str, manifest: dict[str, Any]) -> None:
        """Rank 0, after each of its shards: list the shard files present so far."""
        entry = manifest["splits"][split]
        present = sorted(p.name for p in self.path(split).glob("shard-*.parquet"))
        entry.update(shards=present, checksums={}, complete=False)
        self._write_manifest(manifest)

    @staticmethod
    def _needs_sampling(path: Path, meta: dict[str, Any], rebuild: bool) -> bool:
        """False for a readable shard with this identity and row range; raises on foreign data."""
        stored = _shard_meta(path)
        if stored is None:
            if path.exists():
                logger.warning("unreadable trajectory shard %s: resampling it", path)
            return True
        identity_keys = ("model", "data", "sampling")
        diffs = _differences(
            {k: stored.get(k) for k in identity_keys}, {k: meta[k] for k in identity_keys}
        )
        if diffs and not rebuild:
            raise _mismatch(f"trajectory shard {path}", diffs, path.parent)
        return stored != meta

    @staticmethod
    def sample_columns(
        rows: list[dict], collector: Collector, settings: SamplingSettings, tag: str
    ) -> dict[str, list]:
        """Sample, score and teacher-force ``rows``: the columns of one shard (``FEATURES``)."""
        k = settings.num_samples
        prompt_ids, completions = collector.sample(rows, k, settings.temperature, tag)
        rewards = [float(r) for r in collector.score(rows, completions, k)]
        check_collector_output(rows, k, prompt_ids, completions, rewards)
        completion_ids = [list(c.ids) for c in completions]
        logps = collector.logps(prompt_ids, completion_ids)
        if len(logps) != len(completion_ids):
            raise ValueError(
                f"collector.logps returned {len(logps)} rows for {len(completion_ids)}"
            )
        for j, (lp, ids) in enumerate(zip(logps, completion_ids, strict=True)):
            if len(lp) != len(ids):
                raise ValueError(
                    f"prompt {rows[j // k]['id']!r}: sample {j % k} has {len(ids)} tokens but "
                    f"{len(lp)} behaviour log-probs"
                )
        groups = [slice(i * k, (i + 1) * k) for i in range(len(rows))]
        return {
            "id": [r["id"] for r in rows],
            "prompt_ids": [list(prompt_ids[g.start]) for g in groups],
            "completion_ids": [completion_ids[g] for g in groups],
            "behaviour_logps": [logps[g] for g in groups],
            "rewards": [rewards[g] for g in groups],
            "texts": [[collector.decode(ids) for ids in completion_ids[g]] for g in groups],
            "truncated": [[c.truncated for c in completions[g]] for g in groups],
        }

    @staticmethod
    def write_shard(path: Path, columns: dict[str, list], meta: dict[str, Any]) -> None:
        """Atomically write ``columns`` as parquet with ``meta`` in the footer."""
        table = datasets.Dataset.from_dict(columns, features=FEATURES).data.table
        metadata = {
            **(table.schema.metadata or {}),
            _SHARD_META_KEY: json.dumps(meta, sort_keys=True),
        }
        table = table.replace_schema_metadata(metadata)
        with atomic_file(path) as tmp:
            pq.write_table(table, tmp)

    @staticmethod
    def read_shard(path: Path) -> tuple[dict[str, list], dict[str, Any]]:
        """(columns, footer identity) of one shard written by :meth:`write_shard`."""
        meta = _shard_meta(path)
        if meta is None:
            raise TrajectoryCacheError(f"{path} is missing or not a trajectory shard")
        return _read_table(path, path).to_pydict(), meta

    def mark_complete(self, split: str) -> None:
        """Rank 0, after every rank's ``collect``: verify all shards, checksum them, drop strays."""
        manifest = self.manifest()
        entry = self._entry(split, manifest)
        directory = self.path(split)
        identity = {
            "model": manifest["model"],
            "data": entry["data"],
            "sampling": entry["sampling"],
        }
        size = entry["shard_size"]
        num_shards = math.ceil(entry["num_prompts"] / size)
        names = [f"shard-{j:05d}.parquet" for j in range(num_shards)]
        problems = []
        for j, name in enumerate(names):
            stop = min(entry["num_prompts"], (j + 1) * size)
            expected = {**identity, "split": split, "shard": j, "start": j * size, "stop": stop}
            stored = _shard_meta(directory / name)
            if stored is None:
                problems.append(f"{name} missing or unreadable")
            elif stored != expected:
                problems.append(
                    f"{name} holds other data ({stored.get('start')}:{stored.get('stop')})"
                )
        if problems:
            shown = "; ".join(problems[:5]) + (
                f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
            )
            raise TrajectoryCacheError(
                f"split {split!r} in {directory} is incomplete ({len(problems)} of {num_shards} "
                f"shards): {shown}. Run the collection again on every rank to finish it."
            )
        for stray in directory.iterdir():
            if _SHARD_NAME.fullmatch(stray.name) and stray.name not in names:
                stray.unlink()
        checksums = {name: sha256_file(directory / name) for name in names}
        entry.update(shards=names, checksums=checksums, complete=True)
        self._write_manifest(manifest)

    # ------------------------------------------------------------------ reading
    def load(self, split: str) -> datasets.Dataset:
        """The rows of a complete split in the original row order; every shard is checksummed."""
        manifest = self.manifest()
        entry = self._entry(split, manifest)
        directory = self.path(split)
        if not entry["complete"]:
            raise TrajectoryCacheError(
                f"trajectories of split {split!r} in {directory} are incomplete "
                f"({len(entry['shards'])} shard files so far); finish the collection first"
            )
        tables = []
        for name in entry["shards"]:
            path = directory / name
            if not path.is_file():
                raise TrajectoryCacheError(
                    f"trajectory shard {path} of split {split!r} is missing; {REPAIR_HINT}"
                )
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["checksums"][name]:
                raise TrajectoryCacheError(
                    f"trajectory shard {path} of split {split!r} is corrupted (checksum differs "
                    f"from the manifest); {REPAIR_HINT}"
                )
            tables.append(_read_table(pa.BufferReader(data), path))
        table = pa.concat_tables(tables) if tables else FEATURES.arrow_schema.empty_table()
        if table.num_rows != entry["num_prompts"]:
            raise TrajectoryCacheError(
                f"split {split!r} in {directory} has {table.num_rows} rows, manifest says "
                f"{entry['num_prompts']}"
            )
        info = datasets.DatasetInfo(features=FEATURES)
        return datasets.Dataset(datasets.table.InMemoryTable(table), info=info)

    def to_trajectories(self, split: str) -> tuple[list[str], list[PromptTrajectories]]:
        """(prompt ids, stored trajectories) in row order, as the POPI gradient pass takes them."""
        return trajectories_from_columns(self.load(split).to_dict())

    def pass_rates(self, split: str) -> dict[str, float]:
        """Fraction of each prompt's K stored rewards that count as correct (>= 0.5)."""
        columns = self.load(split).select_columns(["id", "rewards"]).to_dict()
        return {
            i: pass_rate(rewards)
            for i, rewards in zip(columns["id"], columns["rewards"], strict=True)
        }

    def size_bytes(self, split: str) -> int:
        """Bytes of the shard files of ``split`` on disk (0 before any was written)."""
        directory = self.path(split)
        if not directory.is_dir():
            return 0
        return sum(p.stat().st_size for p in directory.glob("shard-*.parquet"))
