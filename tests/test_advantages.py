"""Group advantages and zero-std fraction against explicit per-group loops in float64."""

from __future__ import annotations

import math

import pytest
import torch

from cropi_pl.grpo.advantages import group_advantages, zero_std_fraction

EPS = 1e-4


def _unbiased_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _reference(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    rows = rewards.tolist()
    batch_std = _unbiased_std([v for row in rows for v in row])
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        denom = {"group": _unbiased_std(row) + EPS, "batch": batch_std + EPS, "none": 1.0}[scale]
        out.append([(v - mean) / denom for v in row])
    return torch.tensor(out, dtype=torch.float64)


def _rewards(gen: torch.Generator) -> torch.Tensor:
    """Mixed batch: binary groups (the verifier case), continuous groups, and all-equal groups."""
    binary = torch.randint(0, 2, (5, 8), generator=gen).double()
    continuous = torch.rand(4, 8, generator=gen, dtype=torch.float64) * 3 - 1
    equal = torch.full((2, 8), 1.0, dtype=torch.float64)
    equal[1] = 0.0
    return torch.cat([binary, continuous, equal])[torch.randperm(11, generator=gen)]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loops(scale: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        rewards = _rewards(gen)
        got = group_advantages(rewards, scale, eps=EPS)
        torch.testing.assert_close(got, _reference(rewards, scale), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_group_has_exactly_zero_advantage(scale: str) -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.5] * 4])
    adv = group_advantages(rewards, scale)
    assert torch.isfinite(adv).all()
    assert (adv[0] == 0).all() and (adv[2] == 0).all()
    assert (adv[1] != 0).all()


def test_group_scaling_uses_unbiased_std() -> None:
    # Rewards (0, 1): unbiased std = sqrt(0.5), biased std = 0.5.
    adv = group_advantages(torch.tensor([[0.0, 1.0]], dtype=torch.float64), "group", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 0.5]], dtype=torch.float64) / 0.5**0.5)


def test_group_and_batch_scaling_differ() -> None:
    rewards = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 10.0, 0.0, 10.0]])
    assert not torch.allclose(
        group_advantages(rewards, "group"), group_advantages(rewards, "batch")
    )


def test_group_advantages_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(8))
    with pytest.raises(TypeError, match="floating"):
        group_advantages(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.rand(2, 4), "std")  # type: ignore[arg-type]


def test_zero_std_fraction_matches_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        rewards = _rewards(gen)
        expected = sum(len(set(row)) == 1 for row in rewards.tolist()) / rewards.shape[0]
        assert zero_std_fraction(rewards) == pytest.approx(expected, abs=1e-7)
    assert zero_std_fraction(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])) == pytest.approx(
        2 / 3
    )


def _reference_with_unscorable(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """Loops over each group's scorable (non-NaN) rewards; unscorable ones get 0, and so does a
    group with fewer than 2 scorable rewards (its std is undefined, its centred values 0)."""
    rows = rewards.tolist()
    kept_all = [v for row in rows for v in row if not math.isnan(v)]
    batch_std = _unbiased_std(kept_all) if len(kept_all) > 1 else 0.0
    out = []
    for row in rows:
        kept = [v for v in row if not math.isnan(v)]
        mean = sum(kept) / len(kept) if kept else 0.0
        group_std = _unbiased_std(kept) if len(kept) > 1 else 0.0
        denom = {"group": group_std + EPS, "batch": batch_std + EPS, "none": 1.0}[scale]
        out.append([0.0 if math.isnan(v) else (v - mean) / denom for v in row])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscorable_completions_are_left_out_and_get_zero(scale: str) -> None:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for _ in range(3):
        rewards = _rewards(gen)
        rewards[torch.rand(rewards.shape, generator=gen, dtype=torch.float64) < 0.3] = math.nan
        rewards[0, :] = math.nan  # a group nobody could score
        rewards[1, 1:] = math.nan  # a group with a single scorable completion
        got = group_advantages(rewards, scale, eps=EPS)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(
            got, _reference_with_unscorable(rewards, scale), rtol=1e-10, atol=1e-12
        )
        assert (got[0] == 0).all() and (got[1] == 0).all()
        expected_zero = (
            sum(len({v for v in row if not math.isnan(v)}) <= 1 for row in rewards.tolist())
            / rewards.shape[0]
        )
        assert zero_std_fraction(rewards) == pytest.approx(expected_zero, abs=1e-7)
