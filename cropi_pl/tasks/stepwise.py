"""Seeded arithmetic problems whose worked solutions are chains of small steps the tiny policy can
execute, so that RL on some prompts teaches skills other prompts use.

The one-shot embedded tasks (``"486*53=25758"``) ask an 0.87M-parameter model to recall a whole
answer, which it memorises per prompt; GRPO then sharpens the prompts it trains on and transfers
almost nothing. Here every answer is built one digit at a time (right to left for sums,
differences and products, left to right for remainders and comparisons), each step a literal,
checkable equation over single digits or a two-digit number, followed by the answer built so far:

====  =====================  ==========================================================
add   ``47+85``              ``7+5=12|2 4+8+1=13|132 #### 132`` (digit sum, carry)
sub   ``85-47``              ``15-7=8|8 8-1-4=3|38 #### 38`` (borrow as ``1x``, ``-1``)
mul   ``47*6``               ``7*6=42|2 4*6+4=28|282 #### 282`` (times table, carry)
mod   ``437 mod 6``          ``4%6=4 43%6=1 17%6=5 #### 5`` (long division remainders)
cmp   ``max(4721,4718)``     ``4=4 7=7 2>1 #### 4721`` (left to right, to the first change)
word  ``Ann has 47 pens...`` the add, sub or mul steps of the sentence's operation
====  =====================  ==========================================================

So the families share some sub-skills and not others: ``mul`` adds a carry as ``add`` does and
uses the times table that ``mod`` needs; ``word`` is ``add``/``sub``/``mul`` in a sentence;
``cmp`` shares nothing. Difficulty ``d`` is the number of digits (``mod`` and ``cmp``: ``d + 1``).
Rows, prompt template and the hash-based splits are those of
:func:`~cropi_pl.tasks.generated.generate_problems`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from cropi_pl.tasks.arithmetic import ITEMS, NAMES, PROMPT_TEMPLATE, Problem, number_with_digits
from cropi_pl.tasks.generated import GeneratedTasks

STEPWISE_FAMILIES = ("add", "sub", "mul", "mod", "cmp", "word")


def _digits(value: int, width: int) -> list[int]:
    """The ``width`` lowest digits of ``value``, least significant first."""
    return [(value // 10**i) % 10 for i in range(width)]


def _carrying(columns: list[tuple[str, int]]) -> tuple[str, int]:
    """Right-to-left columns ``(text, value)``: each adds the previous column's carry
    (``+c``), then writes its last digit before the answer built so far (the last column writes
    its whole value)."""
    carry, built, steps = 0, "", []
    for i, (text, value) in enumerate(columns):
        total = value + carry
        built = (str(total) if i == len(columns) - 1 else str(total % 10)) + built
        steps.append(f"{text}{f'+{carry}' if carry else ''}={total}|{built}")
        carry = total // 10
    return " ".join(steps), int(built)


def add_steps(a: int, b: int) -> tuple[str, int]:
    """Column addition of two numbers with the same number of digits."""
    width = len(str(max(a, b)))
    pairs = zip(_digits(a, width), _digits(b, width), strict=True)
    return _carrying([(f"{x}+{y}", x + y) for x, y in pairs])


def sub_steps(a: int, b: int) -> tuple[str, int]:
    """Column subtraction (``a >= b``); a borrowed ten is written ``1x``, a repaid one ``-1``."""
    width = len(str(a))
    borrow, built, steps = 0, "", []
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        lends = x - borrow < y
        difference = x - borrow + 10 * lends - y
        built = str(difference) + built
        steps.append(f"{'1' if lends else ''}{x}{'-1' if borrow else ''}-{y}={difference}|{built}")
        borrow = int(lends)
    return " ".join(steps), int(built)


def mul_steps(a: int, b: int) -> tuple[str, int]:
    """Long multiplication of ``a`` by a one-digit ``b``, carrying into the next digit."""
    return _carrying([(f"{x}*{b}", x * b) for x in _digits(a, len(str(a)))])


def mod_steps(a: int, b: int) -> tuple[str, int]:
    """Long division's running remainders, one digit of ``a`` at a time."""
    remainder, steps = 0, []
    for digit in str(a):
        value = remainder * 10 + int(digit)
        remainder = value % b
        steps.append(f"{value}%{b}={remainder}")
    return " ".join(steps), remainder


def cmp_steps(a: int, b: int) -> tuple[str, int]:
    """Digits compared left to right up to the first that differs (same length, ``a != b``)."""
    steps = []
    for x, y in zip(str(a), str(b), strict=True):
        steps.append(f"{x}{'=' if x == y else '>' if x > y else '<'}{y}")
        if x != y:
            break
    return " ".join(steps), max(a, b)


def _add(rng: random.Random, d: int) -> Problem:
    a, b = number_with_digits(rng, d), number_with_digits(rng, d)
    return Problem(f"{a}+{b}", *add_steps(a, b))


def _sub(rng: random.Random, d: int) -> Problem:
    a, b = sorted((number_with_digits(rng, d), number_with_digits(rng, d)), reverse=True)
    return Problem(f"{a}-{b}", *sub_steps(a, b))


def _factor(rng: random.Random, d: int) -> int:
    return rng.randint(2, 9) if d == 1 else number_with_digits(rng, d)


def _mul(rng: random.Random, d: int) -> Problem:
    a, b = _factor(rng, d), rng.randint(2, 9)
    return Problem(f"{a}*{b}", *mul_steps(a, b))


def _mod(rng: random.Random, d: int) -> Problem:
    a, b = number_with_digits(rng, d + 1), rng.randint(2, 9)
    return Problem(f"{a} mod {b}", *mod_steps(a, b))


def _cmp(rng: random.Random, d: int) -> Problem:
    """Two close numbers of ``d + 1`` digits, so several leading digits usually agree."""
    while True:
        a = number_with_digits(rng, d + 1)
        b = a + rng.choice((-1, 1)) * rng.randint(1, 10 ** max(0, d - 1))
        if b != a and b >= 0 and len(str(b)) == len(str(a)):
            return Problem(f"max({a},{b})", *cmp_steps(a, b))


def _word(rng: random.Random, d: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("gain", "lose", "groups"))
    if kind == "groups":
        a, b = _factor(rng, d), rng.randint(2, 9)
        question = f"{name} has {a} bags of {b} {item}s. How many {item}s?"
        return Problem(question, *mul_steps(a, b))
    a, b = sorted((number_with_digits(rng, d), number_with_digits(rng, d)), reverse=True)
    if kind == "gain":
        question = f"{name} has {a} {item}s and gets {b} more. How many {item}s?"
        return Problem(question, *add_steps(a, b))
    question = f"{name} has {a} {item}s and gives {b} away. How many {item}s?"
    return Problem(question, *sub_steps(a, b))


STEPWISE_GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "mod": _mod,
    "cmp": _cmp,
    "word": _word,
}


class StepwiseTasks(GeneratedTasks):
    """A prompt source of step-by-step arithmetic tasks (the embedded testbed), from YAML."""

    generators = STEPWISE_GENERATORS
    template = PROMPT_TEMPLATE
    kind = "stepwise"
