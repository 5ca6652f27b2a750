"""Prompt sources from files or the HF hub (GSM8K, MATH, DeepScaleR, exported synthetic splits).

Every prompt source has ``load() -> datasets.Dataset`` with the columns in :data:`REQUIRED_COLUMNS`
and ``fingerprint() -> str`` that changes whenever the loaded rows could (caches of trajectories
and gradient features are keyed on it). :func:`load_source` is the one entry point the rest of the
code uses, so the checks on ids and columns hold for every source.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Protocol

import datasets

from cropi_pl.rewards.numeric import after_hashes, last_boxed
from cropi_pl.tasks import source

REQUIRED_COLUMNS = ("id", "prompt", "answer", "family", "difficulty")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
AnswerFormat = Literal["auto", "gsm8k", "boxed", "plain"]


class PromptSource(Protocol):
    def load(self) -> datasets.Dataset: ...

    def fingerprint(self) -> str: ...


def _gsm8k_answer(text: str) -> str | None:
    """GSM8K golds end in "#### 1,234"; thousands separators are dropped so symbolic checkers
    do not read "1,234" as a tuple."""
    answer = after_hashes(text)
    return answer.replace(",", "") if answer else None


def _plain_answer(text: str) -> str | None:
    return text.strip() or None


ANSWER_EXTRACTORS = {"gsm8k": _gsm8k_answer, "boxed": last_boxed, "plain": _plain_answer}
AUTO_ORDER = ("gsm8k", "boxed", "plain")


def extract_gold(text: str, answer_format: AnswerFormat) -> str | None:
    """The gold answer inside a reference answer/solution text; None when there is none."""
    formats = AUTO_ORDER if answer_format == "auto" else (answer_format,)
    for name in formats:
        answer = ANSWER_EXTRACTORS[name](text)
        if answer:
            return answer
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PromptFile(source.PromptSource):
    """Prompts and gold answers from a local .jsonl/.json/.parquet file or a HF hub dataset.

    ``path`` names a hub dataset (loaded with ``split``) unless it is an existing file or ends in
    .jsonl/.json/.parquet. ``template`` is formatted with ``prompt`` (the ``prompt_field``
    value) and every field of the row, so instructions can be added without editing the data.
    """

    def __init__(
        self,
        path: str,
        prompt_field: str = "question",
        answer_field: str = "answer",
        template: str = "{prompt}",
        answer_format: AnswerFormat = "auto",
        id_field: str | None = None,
        family_field: str | None = None,
        family: str = "default",
        split: str = "train",
        limit: int | None = None,
    ) -> None:
        if answer_format not in ("auto", *ANSWER_EXTRACTORS):
            raise ValueError(
                f"answer_format must be one of auto/{'/'.join(ANSWER_EXTRACTORS)}, "
                f"got {answer_format!r}"
            )
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self.path = path
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.template = template
        self.answer_format = answer_format
        self.id_field = id_field
        self.family_field = family_field
        self.family = family
        self.split = split
        self.limit = limit

    @property
    def _local(self) -> Path | None:
        """The local file, or None for a hub name; raises for a missing or unsupported file."""
        path = Path(self.path)
        if path.is_file() and path.suffix not in FILE_BUILDERS:
            raise ValueError(
                f"{self.path}: unsupported file type {path.suffix!r}; use one of "
                f"{sorted(FILE_BUILDERS)}"
            )
        if path.suffix in FILE_BUILDERS and not path.is_file():
            raise FileNotFoundError(f"prompt file {self.path} does not exist")
        return path if path.is_file() else None

    def _raw_rows(self) -> list[dict[str, Any]]:
        path = self._local
        if path is None:
            return self._head(datasets.load_dataset(self.path, split=self.split))
        # A throwaway cache: the datasets cache keys local files on path and mtime, which can
        # serve stale rows after a rewrite, and the rows are copied into memory anyway.
        with tempfile.TemporaryDirectory() as cache_dir:
            builder = FILE_BUILDERS[path.suffix]
            return self._head(
                datasets.load_dataset(
                    builder, data_files=str(path), split="train", cache_dir=cache_dir
                )
            )

    def _head(self, raw: datasets.Dataset) -> list[dict[str, Any]]:
        size = len(raw) if self.limit is None else min(self.limit, len(raw))
        return raw.select(range(size)).to_list()

    def _convert(self, index: int, row: dict[str, Any], stem: str) -> dict[str, Any]:
        where = f"{self.path} row {index}"
        for field in (self.prompt_field, self.answer_field, self.id_field, self.family_field):
            if field is not None and row.get(field) is None:
                raise KeyError(f"{where}: missing field {field!r} (row has {sorted(row)})")
        try:
            prompt = self.template.format(**{**row, "prompt": row[self.prompt_field]})
        except (KeyError, IndexError) as error:
            raise KeyError(f"{where}: template {self.template!r} needs {error}") from None
        answer = extract_gold(str(row[self.answer_field]), self.answer_format)
        if answer is None:
            raise ValueError(
                f"{where}: no {self.answer_format} answer in field {self.answer_field!r}: "
                f"{str(row[self.answer_field])[-200:]!r}"
            )
        try:
            difficulty = int(row.get("difficulty") or 0)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: difficulty {row['difficulty']!r} is not an int") from None
        return {
            "id": str(row[self.id_field]) if self.id_field else f"{stem}-{index}",
            "prompt": prompt,
            "answer": answer,
            "family": str(row[self.family_field]) if self.family_field else self.family,
            "difficulty": difficulty,
        }

    def load(self) -> datasets.Dataset:
        stem = Path(self.path).stem
        rows = [self._convert(i, row, stem) for i, row in enumerate(self._raw_rows())]
        if not rows:
            raise ValueError(f"{self.path}: no rows")
        return datasets.Dataset.from_list(rows)

    def fingerprint(self) -> str:
        """Settings plus the file's sha256 (mtime and size miss same-size rewrites); for a hub
        dataset, the fingerprint datasets gives its cached files."""
        path = self._local
        if path is not None:
            content = _sha256(path)
        else:
            content = datasets.load_dataset(self.path, split=self.split)._fingerprint
        settings = {
            key: getattr(self, key)
            for key in (
                "prompt_field",
                "answer_field",
                "template",
                "answer_format",
                "id_field",
                "family_field",
                "family",
                "split",
                "limit",
            )
        }
        return f"promptfile:{self.path}:{content}:{json.dumps(settings, sort_keys=True)}"


def load_source(source: PromptSource) -> datasets.Dataset:
    """``source.load()``, checked: required columns present, at least one row, ids unique."""
    name = getattr(source, "path", None) or type(source).__name__
    data = source.load()
    missing = [column for column in REQUIRED_COLUMNS if column not in data.column_names]
    if missing:
        raise ValueError(f"prompt source {name} lacks columns {missing}; has {data.column_names}")
    if len(data) == 0:
        raise ValueError(f"prompt source {name} has no rows")
    counts = Counter(data["id"])
    duplicates = [key for key, count in counts.items() if count > 1]
    if duplicates:
        raise ValueError(
            f"prompt source {name}: duplicate id {duplicates[0]!r} "
            f"({len(duplicates)} ids repeated); ids must be unique"
        )
    return data
