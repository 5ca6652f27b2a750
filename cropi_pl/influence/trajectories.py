"""Stored trajectories of the behaviour policy, as the POPI gradient pass takes them.

The offline cache (:mod:`cropi_pl.influence.cache`) stores K responses per prompt sampled once from
beta (:mod:`cropi_pl.influence.collector`); this module holds the in-memory form of one prompt's
responses and the helpers every consumer (gradients, selectors, resampling) shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class PromptTrajectories:
    """The K stored responses of one prompt, with beta's per-token log-probs and the rewards."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    behaviour_logps: list[list[float]]
    rewards: list[float]


def zero_mask(trajs: Sequence[PromptTrajectories]) -> list[bool]:
    """True for prompts whose K rewards are all equal: every advantage, hence the gradient, is 0.

    It needs the cached rewards only, so callers skip those prompts before any forward pass."""
    return [len(set(t.rewards)) <= 1 for t in trajs]


def pass_rate(rewards: Sequence[float]) -> float:
    """Fraction of a prompt's stored rewards that count as correct (>= 0.5)."""
    return sum(r >= 0.5 for r in rewards) / len(rewards)


def trajectories_from_columns(
    columns: dict[str, list],
) -> tuple[list[str], list[PromptTrajectories]]:
    """(prompt ids, trajectories) from shard columns (``FEATURES``), in row order."""
    fields = ("prompt_ids", "completion_ids", "behaviour_logps", "rewards")
    trajs = [
        PromptTrajectories(**dict(zip(fields, values, strict=True)))
        for values in zip(*(columns[f] for f in fields), strict=True)
    ]
    return list(columns["id"]), trajs
