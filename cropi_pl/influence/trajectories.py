"""Offline trajectory cache: K responses per prompt sampled ONCE from the behaviour policy.

POPI (METHOD.md section 3) never regenerates responses: every stage reweights the same stored
samples of beta. This module samples them, stores token ids, beta's per-token log-probs, rewards
and decoded texts as parquet shards, and hands them back as ``datasets.Dataset`` rows or
:class:`~cropi_pl.influence.popi.PromptTrajectories`.

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

Files are written to a fixed ``<name>.tmp`` next to the target and moved into place with
``os.replace``; only the owner of a file ever writes its tmp name, so a tmp left by a killed run
is simply overwritten. Sampling seeds depend only on (settings.seed, split, prompt id, sample
index), so a resumed collection produces exactly the files an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from cropi_pl.generation.engine import Completion, GenerationEngine, row_seed

if TYPE_CHECKING:
    from cropi_pl.influence.popi import PromptTrajectories
    from cropi_pl.policy.prompting import PromptEncoder
    from cropi_pl.rewards.base import RewardCallable

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_SHARD_META_KEY = b"cropi_pl.trajectories"
_SHARD_NAME = re.compile(r"shard-(\d{5,})\.parquet(\.tmp)?")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*")
_REBUILD_HINT = "pass rebuild=True (config: `trajectories.rebuild: true`)"

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


def pass_rate(rewards: Sequence[float]) -> float:
    """Fraction of a prompt's stored rewards that count as correct (>= 0.5)."""
    return sum(r >= 0.5 for r in rewards) / len(rewards)


def trajectories_from_columns(
    columns: dict[str, list],
) -> tuple[list[str], list[PromptTrajectories]]:
    """(prompt ids, trajectories) from shard columns (``FEATURES``), in row order."""
    from cropi_pl.influence.popi import PromptTrajectories

    fields = ("prompt_ids", "completion_ids", "behaviour_logps", "rewards")
    trajs = [
        PromptTrajectories(**dict(zip(fields, values, strict=True)))
        for values in zip(*(columns[f] for f in fields), strict=True)
    ]
    return list(columns["id"]), trajs


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


@dataclass(frozen=True)
class SamplingSettings:
    """How the behaviour policy is sampled; part of the cache's identity.

    ``prompt_format`` is the :meth:`~cropi_pl.policy.prompting.PromptEncoder.fingerprint` of the
    prompt formatting, so a cache built with another format (or chat template) is refused.
    """

    num_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    prompt_format: str = "plain"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_tag(split: str, settings: SamplingSettings) -> str:
    """The tag a collector seeds with: samples depend on (seed, split, prompt id, index) only."""
    return f"trajectories|{split}|seed={settings.seed}"


@dataclass
class Collector:
    """What the cache needs from a policy, as plain callables so tests can inject fakes.

    ``sample(rows, num_samples, temperature, seed_tag)`` returns one prompt-id list per completion
    and the completions grouped by prompt; each completion must be a function of
    ``(seed_tag, row id, sample index)`` alone (not of the batch it came in), and sampling must
    use the ``top_p``/``max_new_tokens`` of the :class:`SamplingSettings` given to ``collect``.
    ``score(rows, completions, num_samples)`` gives one reward per completion,
    ``logps(prompt_ids, completion_ids)`` the teacher-forced per-token log-probs of the behaviour
    policy (flat, one entry per completion) and ``decode(ids)`` the text stored for inspection.
    """

    sample: Callable[[list[dict], int, float, str], tuple[list[list[int]], list[Completion]]]
    score: Callable[[list[dict], list[Completion], int], Sequence[float]]
    logps: Callable[[list[list[int]], list[list[int]]], list[list[float]]]
    decode: Callable[[list[int]], str]

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        encoder: PromptEncoder,
        engine: GenerationEngine,
        reward: RewardCallable,
        settings: SamplingSettings,
        reward_timeout_s: float | None = None,
    ) -> Collector:
        """A collector sampling ``model`` through ``engine`` on prompts formatted by ``encoder``
        and scoring with ``reward``.

        Reward errors and timeouts score 0, and so does a None (not applicable) reward (see
        :func:`~cropi_pl.rewards.base.safe_rewards`).
        """
        from cropi_pl.influence.popi import behaviour_logps
        from cropi_pl.rewards.base import safe_rewards

        if settings.prompt_format != encoder.fingerprint():
            raise ValueError(
                f"sampling settings name prompt format {settings.prompt_format!r} but the "
                f"encoder formats prompts as {encoder.fingerprint()!r}"
            )
        tokenizer = encoder.tokenizer

        def sample(
            rows: list[dict], num_samples: int, temperature: float, tag: str
        ) -> tuple[list[list[int]], list[Completion]]:
            prompts = encoder.encode_rows(rows)
            seeds = [row_seed(tag, r["id"], j) for r in rows for j in range(num_samples)]
            completions = engine.generate(
                model,
                prompts,
                num_samples=num_samples,
                max_new_tokens=settings.max_new_tokens,
                temperature=temperature,
                top_p=settings.top_p,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                seeds=seeds,
            )
            return [p for p in prompts for _ in range(num_samples)], completions

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        def score(rows: list[dict], completions: list[Completion], num_samples: int) -> list[float]:
            flat = [r for r in rows for _ in range(num_samples)]
            texts = [decode(c.ids) for c in completions]
            return safe_rewards(
                reward,
                [r["prompt"] for r in flat],
                texts,
                [str(r["answer"]) for r in flat],
                flat,
                reward_timeout_s,
            ).filled()

        def logps(
            prompt_ids: list[list[int]], completion_ids: list[list[int]]
        ) -> list[list[float]]:
            out: list[list[float]] = []
            start = 0
            while start < len(prompt_ids):  # one teacher-forced batch per run of equal prompts
                stop = start + 1
                while stop < len(prompt_ids) and prompt_ids[stop] == prompt_ids[start]:
                    stop += 1
                out.extend(behaviour_logps(model, prompt_ids[start], completion_ids[start:stop]))
                start = stop
            return out

        return cls(sample=sample, score=score, logps=logps, decode=decode)


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over state_dict names, shapes, dtypes and bytes.

    Sharded (DTensor) entries are gathered with ``full_tensor()``, a collective: call this on
    every rank. Renamed modules (e.g. ``torch.compile``'s ``_orig_mod.``) change the fingerprint.
    """
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if value.is_meta:
            raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device")
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint_rows(ds: datasets.Dataset) -> str:
    """sha256 over (id, prompt, answer) in row order: what the stored samples depend on."""
    missing = [c for c in ("id", "prompt", "answer") if c not in ds.column_names]
    if missing:
        raise ValueError(f"fingerprint_rows: dataset lacks columns {missing} ({ds.column_names})")
    digest = hashlib.sha256()
    columns = ds.select_columns(["id", "prompt", "answer"]).to_dict()
    for row in zip(columns["id"], columns["prompt"], columns["answer"], strict=True):
        digest.update(json.dumps([str(v) for v in row]).encode() + b"\n")
    return digest.hexdigest()


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


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into ``<path>.tmp``, fsync, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_meta(path: Path) -> dict[str, Any] | None:
    """The identity stored in a shard's footer; None if the file is missing or unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[_SHARD_META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None


def _check_collector_output(
    rows: list[dict],
    k: int,
    prompt_ids: list[list[int]],
    completions: list[Completion],
    rewards: list[float],
) -> None:
    """Fail with the offending prompt id instead of storing misaligned trajectories."""
    n = len(rows) * k
    if len(prompt_ids) != n or len(completions) != n:
        raise ValueError(
            f"collector.sample returned {len(prompt_ids)} prompt id lists and {len(completions)} "
            f"completions for {len(rows)} prompts x {k} samples (expected {n} each)"
        )
    if len(rewards) != n:
        raise ValueError(f"collector.score returned {len(rewards)} rewards for {n} completions")
    for i, row in enumerate(rows):
        for j in range(i * k, (i + 1) * k):
            if prompt_ids[j] != prompt_ids[i * k]:
                raise ValueError(f"prompt {row['id']!r}: its {k} prompt id lists differ")
            if not completions[j].ids:
                raise ValueError(f"prompt {row['id']!r}: sample {j - i * k} is empty")
            if not math.isfinite(rewards[j]):
                raise ValueError(f"prompt {row['id']!r}: sample {j - i * k} reward {rewards[j]}")


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
        text = json.dumps(manifest, indent=2, sort_keys=True).encode()
        _write_atomic(self.manifest_path, lambda f: f.write(text))

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
    ) -> None:
        """Sample and store this rank's shards of ``rows``, skipping shards already stored.

        ``rebuild=True`` replaces trajectories made from other inputs instead of raising; shards
        that match are kept (resampling them would reproduce the same files).
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
        if done:  # keep the stored layout; collection below only repairs missing shards
            shard_size = entry["shard_size"]
        elif rank == 0:
            manifest = self._start_split(manifest, split, identity, len(rows), shard_size)
        directory.mkdir(parents=True, exist_ok=True)
        num_shards = math.ceil(len(rows) / shard_size)
        mine = range(rank, num_shards, world_size)
        tag = seed_tag(split, settings)
        total = sum(min(len(rows), (j + 1) * shard_size) - j * shard_size for j in mine)
        bar = tqdm(total=total, desc=f"trajectories {split}", disable=not progress or rank != 0)
        wrote = False
        with bar:
            for j in mine:
                start, stop = j * shard_size, min(len(rows), (j + 1) * shard_size)
                path = directory / f"shard-{j:05d}.parquet"
                meta = {**identity, "split": split, "shard": j, "start": start, "stop": stop}
                if not self._needs_sampling(path, meta, rebuild):
                    bar.update(stop - start)
                    continue
                columns = self.sample_columns(
                    rows.select(range(start, stop)).to_list(), collector, settings, tag
                )
                self.write_shard(path, columns, meta)
                wrote = True
                bar.update(stop - start)
                if rank == 0:
                    self._record_progress(split, manifest)
        if world_size == 1 and (wrote or not done):
            self.mark_complete(split)

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
        _check_collector_output(rows, k, prompt_ids, completions, rewards)
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
        _write_atomic(path, lambda f: pq.write_table(table, f))

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
        checksums = {
            name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names
        }
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
                    f"trajectory shard {path} of split {split!r} is missing; run the collection "
                    "again to resample it"
                )
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["checksums"][name]:
                raise TrajectoryCacheError(
                    f"trajectory shard {path} of split {split!r} is corrupted (checksum differs "
                    "from the manifest); delete it and run the collection again to resample it"
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
