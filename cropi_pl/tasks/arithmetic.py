"""Seeded generator of verifiable arithmetic problems.

The embedded tasks stand in for GSM8K/MATH on a CPU: several families (so a target set can ask for
some and not others) at four difficulty levels (so the starting policy finds some prompts trivial,
some hopeless and some in between, which is what makes data selection matter).

Every row has ``id, prompt, answer, family, difficulty, solution``; ``solution`` is a worked
completion ending in ``#### <answer>``, used to warm-start the embedded policy. Train and evaluation
splits never share a question: a problem's split is decided by a hash of its text.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets

from cropi_pl.tasks.source import PromptSource

PROMPT_TEMPLATE = "Q: {question}\nA: "
FAMILIES = ("add", "sub", "mul", "expr", "word", "cmp", "mod")
DIFFICULTIES = (1, 2, 3, 4)
SPLITS = {"train": (0, 8), "validation": (8, 9), "test": (9, 10)}
NAMES = ("Ann", "Bob", "Cat", "Dan", "Eve", "Max", "Sam", "Zoe")
ITEMS = ("apple", "book", "coin", "pen", "card", "egg")


@dataclass(frozen=True)
class Problem:
    question: str
    solution_steps: str
    answer: int


def _num(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _add(rng: random.Random, d: int) -> Problem:
    a, b = _num(rng, d), _num(rng, d)
    return Problem(f"{a}+{b}", f"{a}+{b}={a + b}", a + b)


def _sub(rng: random.Random, d: int) -> Problem:
    a, b = sorted((_num(rng, d), _num(rng, d)), reverse=True)
    return Problem(f"{a}-{b}", f"{a}-{b}={a - b}", a - b)


def _mul(rng: random.Random, d: int) -> Problem:
    da, db = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2)}[d]
    a, b = _num(rng, da), _num(rng, db)
    return Problem(f"{a}*{b}", f"{a}*{b}={a * b}", a * b)


def _expr(rng: random.Random, d: int) -> Problem:
    digits = 1 if d <= 2 else 2
    operands = [_num(rng, digits) for _ in range(d + 1)]
    value, steps, text = operands[0], [], str(operands[0])
    for x in operands[1:]:
        op = "+" if value < x or rng.random() < 0.5 else "-"
        new = value + x if op == "+" else value - x
        steps.append(f"{value}{op}{x}={new}")
        text += f"{op}{x}"
        value = new
    return Problem(text, " ".join(steps), value)


def _word(rng: random.Random, d: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("gain", "lose", "groups"))
    if kind == "groups":
        a, b = _num(rng, max(1, d - 1)), _num(rng, 1)
        q = f"{name} has {a} bags of {b} {item}s. How many {item}s?"
        return Problem(q, f"{a}*{b}={a * b}", a * b)
    a, b = sorted((_num(rng, d), _num(rng, d)), reverse=True)
    if kind == "gain":
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s?"
        return Problem(q, f"{a}+{b}={a + b}", a + b)
    q = f"{name} has {a} {item}s and gives {b} away. How many {item}s?"
    return Problem(q, f"{a}-{b}={a - b}", a - b)


def _cmp(rng: random.Random, d: int) -> Problem:
    a = _num(rng, d + 1)
    b = a + rng.choice((-1, 1)) * rng.randint(1, 10 ** max(0, d - 1))
    b = abs(b)
    return Problem(f"max({a},{b})", f"max({a},{b})={max(a, b)}", max(a, b))


def _mod(rng: random.Random, d: int) -> Problem:
    a, b = _num(rng, d + 1), rng.randint(2, 9)
    q, r = divmod(a, b)
    return Problem(f"{a} mod {b}", f"{a}={q}*{b}+{r}", r)


GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "expr": _expr,
    "word": _word,
    "cmp": _cmp,
    "mod": _mod,
}


def format_solution(problem: Problem) -> str:
    """The worked completion the policy is warm-started on and the reward parses."""
    return f"{problem.solution_steps} #### {problem.answer}"


def _split_of(question: str) -> str:
    bucket = int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def generate_problems(
    generators: dict[str, Callable[[random.Random, int], Problem]],
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


def generate_tasks(
    families: Sequence[str] = FAMILIES,
    difficulties: Sequence[int] = DIFFICULTIES,
    num_per_cell: int = 50,
    split: str = "train",
    seed: int = 0,
) -> datasets.Dataset:
    """The embedded arithmetic tasks (:func:`generate_problems` over this module's families)."""
    return generate_problems(
        GENERATORS, PROMPT_TEMPLATE, families, difficulties, num_per_cell, split, seed
    )


class SyntheticTasks(PromptSource):
    """A prompt source of embedded arithmetic tasks, configurable from YAML."""

    def __init__(
        self,
        families: list[str] | None = None,
        difficulties: list[int] | None = None,
        num_per_cell: int = 50,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        self.families = list(families or FAMILIES)
        self.difficulties = list(difficulties or DIFFICULTIES)
        self.num_per_cell = num_per_cell
        self.split = split
        self.seed = seed

    def load(self) -> datasets.Dataset:
        return generate_tasks(
            self.families, self.difficulties, self.num_per_cell, self.split, self.seed
        )

    def fingerprint(self) -> str:
        cells = f"{self.families}:{self.difficulties}:{self.num_per_cell}"
        return f"synthetic:{cells}:{self.split}:{self.seed}"
