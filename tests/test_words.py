"""Word problems: answers recomputed from the question text, difficulty ranges, splits, and the
GSM8K-layout export read back through PromptFile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cropi_pl.rewards.math_answer import MathVerifyReward
from cropi_pl.tasks.loading import PromptFile
from cropi_pl.tasks.source import load_source
from cropi_pl.tasks.words import FACTORS, TERMS, WORD_FAMILIES, WordProblems, generate_word_problems
from tests.test_loading import export

# What each family asks, written independently of the generator: the answer from the question's
# numbers in order of appearance.
RECOMPUTE = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "cmp": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a // b,
}


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def test_answers_follow_from_the_question_text() -> None:
    rows = generate_word_problems(num_per_cell=20).to_list()
    assert len(rows) == 20 * len(WORD_FAMILIES) * 4
    for row in rows:
        a, b = _numbers(row["prompt"])
        assert int(row["answer"]) == RECOMPUTE[row["family"]](a, b), row
        assert int(row["answer"]) >= 0 and row["solution"].endswith(f"#### {row['answer']}")
        if row["family"] == "div":
            assert a % b == 0, row
        low, high = TERMS[row["difficulty"]]
        (lo1, hi1), (lo2, hi2) = FACTORS[row["difficulty"]]
        if row["family"] == "add":
            assert low <= a <= high and low <= b <= high, row
        elif row["family"] in ("sub", "cmp"):
            assert low <= b < a <= high, row
        else:  # mul: boxes x each; div: total / friends = share
            first = a // b if row["family"] == "div" else a
            assert lo1 <= first <= hi1 and lo2 <= b <= hi2, row


def test_gold_answers_verify_against_their_solution() -> None:
    """math-verify (the config's reward) accepts each GSM8K-style reference and a boxed answer."""
    rows = generate_word_problems(num_per_cell=3, difficulties=[1, 4]).to_list()
    reward = MathVerifyReward()
    texts = [r["solution"] for r in rows] + [f"So \\boxed{{{r['answer']}}}." for r in rows]
    scores = reward([r["prompt"] for r in rows] * 2, texts, [r["answer"] for r in rows] * 2, rows)
    assert scores == [1.0] * len(texts)


def test_splits_are_disjoint_and_seeded() -> None:
    splits = {
        split: WordProblems(difficulties=[1], num_per_cell=10, split=split).load()
        for split in ("train", "validation", "test")
    }
    prompts = [set(data["prompt"]) for data in splits.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    again = WordProblems(difficulties=[1], num_per_cell=10).load()
    assert again["prompt"] == splits["train"]["prompt"]
    other = WordProblems(difficulties=[1], num_per_cell=10, seed=1)
    assert other.load()["prompt"] != again["prompt"]
    assert other.fingerprint() != WordProblems(difficulties=[1], num_per_cell=10).fingerprint()
    assert len(load_source(WordProblems(families=["mul"], difficulties=[2], num_per_cell=7))) == 7


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown task families \['expr'\]"):
        generate_word_problems(families=["expr"])


def test_gsm8k_export_reads_back_as_the_generator_rows(tmp_path: Path) -> None:
    out = tmp_path / "words.jsonl"
    args = ["--tasks", "words", "--gsm8k", "--difficulties", "1", "2", "--num-per-cell", "4"]
    code, err = export(*args, "--families", "mul", "div", "--out", str(out))
    assert code == 0, err
    loaded = load_source(
        PromptFile(str(out), answer_format="gsm8k", id_field="id", family_field="family")
    )
    expected = generate_word_problems(["mul", "div"], [1, 2], num_per_cell=4)
    for column in ("id", "prompt", "answer", "family", "difficulty"):
        assert loaded[column] == expected[column], column
    assert loaded["question"] == expected["prompt"]  # extra columns are kept
    code, err = export("--tasks", "words", "--families", "mod", "--out", str(tmp_path / "x.jsonl"))
    assert code != 0 and "unknown words families ['mod']" in err
