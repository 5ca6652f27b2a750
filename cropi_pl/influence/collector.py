"""Sampling the behaviour policy for the trajectory cache.

A :class:`Collector` is what the cache needs from a policy: sample K responses per prompt, score
them, and teacher-force beta's per-token log-probs. Samples depend only on (settings.seed, split,
prompt id, sample index) (:func:`seed_tag` and :func:`~cropi_pl.seeding.derive_seed`), so a resumed
or differently sharded collection produces exactly the same responses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from cropi_pl.generation.engine import Completion, GenerationEngine
from cropi_pl.influence.popi import behaviour_logps
from cropi_pl.policy.prompting import PromptEncoder
from cropi_pl.rewards.base import RewardCallable, safe_rewards
from cropi_pl.seeding import derive_seed


@dataclass(frozen=True)
class SamplingSettings:
    """How the behaviour policy is sampled; part of the cache's identity.

    ``prompt_format`` is the :meth:`~cropi_pl.policy.prompting.PromptEncoder.fingerprint` of the
    prompt formatting, so a cache built with another format (or chat template) is refused.
    """

    num_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    prompt_format: str = "plain"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_tag(split: str, settings: SamplingSettings) -> str:
    """The tag a collector seeds with: samples depend on (seed, split, prompt id, index) only."""
    return f"trajectories|{split}|seed={settings.seed}"


@dataclass
class Collector:
    """What the cache needs from a policy, as plain callables so tests can inject fakes.

    ``sample(rows, num_samples, temperature, seed_tag)`` returns one prompt-id list per completion
    and the completions grouped by prompt; each completion must be a function of
    ``(seed_tag, row id, sample index)`` alone (not of the batch it came in), and sampling must
    use the ``top_p``/``max_new_tokens`` of the :class:`SamplingSettings` given to ``collect``.
    ``score(rows, completions, num_samples)`` gives one reward per completion,
    ``logps(prompt_ids, completion_ids)`` the teacher-forced per-token log-probs of the behaviour
    policy (flat, one entry per completion) and ``decode(ids)`` the text stored for inspection.
    """

    sample: Callable[[list[dict], int, float, str], tuple[list[list[int]], list[Completion]]]
    score: Callable[[list[dict], list[Completion], int], Sequence[float]]
    logps: Callable[[list[list[int]], list[list[int]]], list[list[float]]]
    decode: Callable[[list[int]], str]

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        encoder: PromptEncoder,
        engine: GenerationEngine,
        reward: RewardCallable,
        settings: SamplingSettings,
        reward_timeout_s: float | None = None,
    ) -> Collector:
        """A collector sampling ``model`` through ``engine`` on prompts formatted by ``encoder``
        and scoring with ``reward``.

        Reward errors and timeouts score 0, and so does a None (not applicable) reward (see
        :func:`~cropi_pl.rewards.base.safe_rewards`).
        """
        if settings.prompt_format != encoder.fingerprint():
            raise ValueError(
                f"sampling settings name prompt format {settings.prompt_format!r} but the "
                f"encoder formats prompts as {encoder.fingerprint()!r}"
            )
        tokenizer = encoder.tokenizer

        def sample(
            rows: list[dict], num_samples: int, temperature: float, tag: str
        ) -> tuple[list[list[int]], list[Completion]]:
            prompts = encoder.encode_rows(rows)
            seeds = [derive_seed(tag, r["id"], j) for r in rows for j in range(num_samples)]
            completions = engine.generate(
                model,
                prompts,
                num_samples=num_samples,
                max_new_tokens=settings.max_new_tokens,
                temperature=temperature,
                top_p=settings.top_p,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                seeds=seeds,
            )
            return [p for p in prompts for _ in range(num_samples)], completions

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        def score(rows: list[dict], completions: list[Completion], num_samples: int) -> list[float]:
            flat = [r for r in rows for _ in range(num_samples)]
            texts = [decode(c.ids) for c in completions]
            return safe_rewards(
                reward,
                [r["prompt"] for r in flat],
                texts,
                [str(r["answer"]) for r in flat],
                flat,
                reward_timeout_s,
            ).filled()

        def logps(
            prompt_ids: list[list[int]], completion_ids: list[list[int]]
        ) -> list[list[float]]:
            out: list[list[float]] = []
            start = 0
            while start < len(prompt_ids):  # one teacher-forced batch per run of equal prompts
                stop = start + 1
                while stop < len(prompt_ids) and prompt_ids[stop] == prompt_ids[start]:
                    stop += 1
                out.extend(behaviour_logps(model, prompt_ids[start], completion_ids[start:stop]))
                start = stop
            return out

        return cls(sample=sample, score=score, logps=logps, decode=decode)


def check_collector_output(
    rows: list[dict],
    k: int,
    prompt_ids: list[list[int]],
    completions: list[Completion],
    rewards: list[float],
) -> None:
    """Fail with the offending prompt id instead of storing misaligned trajectories."""
    n = len(rows) * k
    if len(prompt_ids) != n or len(completions) != n:
        raise ValueError(
            f"collector.sample returned {len(prompt_ids)} prompt id lists and {len(completions)} "
            f"completions for {len(rows)} prompts x {k} samples (expected {n} each)"
        )
    if len(rewards) != n:
        raise ValueError(f"collector.score returned {len(rewards)} rewards for {n} completions")
    for i, row in enumerate(rows):
        for j in range(i * k, (i + 1) * k):
            if prompt_ids[j] != prompt_ids[i * k]:
                raise ValueError(f"prompt {row['id']!r}: its {k} prompt id lists differ")
            if not completions[j].ids:
                raise ValueError(f"prompt {row['id']!r}: sample {j - i * k} is empty")
            if not math.isfinite(rewards[j]):
                raise ValueError(f"prompt {row['id']!r}: sample {j - i * k} reward {rewards[j]}")
