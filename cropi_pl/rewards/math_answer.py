"""Symbolic answer checking with math-verify, for MATH-style answers (fractions, roots, sets).

Named ``math_answer`` so that it does not shadow the ``math_verify`` package it wraps.

Bounding time: sympy can run for minutes on an adversarial answer, so each check (gold parse,
prediction parse, comparison) runs under one deadline of ``timeout_s``. math-verify's built-in
timeouts are switched off (``parsing_timeout=None, timeout_seconds=None``): they use
``signal.alarm``, which fails outside the main thread, takes whole seconds only, and cancels any
enclosing timer such as the batch deadline of :func:`~cropi_pl.rewards.base.safe_rewards`. In
their place:

- in the main thread, :func:`~cropi_pl.rewards.base.deadline` (SIGALRM, nests with outer timers);
- in any other thread, signals are unavailable, so checks go to a pool of spawned worker
  processes, each running the same deadline in its own main thread. A worker that stays silent for
  ``timeout_s + worker_grace_s`` (stuck in C code that never yields to the signal handler) is
  killed with its pool and its remaining checks score 0.

Answers longer than ``max_answer_chars`` score 0 without being parsed: no real answer is that
long, and it keeps math-verify from logging megabytes of a degenerate completion.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from functools import lru_cache
from multiprocessing.pool import Pool

from math_verify import parse, verify

from cropi_pl.rewards.base import RewardFunction, RewardTimeout, deadline
from cropi_pl.rewards.numeric import extract_answer

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 120.0


def _drop_disabled_timeout_warning(record: logging.LogRecord) -> bool:
    """math-verify warns once per process that its own timeouts are off; here they are off on
    purpose (the deadline below replaces them), so the warning would only mislead."""
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_disabled_timeout_warning)


def _as_latex(text: str) -> str:
    """math-verify's LaTeX extractor needs delimiters; bare "\\frac{3}{4}" would not be found."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """Cached: the K completions of one prompt share their gold answer."""
    return tuple(parse(_as_latex(gold), parsing_timeout=None))


def check_answer(
    gold: str, completion: str, timeout_s: float, max_answer_chars: int, boxed_first: bool = False
) -> tuple[float, bool]:
    """(reward, timed_out) for one completion. Bounded only when called in a main thread."""
    predicted = extract_answer(completion, boxed_first)
    if not predicted or len(predicted) > max_answer_chars:
        return 0.0, False
    try:
        with deadline(timeout_s):
            gold_parsed = list(_parse_gold(gold.strip()))
            pred_parsed = parse(_as_latex(predicted), parsing_timeout=None)
            correct = bool(gold_parsed and pred_parsed) and verify(
                gold_parsed, pred_parsed, timeout_seconds=None
            )
    except RewardTimeout:
        return 0.0, True
    return float(correct), False


class MathVerifyReward(RewardFunction):
    """1.0 when math-verify finds the completion's answer equivalent to the gold, else 0.0.

    The prediction is the last ``####`` line, else the last ``\\boxed{}`` (with ``boxed_first``
    the last ``\\boxed{}``, else the last ``####`` line), else the last number.
    ``timeouts`` counts checks cut off by the deadline since construction (they score 0).
    Call :meth:`close` to stop worker processes started for calls from non-main threads.

    In the main thread the deadline is a signal, which cannot interrupt C-level work (for
    example big-integer powers inside sympy); off the main thread checks run in worker processes
    that are killed after ``timeout_s + worker_grace_s``, a hard bound.
    """

    name = "math_verify"

    def __init__(
        self,
        timeout_s: float = 2.0,
        max_answer_chars: int = 1000,
        workers: int = 1,
        worker_grace_s: float = 5.0,
        boxed_first: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.workers = workers
        self.worker_grace_s = worker_grace_s
        self.boxed_first = boxed_first
        self.timeouts = 0
        self._pool: Pool | None = None
        self._lock = threading.Lock()

    def __call__(
        self, prompts: list[str], completions: list[str], answers: list[str], rows: list[dict]
    ) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        jobs = [
            (gold, text, self.timeout_s, self.max_answer_chars, self.boxed_first)
            for gold, text in zip(answers, completions, strict=True)
        ]
        if threading.current_thread() is threading.main_thread():
            results = [check_answer(*job) for job in jobs]
        else:
            results = self._check_in_workers(jobs)
        self.timeouts += sum(timed_out for _, timed_out in results)
        return [reward for reward, _ in results]

    def _check_in_workers(
        self, jobs: list[tuple[str, str, float, int, bool]]
    ) -> list[tuple[float, bool]]:
        with self._lock:
            if self._pool is None:
                self._pool = self._start_pool()
            pending = [self._pool.apply_async(check_answer, job) for job in jobs]
            results: list[tuple[float, bool]] = []
            for index, result in enumerate(pending):
                try:
                    results.append(result.get(self.timeout_s + self.worker_grace_s))
                except multiprocessing.TimeoutError:
                    logger.warning(
                        "math_verify worker ignored its %ss deadline; restarting the pool",
                        self.timeout_s,
                    )
                    self._terminate()
                    results += [(0.0, True)] * (len(pending) - index)
                    break
            return results

    def _start_pool(self) -> Pool:
        pool = multiprocessing.get_context("spawn").Pool(self.workers)
        try:  # wait out the imports (sympy) once, so per-check waits need not include them
            pool.apply_async(check_answer, ("1", "1", self.timeout_s, 10)).get(
                WORKER_START_TIMEOUT_S
            )
        except BaseException:
            pool.terminate()
            raise
        return pool

    def _terminate(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        with self._lock:
            self._terminate()

    def __getstate__(self) -> dict:
        """Picklable/deep-copyable (Lightning copies configs): a copy starts without workers."""
        state = self.__dict__.copy()
        state["_pool"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
