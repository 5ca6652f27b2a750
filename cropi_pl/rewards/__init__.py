"""Reward functions: the contract user rewards implement, its failure guard, built-in verifiers."""

from cropi_pl.rewards.base import (
    RewardCallable,
    RewardFunction,
    RewardOutcome,
    RewardTimeout,
    call_reward,
    combine,
    deadline,
    reward_name,
    safe_rewards,
)
from cropi_pl.rewards.math_answer import MathVerifyReward
from cropi_pl.rewards.numeric import ExactNumberReward, extract_answer

__all__ = [
    "ExactNumberReward",
    "MathVerifyReward",
    "RewardCallable",
    "RewardFunction",
    "RewardOutcome",
    "RewardTimeout",
    "call_reward",
    "combine",
    "deadline",
    "extract_answer",
    "reward_name",
    "safe_rewards",
]
