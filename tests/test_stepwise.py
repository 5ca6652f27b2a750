"""Step-by-step tasks: every step is a true equation over small numbers, the steps rebuild the
answer, the answer follows from the question text, and splits stay disjoint."""

from __future__ import annotations

import random
import re

import pytest

from cropi_pl.policy.build import extract_answer
from cropi_pl.tasks.source import load_source
from cropi_pl.tasks.stepwise import (
    STEPWISE_FAMILIES,
    StepwiseTasks,
    add_steps,
    cmp_steps,
    mod_steps,
    mul_steps,
    sub_steps,
)

# Written independently of the generator: the answer from the question's numbers.
RECOMPUTE = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "mod": lambda a, b: a % b,
    "cmp": max,
}
STEP = re.compile(r"^(\d+)([-+*%])(\d+)(?:([-+])(\d+))?=(\d+)(?:\|(\d+))?$")


def _check_step(step: str) -> None:
    """A step is a literal equation whose operands are at most two digits (cmp: one digit)."""
    if re.fullmatch(r"\d[=<>]\d", step):
        x, op, y = step
        assert {"=": x == y, "<": x < y, ">": x > y}[op], step
        return
    match = STEP.match(step)
    assert match, step
    a, op, b, op2, c, result, _ = match.groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}.get(op)
    if op == "%":
        value = int(a) % int(b)
    if op2:
        value = value + int(c) if op2 == "+" else value - int(c)
    assert value == int(result), step
    assert max(int(a), int(b), int(c or 0)) < 100, step


def _question(row: dict) -> str:
    return row["prompt"].removeprefix("Q: ").removesuffix("\nA: ")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_step_is_true_and_the_answer_follows_from_the_question(split: str) -> None:
    rows = StepwiseTasks(num_per_cell=25, split=split, seed=random.randrange(100)).load().to_list()
    assert {r["family"] for r in rows} == set(STEPWISE_FAMILIES)
    for row in rows:
        question = _question(row)
        numbers = [int(x) for x in re.findall(r"\d+", question)]
        if row["family"] == "word":
            a, b = numbers
            operation = "mul" if "bags" in question else "add" if "more" in question else "sub"
        else:
            a, b = numbers
            operation = row["family"]
        assert int(row["answer"]) == RECOMPUTE[operation](a, b), row
        steps, answer = row["solution"].split(" #### ")
        assert extract_answer(row["solution"]) == row["answer"] == answer
        for step in steps.split(" "):
            _check_step(step)
        built = steps.split(" ")[-1].rpartition("|")[2]
        if "|" in steps:  # the last built number is the answer (leading zeros of a difference)
            assert int(built) == int(answer), row


def test_solvers_against_python_on_random_numbers() -> None:
    rng = random.Random()
    for _ in range(2000):
        width = rng.randint(1, 5)
        a, b = (rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1) for _ in "ab")
        m = rng.randint(2, 9)
        assert add_steps(a, b)[1] == a + b
        assert sub_steps(max(a, b), min(a, b))[1] == abs(a - b)
        assert mul_steps(a, m)[1] == a * m
        assert mod_steps(a, m)[1] == a % m
        if a != b:
            assert cmp_steps(a, b)[1] == max(a, b)


def test_carries_borrows_and_first_difference_by_hand() -> None:
    assert add_steps(47, 85) == ("7+5=12|2 4+8+1=13|132", 132)
    assert sub_steps(85, 47) == ("15-7=8|8 8-1-4=3|38", 38)
    assert sub_steps(100, 1) == ("10-1=9|9 10-1-0=9|99 1-1-0=0|099", 99)
    assert mul_steps(47, 6) == ("7*6=42|2 4*6+4=28|282", 282)
    assert mod_steps(437, 6) == ("4%6=4 43%6=1 17%6=5", 5)
    assert cmp_steps(4721, 4718) == ("4=4 7=7 2>1", 4721)


def test_splits_are_disjoint_and_generation_is_seeded() -> None:
    splits = {s: load_source(StepwiseTasks(num_per_cell=30, split=s)) for s in ("train", "test")}
    assert not set(splits["train"]["prompt"]) & set(splits["test"]["prompt"])
    again = StepwiseTasks(num_per_cell=30, split="train").load()
    assert again["prompt"] == splits["train"]["prompt"]
    other = StepwiseTasks(num_per_cell=30, split="train", seed=1).load()
    assert other["prompt"] != splits["train"]["prompt"]
    assert StepwiseTasks(split="test").fingerprint() != StepwiseTasks(split="train").fingerprint()
    assert StepwiseTasks().fingerprint().startswith("stepwise:")
