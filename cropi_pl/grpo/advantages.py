"""Group-relative advantages: each response is judged against the other responses to its prompt.

GRPO replaces a learned value baseline with the mean reward of the G responses sampled for the same
prompt; the optional division by a standard deviation is what distinguishes GRPO ("group"),
batch-normalised variants ("batch") and Dr. GRPO ("none", which removes the difficulty bias that
per-group scaling introduces).
"""

from __future__ import annotations

from typing import Literal

import torch
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
    NaN marks an unscorable completion (every reward function returned None): it is left out of
    its group's mean and std (and of the batch std) and gets advantage 0, as in TRL.
    """
    _check_rewards(rewards)
    num_generations = rewards.shape[1]
    if num_generations < 2:
        raise ValueError(
            f"group_advantages needs at least 2 responses per prompt (G={num_generations}): "
            "the unbiased group std is undefined for G=1"
        )
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(
            f"scale_rewards must be one of 'group', 'batch', 'none', got {scale_rewards!r}"
        )
    keep = ~rewards.isnan()
    zero = rewards.new_zeros(())
    count = keep.sum(dim=1, keepdim=True)
    mean = torch.where(keep, rewards, zero).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(keep, rewards - mean, zero)
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = _unbiased_std(centered, count)
    else:
        total = keep.sum()
        batch_mean = torch.where(keep, rewards, zero).sum() / total.clamp(min=1)
        std = _unbiased_std(torch.where(keep, rewards - batch_mean, zero).flatten(), total)
    return centered / (std + eps)


def _unbiased_std(centered: Tensor, count: Tensor) -> Tensor:
    """sqrt(sum(centered^2) / (count - 1)) over the last dim; 0 where count < 2 (then every
    centered value is 0 as well, so the advantage is 0)."""
    squares = centered.square().sum(dim=-1, keepdim=centered.ndim > 1)
    return (squares / (count - 1).clamp(min=1)).sqrt()


def zero_std_fraction(rewards: Tensor) -> float:
    """Fraction of prompts whose G rewards are all equal: too easy or too hard to learn from.

    Unscorable (NaN) completions are ignored; a group with fewer than two scorable ones counts.
    """
    _check_rewards(rewards)
    if rewards.shape[0] == 0:
        raise ValueError("zero_std_fraction needs at least one prompt (rewards has 0 rows)")
    keep = ~rewards.isnan()
    lowest = torch.where(keep, rewards, torch.inf).amin(dim=1)
    highest = torch.where(keep, rewards, -torch.inf).amax(dim=1)
    return (highest <= lowest).float().mean().item()
