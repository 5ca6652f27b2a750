"""Seeded generator of verifiable arithmetic problems.

The embedded tasks stand in for GSM8K/MATH on a CPU: several families (so a target set can ask for
some and not others) at four difficulty levels (so the starting policy finds some prompts trivial,
some hopeless and some in between, which is what makes data selection matter).

Rows and splits are those of :func:`~cropi_pl.tasks.generated.generate_problems`. These one-shot
answers are memorised rather than computed by the tiny policy; the acceleration testbed uses the
step-by-step tasks of :mod:`cropi_pl.tasks.stepwise` instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import datasets

from cropi_pl.tasks.generated import DIFFICULTIES, GeneratedTasks, Problem, generate_problems

PROMPT_TEMPLATE = "Q: {question}\nA: "
FAMILIES = ("add", "sub", "mul", "expr", "word", "cmp", "mod")
NAMES = ("Ann", "Bob", "Cat", "Dan", "Eve", "Max", "Sam", "Zoe")
ITEMS = ("apple", "book", "coin", "pen", "card", "egg")


def number_with_digits(rng: random.Random, digits: int) -> int:
    """A uniform number of exactly ``digits`` digits (one digit: 0-9)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _add(rng: random.Random, d: int) -> Problem:
    a, b = number_with_digits(rng, d), number_with_digits(rng, d)
    return Problem(f"{a}+{b}", f"{a}+{b}={a + b}", a + b)


def _sub(rng: random.Random, d: int) -> Problem:
    a, b = sorted((number_with_digits(rng, d), number_with_digits(rng, d)), reverse=True)
    return Problem(f"{a}-{b}", f"{a}-{b}={a - b}", a - b)


def _mul(rng: random.Random, d: int) -> Problem:
    da, db = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2)}[d]
    a, b = number_with_digits(rng, da), number_with_digits(rng, db)
    return Problem(f"{a}*{b}", f"{a}*{b}={a * b}", a * b)


def _expr(rng: random.Random, d: int) -> Problem:
    digits = 1 if d <= 2 else 2
    operands = [number_with_digits(rng, digits) for _ in range(d + 1)]
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
        a, b = number_with_digits(rng, max(1, d - 1)), number_with_digits(rng, 1)
        q = f"{name} has {a} bags of {b} {item}s. How many {item}s?"
        return Problem(q, f"{a}*{b}={a * b}", a * b)
    a, b = sorted((number_with_digits(rng, d), number_with_digits(rng, d)), reverse=True)
    if kind == "gain":
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s?"
        return Problem(q, f"{a}+{b}={a + b}", a + b)
    q = f"{name} has {a} {item}s and gives {b} away. How many {item}s?"
    return Problem(q, f"{a}-{b}={a - b}", a - b)


def _cmp(rng: random.Random, d: int) -> Problem:
    a = number_with_digits(rng, d + 1)
    b = a + rng.choice((-1, 1)) * rng.randint(1, 10 ** max(0, d - 1))
    b = abs(b)
    return Problem(f"max({a},{b})", f"max({a},{b})={max(a, b)}", max(a, b))


def _mod(rng: random.Random, d: int) -> Problem:
    a, b = number_with_digits(rng, d + 1), rng.randint(2, 9)
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


class SyntheticTasks(GeneratedTasks):
    """A prompt source of embedded one-shot arithmetic tasks, configurable from YAML."""

    generators = GENERATORS
    template = PROMPT_TEMPLATE
    kind = "synthetic"
