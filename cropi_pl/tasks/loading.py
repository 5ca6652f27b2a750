"""Prompts from files or the HF hub (GSM8K, MATH, DeepScaleR, exported synthetic splits).

:class:`PromptFile` turns a table of questions and reference answers into the rows every
:class:`~cropi_pl.tasks.source.PromptSource` yields: the five required columns (the prompt through
a template, the gold answer extracted from a GSM8K ``#### 42`` or MATH ``\\boxed{...}`` reference)
plus every other column of the file, unchanged, for reward functions to read.
"""

from __future__ import annotations

import json
import re
import string
import tempfile
from pathlib import Path
from typing import Any, Literal

import datasets

from cropi_pl.atomic import sha256_file
from cropi_pl.rewards.numeric import BOXED, after_hashes, last_boxed
from cropi_pl.tasks.source import REQUIRED_COLUMNS, PromptSource

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
AnswerFormat = Literal["auto", "gsm8k", "boxed", "plain"]
_INTEGER = re.compile(r"-?\d+")


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
    """The gold answer inside a reference answer/solution text; None when there is none.

    Raises for a ``\\boxed{`` that never closes (``boxed``, or ``auto`` without a ``####``):
    falling through to the whole text would make the solution itself the gold.
    """
    formats = AUTO_ORDER if answer_format == "auto" else (answer_format,)
    for name in formats:
        answer = ANSWER_EXTRACTORS[name](text)
        if answer:
            return answer
        if name == "boxed" and answer is None and BOXED in text:
            raise ValueError(f"unclosed {BOXED} (its braces never balance): {text[-200:]!r}")
    return None


def _json_error(path: Path, raw: bytes) -> str | None:
    """What makes a JSON/JSON-lines file unreadable, with its 1-based line; None if readable.

    Checked here because the loader reports an empty file as a bare ``StopIteration``, a bad byte
    without file or line, and bad JSON with the line only in a log message.
    """
    if not raw.strip():
        return f"{path}: empty file (no rows)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        return f"{path} line {line}: not UTF-8 (byte {raw[error.start]:#04x}); save it as UTF-8"
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one document: read as JSON lines, as the loader does
        if isinstance(whole, list):
            bad = [i for i, item in enumerate(whole) if not isinstance(item, dict)]
            return f"{path} row {bad[0] + 1}: not a JSON object" if bad else None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return f"{path} line {number}: not JSON ({error.msg} at column {error.colno})"
        if not isinstance(record, dict):
            return f"{path} line {number}: not a JSON object ({type(record).__name__})"
    return None


TEMPLATE_HINT = "literal braces are written {{ and }} (e.g. \\boxed{{}})"


def _check_template(template: str) -> None:
    """Raise for a ``str.format`` template with a stray brace or a field that is not a column
    name, such as the ``{}`` of an undoubled ``\\boxed{}``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"template {template!r}: {error}; {TEMPLATE_HINT}") from None
    for _, field, _, _ in parsed:
        if field is not None and not field.isidentifier():
            raise ValueError(
                f"template {template!r} has a field {{{field}}} that is not a column name; "
                f"{TEMPLATE_HINT}"
            )


def _difficulty(value: Any, where: str) -> int:
    """An int from 3, 3.0, "3" or "Level 3" (MATH's ``level`` column)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    numbers = _INTEGER.findall(value) if isinstance(value, str) else []
    if numbers:
        return int(numbers[-1])
    raise ValueError(f"{where}: difficulty {value!r} is not an integer")


class PromptFile(PromptSource):
    """Prompts and gold answers from a local .jsonl/.json/.parquet file or a HF hub dataset.

    ``path`` names a hub dataset (loaded with ``split``) unless it is an existing file or ends in
    .jsonl/.json/.parquet. Each row becomes:

    - ``prompt``: ``template`` formatted with ``prompt`` (the ``prompt_field`` value) and every
      field of the row, so instructions can be added without editing the data (literal braces
      are doubled: ``"{prompt} Put the answer in \\boxed{{}}."``);
    - ``answer``: the gold answer extracted from ``answer_field`` by ``answer_format``
      (``gsm8k``: after the last ``####``; ``boxed``: the last ``\\boxed{}``; ``plain``: the
      whole text; ``auto``: the first of these that finds one);
    - ``id``: ``id_field``'s value, else ``<file stem>-<row number>``;
    - ``family``: ``family_field``'s value, else ``family``;
    - ``difficulty``: ``difficulty_field``'s value as an int ("Level 5" gives 5); by default the
      ``difficulty`` column when there is one, else 0;
    - every other column of the file, unchanged (for reward functions). A file column named like
      one of the five above is replaced by the converted value.
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
        difficulty_field: str | None = None,
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
        _check_template(template)
        self.path = path
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.template = template
        self.answer_format = answer_format
        self.id_field = id_field
        self.family_field = family_field
        self.family = family
        self.difficulty_field = difficulty_field
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
        builder = FILE_BUILDERS[path.suffix]
        if builder == "json":
            problem = _json_error(path, path.read_bytes())
            if problem:
                raise ValueError(f"cannot read prompt file {problem}")
        with tempfile.TemporaryDirectory() as cache_dir:
            try:
                raw = datasets.load_dataset(
                    builder, data_files=str(path), split="train", cache_dir=cache_dir
                )
            except Exception as error:  # datasets wraps parse errors in many types
                raise ValueError(f"cannot read prompt file {self.path}: {error}") from error
            return self._head(raw)

    def _head(self, raw: datasets.Dataset) -> list[dict[str, Any]]:
        size = len(raw) if self.limit is None else min(self.limit, len(raw))
        return raw.select(range(size)).to_list()

    def _convert(self, index: int, row: dict[str, Any], stem: str) -> dict[str, Any]:
        where = f"{self.path} row {index + 1}"
        fields = (self.prompt_field, self.answer_field, self.id_field, self.family_field)
        for field in (*fields, self.difficulty_field):
            if field is not None and row.get(field) is None:
                raise KeyError(f"{where}: missing field {field!r} (row has {sorted(row)})")
        try:
            prompt = self.template.format(**{**row, "prompt": row[self.prompt_field]})
        except KeyError as error:
            raise KeyError(
                f"{where}: template {self.template!r} needs {error} (row has {sorted(row)}; "
                f"{TEMPLATE_HINT})"
            ) from None
        try:
            answer = extract_gold(str(row[self.answer_field]), self.answer_format)
        except ValueError as error:
            raise ValueError(f"{where}: field {self.answer_field!r}: {error}") from None
        if answer is None:
            raise ValueError(
                f"{where}: no {self.answer_format} answer in field {self.answer_field!r}: "
                f"{str(row[self.answer_field])[-200:]!r}"
            )
        difficulty = row.get(self.difficulty_field or "difficulty")
        converted = {
            "id": str(row[self.id_field]) if self.id_field else f"{stem}-{index}",
            "prompt": prompt,
            "answer": answer,
            "family": str(row[self.family_field]) if self.family_field else self.family,
            "difficulty": 0 if difficulty is None else _difficulty(difficulty, where),
        }
        extra = {key: value for key, value in row.items() if key not in REQUIRED_COLUMNS}
        return {**converted, **extra}

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
            content = sha256_file(path)
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
                "difficulty_field",
                "split",
                "limit",
            )
        }
        return f"promptfile:{self.path}:{content}:{json.dumps(settings, sort_keys=True)}"
