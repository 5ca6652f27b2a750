"""The validation accuracy's 95% interval against numpy on random per-prompt accuracies."""

import numpy as np
import pytest
import torch

from cropi_pl.grpo.module import ci95_half_width


@pytest.mark.parametrize("n", [2, 7, 300])
def test_half_width_from_moments_matches_the_sample_standard_error(n):
    rng = np.random.default_rng()
    k = int(rng.integers(1, 9))
    accuracies = rng.binomial(k, rng.uniform(size=n)) / k  # mean of k samples per prompt
    x = torch.tensor(accuracies, dtype=torch.float64)
    got = ci95_half_width(x.mean(), (x**2).mean(), torch.tensor(float(n), dtype=torch.float64))
    expected = 1.96 * accuracies.std(ddof=1) / np.sqrt(n)
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_identical_prompts_give_zero_width_and_one_prompt_no_nan():
    half = ci95_half_width(torch.tensor(0.5), torch.tensor(0.25), torch.tensor(40.0))
    assert half.item() == 0.0
    one = ci95_half_width(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
    assert torch.isfinite(one) and one.item() == 0.0
