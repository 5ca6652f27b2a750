"""Reward functions: answer extraction, numeric and symbolic checking, and the failure guard."""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from cropi_pl.rewards import (
    ExactNumberReward,
    MathVerifyReward,
    RewardFunction,
    RewardOutcome,
    RewardTimeout,
    combine,
    deadline,
    extract_answer,
    reward_name,
    safe_rewards,
)
from cropi_pl.rewards.numeric import last_boxed, parse_number

PATHOLOGICAL = [
    "9" * 100_000,
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5001,
    "\\boxed{10!!!!!!}",
    "\\boxed{9^{9^{9^{9}}}}",
    "{" * 20_000 + "\\boxed{" * 2000,
]


def score(fn: RewardFunction, completions: list[str], answers: list[str]) -> list[float]:
    n = len(completions)
    return fn([""] * n, completions, answers, [{}] * n)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 6*7=42\n#### 42", "42"),
        ("#### 1 \n#### 1,000\nextra", "1,000"),  # the LAST marker, its first line
        ("\\boxed{5} and then ####  \n", "5"),  # nothing after #### falls back to the box
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, nested braces
        ("the result of 10-5 is 5.", "5"),
        ("x=-3", "-3"),
        ("no numbers here", None),
        ("", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_boxed_first_prefers_the_box_over_a_stray_hash_line() -> None:
    text = "9 * 3 = 27 stickers.\n#### 2\nThe answer is \\boxed{27}."  # SmolLM2, as sampled
    assert extract_answer(text) == "2" and extract_answer(text, boxed_first=True) == "27"
    assert extract_answer("7 apples\n#### 7", boxed_first=True) == "7"  # no box: the hashes
    assert extract_answer("so 7 apples", boxed_first=True) == "7"  # neither: the last number
    assert score(MathVerifyReward(), [text], ["27"]) == [0.0]
    assert score(MathVerifyReward(boxed_first=True), [text, text], ["27", "2"]) == [1.0, 0.0]


def test_last_boxed_nested_and_unbalanced() -> None:
    assert last_boxed("\\boxed{\\sqrt{\\frac{a}{b}}} end") == "\\sqrt{\\frac{a}{b}}"
    assert last_boxed("\\boxed{1} \\boxed{{2}") is None
    assert last_boxed("nothing") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3/4", Fraction(3, 4)),
        ("0.75", Fraction(3, 4)),
        ("-.5", Fraction(-1, 2)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("1,000,000", Fraction(10**6)),
        ("$1,234.50", Fraction(246900, 200)),
        ("x=2", Fraction(2)),
        ("1/0", None),
        ("9" * 100_000, None),  # beyond int()'s digit limit: no answer, not a crash
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


def _render(value: Fraction, rng: random.Random) -> str:
    """One of the ways a model might write ``value`` (reference formatter for the random test)."""
    if value.denominator == 1:
        forms = [str(value.numerator), f"{value.numerator:,}", f"{value.numerator}.0"]
    else:
        forms = [
            f"{value.numerator}/{value.denominator}",
            f"\\frac{{{value.numerator}}}{{{value.denominator}}}",
        ]
        if 10**6 % value.denominator == 0:
            forms.append(f"{float(value):.6f}")
    body = rng.choice(forms)
    return rng.choice([f"work... #### {body}", f"so \\boxed{{{body}}}", f"answer is {body}"])


def test_exact_number_matches_reference_on_random_answers() -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    golds, completions, expected = [], [], []
    for _ in range(300):
        gold = Fraction(rng.randint(-5000, 5000), rng.choice([1, 1, 2, 4, 5, 8, 3]))
        predicted = (
            gold if rng.random() < 0.5 else gold + Fraction(rng.randint(1, 9), rng.choice([1, 7]))
        )
        golds.append(
            rng.choice([str(gold), f"{float(gold)!r}"])
            if gold.denominator in (1, 2, 4, 5, 8)
            else str(gold)
        )
        completions.append(_render(predicted, rng))
        expected.append(float(predicted == gold))
    got = score(ExactNumberReward(), completions, golds)
    bad = [(c, g) for c, g, e, r in zip(completions, golds, expected, got, strict=True) if e != r]
    assert not bad, f"seed {seed}: mismatches {bad[:5]}"


def test_exact_number_forms_wrong_missing_pathological() -> None:
    completions = [
        "#### 0.75",
        "\\boxed{\\frac{3}{4}}",
        "3/4",
        "#### 1,000",
        "#### 0.7500001",
        "#### 0.751",
        "",
        "I do not know",
        *PATHOLOGICAL,
    ]
    golds = ["3/4", "0.75", "0.75", "1000", "0.75", "0.75", "3", "3", *["7"] * len(PATHOLOGICAL)]
    start = time.perf_counter()
    got = score(ExactNumberReward(), completions, golds)
    assert time.perf_counter() - start < 2.0
    assert got == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, *[0.0] * len(PATHOLOGICAL)]


def test_exact_number_rejects_non_numeric_gold_and_guard_counts_it() -> None:
    with pytest.raises(ValueError, match="not a number"):
        score(ExactNumberReward(), ["#### 1"], ["pi"])
    outcome = safe_rewards(
        ExactNumberReward(), ["", ""], ["#### 1", "#### 2"], ["1", "pi"], [{}, {}]
    )
    assert outcome == RewardOutcome(rewards=[1.0, 0.0], failures=1, timeouts=0)


def test_math_verify_equivalent_wrong_and_missing() -> None:
    reward = MathVerifyReward()
    cases = [
        ("so 3/4", "0.75", 1.0),
        ("#### 0.75", "3/4", 1.0),
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("therefore \\boxed{x=2}", "2", 1.0),
        ("\\boxed{2}", "x=2", 1.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("\\boxed{\\frac{2}{3}}", "0.75", 0.0),
        ("\\boxed{x=3}", "2", 0.0),
        ("#### 41", "42", 0.0),
        ("I cannot solve this.", "42", 0.0),
        ("", "42", 0.0),
        ("\\boxed{1}", "", 0.0),
    ]
    got = score(reward, [c for c, _, _ in cases], [g for _, g, _ in cases])
    assert got == [e for _, _, e in cases]
    assert reward.timeouts == 0


def _pathological_main_thread_check() -> None:
    # Default cap: over-long answers are rejected without parsing.
    start = time.perf_counter()
    assert score(MathVerifyReward(timeout_s=0.3), PATHOLOGICAL, ["7"] * len(PATHOLOGICAL)) == [
        0.0
    ] * len(PATHOLOGICAL)
    assert time.perf_counter() - start < 3.0
    # No cap: the deadline has to stop sympy, once per check. A signal cannot interrupt C-level
    # big-integer arithmetic (the power tower can enter it), so that case is left to the
    # worker-process test below, where a stuck check is killed.
    interruptible = [p for p in PATHOLOGICAL if "9^{" not in p]
    reward = MathVerifyReward(timeout_s=0.3, max_answer_chars=10**7)
    start = time.perf_counter()
    got = score(reward, [*interruptible, "\\boxed{1}"], [*["7"] * len(interruptible), "1"])
    elapsed = time.perf_counter() - start
    assert got == [0.0] * len(interruptible) + [1.0]
    assert elapsed < 0.3 * len(interruptible) + 3.0, elapsed
    assert reward.timeouts >= 1  # 10!!!!!! cannot finish in 0.3 s
    # The guard counts math-verify's own cut-off checks in rewards/<name>/timeouts.
    reward = MathVerifyReward(timeout_s=0.3, max_answer_chars=10**7)
    texts = ["\\boxed{10!!!!!!}", "\\boxed{1}"]
    outcome = safe_rewards(reward, texts, texts, ["7", "1"], [{}, {}], timeout_s=30)
    assert outcome == RewardOutcome(rewards=[0.0, 1.0], failures=0, timeouts=1)


def test_math_verify_pathological_is_bounded_in_main_thread() -> None:
    # Signal deadlines are process-global state: check them in a fresh interpreter, as a
    # training process is, not after other tests have run in this one.
    code = "from tests.test_rewards import _pathological_main_thread_check as c; c()"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_math_verify_off_main_thread_uses_bounded_workers() -> None:
    reward = MathVerifyReward(timeout_s=0.3, max_answer_chars=10**7)
    completions = ["\\boxed{10!!!!!!}", "\\boxed{\\frac{3}{4}}", "#### 7", "\\boxed{9^{9^{9^{9}}}}"]
    result: dict[str, list[float]] = {}

    def run() -> None:
        result["rewards"] = score(reward, completions, ["1", "0.75", "8", "7"])

    try:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(timeout=150)
        assert not worker.is_alive()
        assert result["rewards"] == [0.0, 1.0, 0.0, 0.0]
        assert reward.timeouts >= 1
        # The reward survives a copy (Lightning deep-copies modules holding it) without its pool.
        clone = copy.deepcopy(reward)
        assert clone._pool is None and score(clone, ["\\boxed{0.5}"], ["1/2"]) == [1.0]
    finally:
        reward.close()


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_deadline_interrupts_and_nests() -> None:
    start = time.monotonic()
    with pytest.raises(RewardTimeout), deadline(0.1):
        _spin(5)
    assert time.monotonic() - start < 1.0
    # An inner deadline that finishes in time must leave the outer one armed (math-verify's own
    # alarm timeouts would cancel it).
    start = time.monotonic()
    with pytest.raises(RewardTimeout), deadline(0.4):
        with deadline(0.1):
            _spin(0.02)
        _spin(5)
    assert 0.35 < time.monotonic() - start < 1.5
    # An outer deadline shorter than the inner one still wins.
    start = time.monotonic()
    with pytest.raises(RewardTimeout), deadline(0.1), deadline(10):
        _spin(5)
    assert time.monotonic() - start < 1.0


def test_deadline_not_enforced_off_main_thread() -> None:
    seen: list[bool] = []

    def run() -> None:
        with deadline(0.01) as enforced:
            _spin(0.05)
        seen.append(enforced)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [False]


def _flaky_values(completions: list[str]) -> list[float | None]:
    """Length of the completion, except: raises on "boom", NaN on "nan", hangs on "hang",
    None (not applicable) on "skip"."""
    out: list[float | None] = []
    for text in completions:
        if text == "boom":
            raise RuntimeError("bad completion")
        if text == "hang":
            _spin(60)
        out.append(math.nan if text == "nan" else None if text == "skip" else float(len(text)))
    return out


class Flaky(RewardFunction):
    """The RewardFunction kind of :func:`_flaky_values`."""

    name = "flaky"

    def __call__(self, prompts, completions, answers, rows):
        return _flaky_values(completions)


def flaky(prompts, completions, **kwargs):
    """The plain-function kind (TRL's keyword convention) of :func:`_flaky_values`."""
    return _flaky_values(completions)


class ShortFn:
    """A callable class that is not a RewardFunction: called with keyword arguments."""

    def __call__(self, completions, **kwargs):
        return [1.0] * (len(completions) - 1)


BOTH_KINDS = pytest.mark.parametrize("fn", [Flaky(), flaky], ids=["subclass", "function"])


@BOTH_KINDS
def test_safe_rewards_isolates_one_failure(fn) -> None:
    completions = ["a", "bb", "boom", "dddd"]
    outcome = safe_rewards(fn, completions, completions, ["x"] * 4, [{}] * 4)
    assert outcome == RewardOutcome(rewards=[1.0, 2.0, 0.0, 4.0], failures=1, timeouts=0)


@BOTH_KINDS
def test_safe_rewards_nonfinite_and_timeout(fn) -> None:
    completions = ["a", "nan", "hang", "ccc"]
    start = time.monotonic()
    outcome = safe_rewards(fn, completions, completions, ["x"] * 4, [{}] * 4, timeout_s=0.2)
    assert time.monotonic() - start < 0.2 * 5 + 1.0
    assert outcome == RewardOutcome(rewards=[1.0, 0.0, 0.0, 3.0], failures=1, timeouts=1)


@BOTH_KINDS
def test_hanging_reward_costs_at_most_the_timeout(fn) -> None:
    # Every call hangs: the batch call and each one-by-one retry share one budget, so the whole
    # batch costs about timeout_s, not (n + 1) * timeout_s.
    completions = ["hang"] * 8
    start = time.monotonic()
    outcome = safe_rewards(fn, completions, completions, ["x"] * 8, [{}] * 8, timeout_s=0.4)
    assert time.monotonic() - start < 0.4 + 0.3
    assert outcome == RewardOutcome(rewards=[0.0] * 8, failures=0, timeouts=8)


def test_rewards_are_bounded_by_default() -> None:
    import inspect

    from cropi_pl.grpo.module import GRPOModule

    default = inspect.signature(GRPOModule).parameters["reward_timeout_s"].default
    assert default == inspect.signature(safe_rewards).parameters["timeout_s"].default == 60.0


class SelfTimed(RewardFunction):
    """Bounds its own checks as MathVerifyReward does: "slow" is cut off (scored 0, counted)."""

    def __init__(self) -> None:
        self.timeouts = 0

    def __call__(self, prompts, completions, answers, rows):
        self.timeouts += completions.count("slow")
        return [0.0 if text == "slow" else 1.0 for text in completions]


def test_safe_rewards_counts_the_rewards_own_timeouts() -> None:
    texts = ["a", "slow", "b", "slow"]
    outcome = safe_rewards(SelfTimed(), texts, texts, ["x"] * 4, [{}] * 4)
    assert outcome == RewardOutcome(rewards=[1.0, 0.0, 1.0, 0.0], failures=0, timeouts=2)
    mixed = ["slow", "boom"]  # the batch fails, so the completions are retried alone

    class Both(SelfTimed):
        def __call__(self, prompts, completions, answers, rows):
            if "boom" in completions:
                raise RuntimeError("boom")
            return super().__call__(prompts, completions, answers, rows)

    outcome = safe_rewards(Both(), mixed, mixed, ["x"] * 2, [{}] * 2)
    assert outcome == RewardOutcome(rewards=[0.0, 0.0], failures=1, timeouts=1)


@BOTH_KINDS
def test_safe_rewards_keeps_none_and_it_is_no_failure(fn) -> None:
    completions = ["a", "skip", "boom", "skip"]
    outcome = safe_rewards(fn, completions, completions, ["x"] * 4, [{}] * 4)
    assert outcome == RewardOutcome(rewards=[1.0, None, 0.0, None], failures=1, timeouts=0)
    assert outcome.filled() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["subclass", "callable class"])
def test_safe_rewards_wrong_length_zeroes_all(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    class Short(RewardFunction):
        name = "short_reward"

        def __call__(self, prompts, completions, answers, rows):
            return [1.0] * (len(completions) - 1)

    fn = Short() if kind == "subclass" else ShortFn()
    with caplog.at_level(logging.WARNING):
        outcome = safe_rewards(fn, ["p"] * 3, ["a", "b", "c"], ["x"] * 3, [{}] * 3)
    assert outcome == RewardOutcome(rewards=[0.0] * 3, failures=3, timeouts=0)
    assert ("short_reward" if kind == "subclass" else "ShortFn") in caplog.text


@BOTH_KINDS
def test_safe_rewards_passes_good_values_through_and_checks_alignment(fn) -> None:
    rng = random.Random()
    completions = ["x" * rng.randint(0, 20) for _ in range(10)]
    outcome = safe_rewards(fn, completions, completions, ["a"] * 10, [{}] * 10, timeout_s=5)
    assert outcome == RewardOutcome([float(len(c)) for c in completions], 0, 0)
    with pytest.raises(ValueError, match="rows"):
        safe_rewards(fn, ["a"], ["a"], ["x"], [])


def test_plain_function_gets_trl_keywords_and_every_column() -> None:
    seen: dict = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return [0.5] * len(kwargs["completions"])

    rng = random.Random()
    rows = [
        {
            "id": f"q{i}",
            "prompt": f"P{i}",
            "answer": str(i),
            "family": rng.choice(["add", "mul"]),
            "difficulty": rng.randint(1, 4),
            "unit": rng.choice(["", "kg"]),
            "tags": [i],
        }
        for i in range(3)
    ]
    flat = [r for r in rows for _ in range(2)]  # K = 2 completions per prompt
    completions = [f"c{j}" for j in range(6)]
    prompts = [r["prompt"] for r in flat]
    answers = [r["answer"] for r in flat]
    outcome = safe_rewards(spy, prompts, completions, answers, flat)
    assert outcome.rewards == [0.5] * 6
    expected = {"prompts": prompts, "completions": completions, "answers": answers}
    for column in ("id", "answer", "family", "difficulty", "unit", "tags"):
        expected[column] = [r[column] for r in flat]
    assert seen == expected  # "prompt" is what `prompts` carries; it is not passed twice


def test_reward_names() -> None:
    class Unnamed(RewardFunction):
        def __call__(self, prompts, completions, answers, rows):
            return [0.0] * len(completions)

    assert reward_name(ExactNumberReward()) == "exact_number"
    assert reward_name(Unnamed()) == "Unnamed"
    assert reward_name(flaky) == "flaky"
    assert reward_name(functools.partial(flaky, scale=2)) == "flaky"
    assert reward_name(ShortFn()) == "ShortFn"


def _combine_reference(values: list[list[float | None]], weights: list[float]) -> list[float]:
    out = []
    for i in range(len(values[0])):
        applied = [(w, v[i]) for w, v in zip(weights, values, strict=True) if v[i] is not None]
        out.append(sum(w * x for w, x in applied) if applied else math.nan)
    return out


def test_combine_skips_none_and_marks_all_none_unscorable() -> None:
    rng = random.Random()
    n, k = 40, 3
    values = [
        [None if rng.random() < 0.4 else rng.uniform(-1, 1) for _ in range(n)] for _ in range(k)
    ]
    values[0][0] = values[1][0] = values[2][0] = None  # at least one unscorable completion
    weights = [rng.uniform(0, 2) for _ in range(k)]
    got = combine([RewardOutcome(v, 0, 0) for v in values], weights)
    want = _combine_reference(values, weights)
    assert math.isnan(got[0])
    assert [math.isnan(x) for x in got] == [math.isnan(x) for x in want]
    assert [x for x in got if not math.isnan(x)] == pytest.approx(
        [x for x in want if not math.isnan(x)], abs=1e-12
    )


def test_combine_matches_explicit_sum() -> None:
    rng = random.Random()
    n, k = 7, 3
    outcomes = [RewardOutcome([rng.uniform(-1, 1) for _ in range(n)], 0, 0) for _ in range(k)]
    weights = [rng.uniform(0, 2) for _ in range(k)]
    expected = []
    for i in range(n):
        total = 0.0
        for j in range(k):
            total += weights[j] * outcomes[j].rewards[i]
        expected.append(total)
    assert combine(outcomes, weights) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="weights"):
        combine(outcomes, weights[:-1])
    with pytest.raises(ValueError, match="lengths"):
        combine([outcomes[0], RewardOutcome([1.0], 0, 0)], [1.0, 1.0])


def test_math_verify_does_not_log_its_disabled_timeout_warning(monkeypatch, caplog) -> None:
    import math_verify.grader
    import math_verify.parser

    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)
    monkeypatch.setattr(math_verify.grader, "TIMEOUT_WARNING_SHOWN", False)
    with caplog.at_level(logging.WARNING):
        assert score(MathVerifyReward(), ["so \\boxed{3}"], ["3"]) == [1.0]
    assert "Timeout is disabled" not in caplog.text
