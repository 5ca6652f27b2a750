"""What a user's own package would hold, named from YAML by the real-CLI tests: plain-function
rewards in TRL's calling convention (one reads an extra dataset column) and a prompt source."""

from __future__ import annotations

import datasets

from cropi_pl.tasks.source import PromptSource

MARKER = "####"


def unit_reward(completions: list[str], unit: list[str], **kwargs: object) -> list[float | None]:
    """1.0 when a completion commits to an answer (``####``); None (not applicable) for rows
    whose extra ``unit`` column is empty; so it needs the file's extra column to score."""
    return [
        None if not u else float(MARKER in text) for text, u in zip(completions, unit, strict=True)
    ]


def even_length(completions: list[str], **kwargs: object) -> list[float]:
    """1.0 for a completion of even length: mixed rewards even from a random policy."""
    return [float(len(text) % 2 == 0) for text in completions]


class UserPrompts(PromptSource):
    """A user source with one extra column, configured from YAML by ``class_path``."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def load(self) -> datasets.Dataset:
        rows = [
            {
                "id": f"user-{i}",
                "prompt": f"Q: {i + self.offset}+1\nA: ",
                "answer": str(i + self.offset + 1),
                "family": "add",
                "difficulty": 1,
                "unit": "apples" if i % 2 else "",
            }
            for i in range(4)
        ]
        return datasets.Dataset.from_list(rows)

    def fingerprint(self) -> str:
        return f"user-prompts:{self.offset}"
