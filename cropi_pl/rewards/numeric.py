"""Exact numeric answer checking, for GSM8K-style and embedded arithmetic tasks.

Answer extraction is shared: the gold files (GSM8K ``#### 42``, MATH ``\\boxed{...}``) and model
completions use the same conventions, so :mod:`cropi_pl.tasks.loading` and the math-verify reward
reuse :func:`after_hashes`, :func:`last_boxed` and :func:`extract_answer` from here.
"""

from __future__ import annotations

import re
from collections import deque
from fractions import Fraction

from cropi_pl.rewards.base import RewardFunction

TOLERANCE = 1e-6

BOXED = "\\boxed{"
# A number: not the tail of a word/number ("10-5" ends in 5, not -5), with an optional sign,
# thousands groups "1,000", decimals, and an optional "/denominator"; or \frac{a}{b} of integers.
_NUMBER = re.compile(
    r"\\[dt]?frac\{\s*(?P<num>-?\d+)\s*\}\{\s*(?P<den>-?\d+)\s*\}"
    r"|(?<![\w.])(?P<value>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)"
    r"(?:\s*/\s*(?P<div>\d+)(?![\d.]))?"
)


def after_hashes(text: str) -> str | None:
    """The first non-empty line after the last ``####`` (GSM8K's answer marker), if any."""
    _, marker, rest = text.rpartition("####")
    if not marker:
        return None
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    return lines[0] if lines else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, honouring nested braces; None if unbalanced."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth = 1
    begin = start + len(BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


def _last_number_match(text: str) -> re.Match[str] | None:
    last = deque(_NUMBER.finditer(text), maxlen=1)
    return last[0] if last else None


def extract_answer(text: str, boxed_first: bool = False) -> str | None:
    """The answer a completion commits to: after the last ``####``, else the last ``\\boxed{}``
    (the other way round with ``boxed_first``, for prompts that ask for ``\\boxed{}``: small
    models also write stray ``####`` lines), else the last number in the text; None when there
    is none."""
    markers = (last_boxed, after_hashes) if boxed_first else (after_hashes, last_boxed)
    for candidate in (find(text) for find in markers):
        if candidate:
            return candidate
    match = _last_number_match(text)
    return match.group(0) if match else None


def parse_number(text: str) -> Fraction | None:
    """The exact value of the last number in ``text`` ("1,000", "-0.75", "3/4", "\\frac{3}{4}")."""
    match = _last_number_match(text)
    if match is None:
        return None
    try:
        if match.group("num") is not None:
            return Fraction(int(match.group("num")), int(match.group("den")))
        value = Fraction(match.group("value").replace(",", ""))
        div = match.group("div")
        return value / int(div) if div is not None else value
    except (ValueError, ZeroDivisionError):  # too many digits for int(), or x/0
        return None


def numbers_equal(predicted: Fraction, gold: Fraction) -> bool:
    """Equal within TOLERANCE, relative for large golds so 1e12 and 1e12+1e-3 still match."""
    return abs(predicted - gold) <= TOLERANCE * max(1, abs(gold))


class ExactNumberReward(RewardFunction):
    """1.0 when the completion's answer equals the gold number, else 0.0.

    Raises for a gold answer that is not a number: that is a data error, which
    :func:`~cropi_pl.rewards.base.safe_rewards` counts instead of silently scoring 0.
    """

    name = "exact_number"

    def __call__(
        self, prompts: list[str], completions: list[str], answers: list[str], rows: list[dict]
    ) -> list[float]:
        rewards = []
        for completion, answer in zip(completions, answers, strict=True):
            gold = parse_number(answer)
            if gold is None:
                raise ValueError(f"gold answer {answer!r} is not a number")
            predicted = extract_answer(completion)
            value = parse_number(predicted) if predicted is not None else None
            rewards.append(float(value is not None and numbers_equal(value, gold)))
        return rewards
