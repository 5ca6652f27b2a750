"""Seeded generation of verifiable problems, shared by every embedded task family.

A generator maps ``(rng, difficulty)`` to a :class:`Problem`; :func:`generate_problems` turns a
table of generators into prompt rows ``id, prompt, answer, family, difficulty, solution``, where
``solution`` is a worked completion ending in ``#### <answer>`` (used to warm-start the embedded
policy). Train and evaluation splits never share a question: a problem's split is decided by a
hash of its text. :class:`GeneratedTasks` makes any such table a YAML-configurable prompt source.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import datasets

from cropi_pl.tasks.source import PromptSource

DIFFICULTIES = (1, 2, 3, 4)
SPLITS = {"train": (0, 8), "validation": (8, 9), "test": (9, 10)}
Generator = Callable[[random.Random, int], "Problem"]


@dataclass(frozen=True)
class Problem:
    question: str
    solution_steps: str
    answer: int


def format_solution(problem: Problem) -> str:
    """The worked completion the policy is warm-started on and the reward parses."""
    return f"{problem.solution_steps} #### {problem.answer}"


def _split_of(question: str) -> str:
    bucket = int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def generate_problems(
    generators: dict[str, Generator],
    template: str,
    families: Sequence[str],
    difficulties: Sequence[int],
    num_per_cell: int,
    split: str,
    seed: int,
) -> datasets.Dataset:
    """``num_per_cell`` distinct problems of each (family, difficulty) of ``generators`` that fall
    in ``split``, each prompt ``template`` formatted with the question.

    Cells with fewer distinct problems than asked (one-digit addition has 100) yield what exists.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    unknown = sorted(set(families) - set(generators))
    if unknown:
        raise ValueError(f"unknown task families {unknown}; known: {list(generators)}")
    bad = sorted(set(difficulties) - set(DIFFICULTIES))
    if bad:
        raise ValueError(f"difficulties must be in {DIFFICULTIES}, got {bad}")
    rows: list[dict] = []
    for family in families:
        for difficulty in difficulties:
            rng = random.Random(f"{seed}-{family}-{difficulty}")
            seen: set[str] = set()
            attempts = 0
            while len(seen) < num_per_cell and attempts < 50 * num_per_cell:
                attempts += 1
                problem = generators[family](rng, difficulty)
                if problem.question in seen or _split_of(problem.question) != split:
                    continue
                seen.add(problem.question)
                digest = hashlib.sha1(problem.question.encode()).hexdigest()[:10]
                rows.append(
                    {
                        "id": f"{family}-{difficulty}-{digest}",
                        "prompt": template.format(question=problem.question),
                        "answer": str(problem.answer),
                        "family": family,
                        "difficulty": difficulty,
                        "solution": format_solution(problem),
                    }
                )
    return datasets.Dataset.from_list(rows)


class GeneratedTasks(PromptSource):
    """A prompt source over a table of generators; subclasses name the table, the prompt template
    and the ``kind`` that starts their fingerprint."""

    generators: ClassVar[dict[str, Generator]]
    template: ClassVar[str]
    kind: ClassVar[str]

    def __init__(
        self,
        families: list[str] | None = None,
        difficulties: list[int] | None = None,
        num_per_cell: int = 50,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        self.families = list(families or self.generators)
        self.difficulties = list(difficulties or DIFFICULTIES)
        self.num_per_cell = num_per_cell
        self.split = split
        self.seed = seed

    def load(self) -> datasets.Dataset:
        return generate_problems(
            self.generators,
            self.template,
            self.families,
            self.difficulties,
            self.num_per_cell,
            self.split,
            self.seed,
        )

    def fingerprint(self) -> str:
        cells = f"{self.families}:{self.difficulties}:{self.num_per_cell}"
        return f"{self.kind}:{cells}:{self.split}:{self.seed}"
