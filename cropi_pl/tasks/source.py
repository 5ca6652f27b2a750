"""The prompt-source interface: anything that yields a validated table of prompts.

Every source (the synthetic generator, :class:`~cropi_pl.tasks.loading.PromptFile`, a user's own
class) subclasses :class:`PromptSource`, so YAML can name it by ``class_path`` wherever the data
module takes a source. :func:`load_source` is the one entry point the rest of the code uses, so
the checks on ids and columns hold for every source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter

import datasets

REQUIRED_COLUMNS = ("id", "prompt", "answer", "family", "difficulty")


class PromptSource(ABC):
    """A configurable producer of a prompt table (YAML ``class_path`` targets subclass this).

    Columns beyond :data:`REQUIRED_COLUMNS` are kept: they travel with each row to the reward
    functions (as keyword arguments of plain-function rewards, or in ``rows``).
    """

    @abstractmethod
    def load(self) -> datasets.Dataset:
        """Rows with at least :data:`REQUIRED_COLUMNS`."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the loaded rows would change (used by caches)."""


def load_source(source: PromptSource) -> datasets.Dataset:
    """``source.load()``, checked: required columns present, at least one row, ids unique,
    prompts non-empty strings, answers present (errors name the source and the row)."""
    name = getattr(source, "path", None) or type(source).__name__
    data = source.load()
    missing = [column for column in REQUIRED_COLUMNS if column not in data.column_names]
    if missing:
        raise ValueError(f"prompt source {name} lacks columns {missing}; has {data.column_names}")
    if len(data) == 0:
        raise ValueError(f"prompt source {name} has no rows")
    columns = data.select_columns(["id", "prompt", "answer"]).to_dict()
    pairs = zip(columns["prompt"], columns["answer"], strict=True)
    for index, (prompt, answer) in enumerate(pairs):
        problem = (
            f"prompt must be a non-empty string, got {prompt!r}"
            if not isinstance(prompt, str) or not prompt.strip()
            else f"answer is empty ({answer!r})"
            if answer is None or not str(answer).strip()
            else None
        )
        if problem:
            raise ValueError(
                f"prompt source {name} row {index} (id {columns['id'][index]!r}): {problem}"
            )
    counts = Counter(columns["id"])
    duplicates = [key for key, count in counts.items() if count > 1]
    if duplicates:
        raise ValueError(
            f"prompt source {name}: duplicate id {duplicates[0]!r} "
            f"({len(duplicates)} ids repeated); ids must be unique"
        )
    return data
