"""Group-relative advantages: each response is judged against the other responses to its prompt.

GRPO replaces a learned value baseline with the mean reward of the G responses sampled for the same
prompt; the optional division by a standard deviation is what distinguishes GRPO ("group"),
batch-normalised variants ("batch") and Dr. GRPO ("none", which removes the difficulty bias that
per-group scaling introduces).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]


def _check_rewards(rewards: Tensor) -> None:
    if rewards.ndim != 2:
        raise ValueError(
            f"rewards must have shape (num_prompts, G), got shape {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")


def group_advantages(
    rewards: Tensor, scale_rewards: ScaleRewards = "group", eps: float = 1e-4
) -> Tensor:
    """Advantages ``(r - mean_group(r)) / (std + eps)`` of shape ``(num_prompts, G)``.

    The std is unbiased (as in the paper's ``A_i`` and the reference code), so G must be >= 2. A
    group whose rewards are all equal gets exactly zero advantages: it carries no learning signal.
    """
    _check_rewards(rewards)
    num_generations = rewards.shape[1]
    if num_generations < 2:
        raise ValueError(
            f"group_advantages needs at least 2 responses per prompt (G={num_generations}): "
            "the unbiased group std is undefined for G=1"
        )
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        return centered / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    if scale_rewards == "batch":
        return centered / (rewards.std(unbiased=True) + eps)
    if scale_rewards == "none":
        return centered
    raise ValueError(
        f"scale_rewards must be one of 'group', 'batch', 'none', got {scale_rewards!r}"
    )


def zero_std_fraction(rewards: Tensor) -> float:
    """Fraction of prompts whose G rewards are all equal: too easy or too hard to learn from."""
    _check_rewards(rewards)
    if rewards.shape[0] == 0:
        raise ValueError("zero_std_fraction needs at least one prompt (rewards has 0 rows)")
    all_equal = (rewards == rewards[:, :1]).all(dim=1)
    return all_equal.float().mean().item()
