"""The contract for reward functions, and the guard that keeps a bad one from killing a run.

A reward is either a :class:`RewardFunction` subclass (named in YAML by ``class_path``) or a plain
callable written the way TRL's ``GRPOTrainer`` takes ``reward_funcs`` (named in YAML by its import
path, e.g. ``my_pkg.rewards.format_reward``)::

    def format_reward(prompts, completions, answers, **columns) -> list[float | None]: ...

It is called with keyword arguments: ``prompts``, ``completions`` and ``answers`` (one entry per
completion: a prompt repeated K times appears K times) and every dataset column except ``prompt``
(``answer``, ``id``, ``family``, ``difficulty`` and any extra column of the prompt file) as a list
aligned with ``completions``. It returns one float per completion, or None where the reward does
not apply (see :func:`combine`).

Either kind scores a whole batch at once (so it can share work such as parsing one gold answer for
K completions), but user code fails in ways training must survive: an exception on one odd
completion, a hang in a symbolic solver, a list of the wrong length, a NaN. :func:`safe_rewards`
turns each of those into a reward of 0 for the completions concerned and a count that gets logged.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Row columns not passed to a plain-function reward: "prompt" is what ``prompts`` carries (TRL
# skips it too), and a column may not shadow one of the keyword arguments.
UNPASSED_COLUMNS = ("prompt", "prompts", "completions", "answers")

DEFAULT_REWARD_TIMEOUT_S = 60.0
"""Default bound on one reward function's wall-clock time for one batch (``reward_timeout_s``):
long enough for any honest checker, short enough that a hanging one cannot stall a run."""


class RewardFunction(ABC):
    """Scores completions; subclasses are configured from YAML by class path and init args.

    ``name`` names the reward's metrics (``rewards/<name>/mean``); empty: the class name.
    """

    name: str = ""
    timeouts: int = 0
    """Checks the function cut off itself (scoring them 0), counted since construction; the guard
    adds each call's increase to ``rewards/<name>/timeouts``. A function without its own
    deadlines leaves it 0."""

    @abstractmethod
    def __call__(
        self, prompts: list[str], completions: list[str], answers: list[str], rows: list[dict]
    ) -> list[float | None]:
        """One float per completion (None: does not apply). ``answers[i]`` is the gold answer of
        ``completions[i]`` and ``rows[i]`` its dataset row (family, difficulty, ...), so one
        prompt repeated K times appears K times in every list."""


RewardCallable = Callable[..., Sequence[float | None]]
"""A :class:`RewardFunction` or a plain keyword-argument function (module docstring)."""


@dataclass
class RewardOutcome:
    """One reward function's values for a batch: a float per completion, or None where the
    function said it does not apply; ``failures``/``timeouts`` count completions zeroed by the
    guard (``timeouts`` also those the function cut off itself)."""

    rewards: list[float | None]
    failures: int
    timeouts: int

    def filled(self) -> list[float]:
        """The values with None read as 0.0 (what accuracy and the trajectory cache use)."""
        return [0.0 if value is None else value for value in self.rewards]


class RewardTimeout(BaseException):
    """Raised inside a call whose :func:`deadline` passed.

    A BaseException, like KeyboardInterrupt, so that a reward function's own ``except Exception``
    (math-verify and sympy have many) cannot swallow it and keep running.
    """


_unenforced_warned = False


@contextmanager
def deadline(seconds: float | None) -> Iterator[bool]:
    """Interrupt the block with :class:`RewardTimeout` after ``seconds`` of wall-clock time.

    Uses SIGALRM, so it is enforced only in the main thread on POSIX (yields whether it is).
    Deadlines nest: an inner one never outlives the outer one, and the outer timer is re-armed
    with its remaining time on exit. (math-verify's own alarm-based timeouts cancel any outer timer,
    which is why callers here switch those off and use this instead.)
    """
    global _unenforced_warned
    enforce = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not enforce:
        if seconds is not None and not _unenforced_warned:
            logger.warning("reward deadlines are only enforced in the main thread; not enforcing")
            _unenforced_warned = True
        yield False
        return
    if seconds <= 0:
        raise ValueError(f"deadline seconds must be positive, got {seconds}")
    active = [True]

    def on_alarm(signum: int, frame: object) -> None:
        if active[0]:
            raise RewardTimeout(f"deadline of {seconds}s passed")

    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_delay) if outer_delay else seconds)
    try:
        yield True
    finally:
        try:
            active[0] = False  # the alarm may land just before this; the inner finally still runs
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer_delay:
                left = outer_delay - (time.monotonic() - start)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), outer_interval)


def reward_name(fn: RewardCallable) -> str:
    """The name metrics use: a reward's ``name`` attribute, else its function or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    target = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(target, "__name__", None) or type(target).__name__


def call_reward(
    fn: RewardCallable,
    prompts: list[str],
    completions: list[str],
    answers: list[str],
    rows: list[dict],
) -> Sequence[Any]:
    """Call ``fn`` in its own convention: positionally for a :class:`RewardFunction`, with
    keyword arguments (``prompts``, ``completions``, ``answers``, every row column but
    ``prompt``) for anything else."""
    if isinstance(fn, RewardFunction):
        return fn(prompts, completions, answers, rows)
    keys = dict.fromkeys(key for row in rows for key in row)
    columns = {key: [row.get(key) for row in rows] for key in keys if key not in UNPASSED_COLUMNS}
    return fn(prompts=prompts, completions=completions, answers=answers, **columns)


def _value(value: Any) -> float | None:
    """None stays None (not applicable); anything else must convert to a float."""
    return None if value is None else float(value)


def reported_timeouts(fn: RewardCallable) -> int:
    """The checks ``fn`` says it cut off itself (:attr:`RewardFunction.timeouts`), 0 if it keeps
    no count."""
    count = getattr(fn, "timeouts", 0)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _call_one(
    fn: RewardCallable,
    prompt: str,
    completion: str,
    answer: str,
    row: dict,
    timeout_s: float | None,
) -> tuple[float | None, str | None]:
    """Score one completion alone: (reward, None) or (0.0, 'failure' | 'timeout'), where a
    timeout is also one the reward reported itself (its ``timeouts`` count grew)."""
    before = reported_timeouts(fn)
    try:
        with deadline(timeout_s):
            values = list(call_reward(fn, [prompt], [completion], [answer], [row]))
        value = _value(values[0]) if len(values) == 1 else math.nan
    except RewardTimeout:
        return 0.0, "timeout"
    except Exception:
        logger.debug("reward %s failed on one completion", reward_name(fn), exc_info=True)
        return 0.0, "failure"
    if value is not None and not math.isfinite(value):
        return 0.0, "failure"
    return value, "timeout" if reported_timeouts(fn) > before else None


def _one_by_one(
    fn: RewardCallable,
    prompts: list[str],
    completions: list[str],
    answers: list[str],
    rows: list[dict],
    end: float | None,
) -> RewardOutcome:
    """Score each completion alone, sharing the time left until ``end`` (monotonic clock; None:
    unbounded) fairly: each call gets the time left over the calls left, so one hanging
    completion costs its share, and completions reached after ``end`` are timeouts unscored."""
    rewards: list[float | None] = []
    failures = timeouts = 0
    for index, args in enumerate(zip(prompts, completions, answers, rows, strict=True)):
        share = None if end is None else (end - time.monotonic()) / (len(completions) - index)
        if share is not None and share <= 0:
            value, status = 0.0, "timeout"
        else:
            value, status = _call_one(fn, *args, share)
        rewards.append(value)
        failures += status == "failure"
        timeouts += status == "timeout"
    return RewardOutcome(rewards=rewards, failures=failures, timeouts=timeouts)


def safe_rewards(
    fn: RewardCallable,
    prompts: list[str],
    completions: list[str],
    answers: list[str],
    rows: list[dict],
    timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S,
) -> RewardOutcome:
    """Call ``fn`` on the whole batch; never raise for anything ``fn`` does, and never take
    longer than ``timeout_s`` (None: unbounded) in all.

    The batch call gets half of ``timeout_s``. If it raises or runs out of time, every completion
    is scored alone within what is left of ``timeout_s`` (:func:`_one_by_one`) and only the
    completions that fail or time out get 0. A result of the wrong length gives every completion 0
    (no way to tell which value belongs to which completion). Non-finite values become 0; None
    stays None (the reward does not apply). Every zeroed completion is counted as a failure or a
    timeout, and so are the checks a reward reports it cut off itself (its ``timeouts`` count, as
    :class:`~cropi_pl.rewards.math_answer.MathVerifyReward` keeps).
    """
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
    n = len(completions)
    lengths = {"prompts": len(prompts), "answers": len(answers), "rows": len(rows)}
    misaligned = {key: size for key, size in lengths.items() if size != n}
    if misaligned:
        raise ValueError(f"reward inputs must align with {n} completions, got lengths {misaligned}")
    name = reward_name(fn)
    end = None if timeout_s is None else time.monotonic() + timeout_s
    before = reported_timeouts(fn)
    try:
        with deadline(None if timeout_s is None else timeout_s / 2):
            values = call_reward(fn, prompts, completions, answers, rows)
        values = [_value(v) for v in values]
    except (Exception, RewardTimeout) as error:
        logger.warning("reward %s failed on the batch (%r); scoring one by one", name, error)
        outcome = _one_by_one(fn, prompts, completions, answers, rows, end)
    else:
        if len(values) != n:
            logger.warning(
                "reward %s returned %d values for %d completions; all set to 0",
                name,
                len(values),
                n,
            )
            return RewardOutcome(rewards=[0.0] * n, failures=n, timeouts=0)
        bad = [v is not None and not math.isfinite(v) for v in values]
        outcome = RewardOutcome(
            rewards=[0.0 if b else v for v, b in zip(values, bad, strict=True)],
            failures=sum(bad),
            timeouts=reported_timeouts(fn) - before,
        )
    if outcome.failures or outcome.timeouts:
        logger.warning(
            "reward %s: %d failures, %d timeouts of %d completions (scored 0)",
            name,
            outcome.failures,
            outcome.timeouts,
            n,
        )
    return outcome


def combine(outcomes: Sequence[RewardOutcome], weights: Sequence[float]) -> list[float]:
    """Per-completion weighted sum of several reward functions' outcomes.

    A None (the reward does not apply) contributes nothing to its completion's sum, as TRL's
    ``nansum`` does. A completion that every reward skipped is unscorable: its value is NaN, which
    the advantage computation leaves out of its group's statistics and gives an advantage of 0.
    """
    if len(outcomes) != len(weights):
        raise ValueError(f"got {len(outcomes)} reward outcomes but {len(weights)} weights")
    if not outcomes:
        raise ValueError("combine needs at least one reward outcome")
    sizes = {len(outcome.rewards) for outcome in outcomes}
    if len(sizes) != 1:
        raise ValueError(f"reward outcomes have different lengths {sorted(sizes)}")
    totals = []
    for values in zip(*(outcome.rewards for outcome in outcomes), strict=True):
        applied = [(w, v) for w, v in zip(weights, values, strict=True) if v is not None]
        totals.append(sum(w * v for w, v in applied) if applied else math.nan)
    return totals
