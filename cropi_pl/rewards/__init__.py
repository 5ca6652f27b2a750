"""Reward functions: the contract user rewards implement, its failure guard, built-in verifiers."""

from cropi_pl.rewards.base import (
    RewardFunction,
    RewardOutcome,
    RewardTimeout,
    combine,
    deadline,
    safe_rewards,
)
from cropi_pl.rewards.math_answer import MathVerifyReward
from cropi_pl.rewards.numeric import ExactNumberReward, extract_answer

__all__ = [
    "ExactNumberReward",
    "MathVerifyReward",
    "RewardFunction",
    "RewardOutcome",
    "RewardTimeout",
    "combine",
    "deadline",
    "extract_answer",
    "safe_rewards",
]
