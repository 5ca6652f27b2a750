"""Seeded natural-language word problems in the style of GSM8K, for real instruct models.

The embedded arithmetic tasks (``"Q: 38*3\\nA: "``) suit the character-level tiny policy; a
pretrained chat model such as SmolLM2-135M-Instruct reads English. These are one-step problems
("Mia has 4 apples. She buys 3 more. ...") in five families, so a target set can ask for some
and not others, at four difficulties by the size of the numbers: at difficulty 1 every operand is
below 10 (what a 135M model can sometimes get right), at 4 they have two or three digits.

Rows are those of :func:`~cropi_pl.tasks.generated.generate_problems` (same columns, same
hash-based train/validation/test split); the prompt is the bare question, so the instruction
(e.g. "put the answer in \\boxed{}") belongs to the model's system prompt, and ``solution`` is
a GSM8K-style reference (``"4 + 3 = 7 #### 7"``) that ``tools/export_tasks.py --gsm8k`` writes as
GSM8K's ``answer`` column.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import datasets

from cropi_pl.tasks.generated import DIFFICULTIES, GeneratedTasks, Problem, generate_problems

WORD_FAMILIES = ("add", "sub", "cmp", "mul", "div")
NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Lily", "Ben")
ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards")
# Operand ranges per difficulty: sums and differences, and the two factors of a product.
TERMS = {1: (2, 9), 2: (10, 30), 3: (10, 99), 4: (100, 999)}
FACTORS = {1: ((2, 5), (2, 5)), 2: ((2, 9), (2, 9)), 3: ((10, 20), (2, 9)), 4: ((10, 99), (10, 99))}


def _pick(rng: random.Random, bounds: tuple[int, int]) -> int:
    return rng.randint(*bounds)


def _two_terms(rng: random.Random, d: int) -> tuple[int, int]:
    """Two distinct operands of difficulty ``d``, larger first."""
    a, b = _pick(rng, TERMS[d]), _pick(rng, TERMS[d])
    while a == b:
        b = _pick(rng, TERMS[d])
    return max(a, b), min(a, b)


def _add(rng: random.Random, d: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = _pick(rng, TERMS[d]), _pick(rng, TERMS[d])
    question = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
    return Problem(question, f"{a} + {b} = {a + b}", a + b)


def _sub(rng: random.Random, d: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = _two_terms(rng, d)
    question = (
        f"{name} has {a} {item} and gives {b} of them to a friend. "
        f"How many {item} does {name} have left?"
    )
    return Problem(question, f"{a} - {b} = {a - b}", a - b)


def _cmp(rng: random.Random, d: int) -> Problem:
    first, second = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = _two_terms(rng, d)
    question = (
        f"{first} has {a} {item} and {second} has {b} {item}. "
        f"How many more {item} does {first} have than {second}?"
    )
    return Problem(question, f"{a} - {b} = {a - b}", a - b)


def _mul(rng: random.Random, d: int) -> Problem:
    item = rng.choice(ITEMS)
    boxes, each = (_pick(rng, bounds) for bounds in FACTORS[d])
    question = (
        f"There are {boxes} boxes with {each} {item} in each box. "
        f"How many {item} are there in total?"
    )
    return Problem(question, f"{boxes} * {each} = {boxes * each}", boxes * each)


def _div(rng: random.Random, d: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    share, friends = (_pick(rng, bounds) for bounds in FACTORS[d])
    total = share * friends
    question = (
        f"{name} shares {total} {item} equally among {friends} friends. "
        f"How many {item} does each friend get?"
    )
    return Problem(question, f"{total} / {friends} = {share}", share)


WORD_GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "add": _add,
    "sub": _sub,
    "cmp": _cmp,
    "mul": _mul,
    "div": _div,
}


def generate_word_problems(
    families: list[str] | tuple[str, ...] = WORD_FAMILIES,
    difficulties: list[int] | tuple[int, ...] = DIFFICULTIES,
    num_per_cell: int = 50,
    split: str = "train",
    seed: int = 0,
) -> datasets.Dataset:
    """``num_per_cell`` distinct word problems of each (family, difficulty) in ``split``."""
    return generate_problems(
        WORD_GENERATORS, "{question}", families, difficulties, num_per_cell, split, seed
    )


class WordProblems(GeneratedTasks):
    """A prompt source of generated word problems, configurable from YAML."""

    generators = WORD_GENERATORS
    template = "{question}"
    kind = "words"
