"""GRPO token losses against explicit loops over sequences and tokens in float64."""

from __future__ import annotations

import math

import pytest
import torch

from cropi_pl.grpo.losses import (
    LOSS_TYPES,
    aggregate,
    kl_estimate,
    policy_loss,
    selective_log_softmax,
    token_entropy,
)

B, T, V, MAX_LEN = 6, 7, 11, 9


def _log_softmax_loop(logits: torch.Tensor) -> list[list[list[float]]]:
    out = []
    for row in logits.double().tolist():
        out_row = []
        for tok in row:
            top = max(tok)
            log_z = top + math.log(sum(math.exp(v - top) for v in tok))
            out_row.append([v - log_z for v in tok])
        out.append(out_row)
    return out


def _mask(gen: torch.Generator) -> torch.Tensor:
    """Random token mask with one empty row, so the length clamp is exercised."""
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[2] = False
    mask[0, 0] = True
    return mask


def _aggregate_loop(per_token, mask, loss_type, num_sequences, num_tokens, max_len) -> float:
    total = 0.0
    for values, keep in zip(per_token.tolist(), mask.tolist(), strict=True):
        row = sum(v for v, k in zip(values, keep, strict=True) if k)
        total += row / max(sum(keep), 1) if loss_type == "seq-mean-token-mean" else row
    if loss_type == "token-mean":
        return total / num_tokens
    if loss_type == "seq-mean-token-mean":
        return total / num_sequences
    return total / (num_sequences * max_len)


def _kl_loop(logp: float, ref: float, estimator: str) -> float:
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    return math.exp(ref - logp) - (ref - logp) - 1


def _masked_mean_loop(values: torch.Tensor, mask: torch.Tensor) -> float:
    kept = [
        v
        for vr, kr in zip(values.tolist(), mask.tolist(), strict=True)
        for v, k in zip(vr, kr, strict=True)
        if k
    ]
    return sum(kept) / len(kept)


def test_selective_log_softmax_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 4
    ids = torch.randint(0, V, (B, T), generator=gen)
    ref = _log_softmax_loop(logits)
    expected = torch.tensor(
        [[ref[b][t][ids[b, t]] for t in range(T)] for b in range(B)], dtype=torch.float64
    )
    got = selective_log_softmax(logits, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_selective_log_softmax_upcasts_low_precision_and_backprops() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, T, V, generator=gen) * 4).bfloat16().requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=gen)
    got = selective_log_softmax(logits, ids)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(logits.detach().float(), -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    # d/dlogits sum_t log p(id_t) = onehot(id_t) - softmax: each (b, t) gradient row sums to 0.
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad.float().sum(-1), torch.zeros(B, T), rtol=0, atol=2e-2)


def test_token_entropy_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 3
    ref = _log_softmax_loop(logits)
    expected = torch.tensor(
        [[-sum(math.exp(lp) * lp for lp in ref[b][t]) for t in range(T)] for b in range(B)],
        dtype=torch.float64,
    )
    got = token_entropy(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # Uniform logits reach the maximum entropy log V.
    torch.testing.assert_close(token_entropy(torch.zeros(1, 2, V)), torch.full((1, 2), math.log(V)))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(estimator: str) -> None:
    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 5
    ref = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 5
    expected = torch.tensor(
        [
            [_kl_loop(a, r, estimator) for a, r in zip(lr, rr, strict=True)]
            for lr, rr in zip(logp.tolist(), ref.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(kl_estimate(logp, ref, estimator), expected, rtol=1e-12, atol=1e-12)


def test_k3_is_nonnegative_and_zero_at_equality() -> None:
    gen = torch.Generator().manual_seed(4)
    logp = torch.randn(1000, generator=gen) * 5
    ref = torch.randn(1000, generator=gen) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, logp, "k3") == 0).all()


def test_kl_estimators_approximate_true_kl_by_sampling() -> None:
    gen = torch.Generator().manual_seed(5)
    p_logits = torch.randn(5, generator=gen, dtype=torch.float64)
    log_p = torch.log_softmax(p_logits, 0)
    log_q = torch.log_softmax(
        p_logits + 0.3 * torch.randn(5, generator=gen, dtype=torch.float64), 0
    )
    true_kl = (log_p.exp() * (log_p - log_q)).sum().item()
    n = 200_000
    samples = torch.multinomial(log_p.exp(), n, replacement=True, generator=gen)
    for estimator in ("k1", "k3"):  # unbiased: within 5 standard errors
        values = kl_estimate(log_p[samples], log_q[samples], estimator)
        assert abs(values.mean().item() - true_kl) < 5 * values.std().item() / math.sqrt(n)
    # k2 is biased (third-order term), but close for nearby distributions.
    k2 = kl_estimate(log_p[samples], log_q[samples], "k2").mean().item()
    assert k2 == pytest.approx(true_kl, rel=0.15)


def test_kl_estimate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(2, 3), "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ref_logp shape"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_matches_loop_and_ignores_padding(loss_type: str) -> None:
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        mask = _mask(gen)
        per_token = torch.randn(B, T, generator=gen, dtype=torch.float64)
        per_token[~mask] = float("nan")  # garbage at padded positions must not leak in
        norms = dict(num_sequences=B * 1.5, num_tokens=float(mask.sum()) + 3.0)
        expected = _aggregate_loop(per_token, mask, loss_type, max_len=MAX_LEN, **norms)
        got = aggregate(per_token, mask, loss_type, max_completion_length=MAX_LEN, **norms)
        torch.testing.assert_close(got.item(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_is_additive_over_micro_batches(loss_type: str) -> None:
    gen = torch.Generator().manual_seed(7)
    mask = _mask(gen)
    per_token = torch.randn(B, T, generator=gen, dtype=torch.float64)
    kwargs = dict(
        num_sequences=float(B), num_tokens=float(mask.sum()), max_completion_length=MAX_LEN
    )
    full = aggregate(per_token, mask, loss_type, **kwargs)
    split = 2
    parts = aggregate(per_token[:split], mask[:split], loss_type, **kwargs) + aggregate(
        per_token[split:], mask[split:], loss_type, **kwargs
    )
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)


def test_aggregate_rejects_bad_input() -> None:
    mask = torch.ones(2, 3, dtype=torch.bool)
    kwargs = dict(num_sequences=2.0, num_tokens=6.0, max_completion_length=3)
    with pytest.raises(ValueError, match="per_token"):
        aggregate(torch.zeros(2, 4), mask, "token-mean", **kwargs)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(torch.zeros(2, 3), mask, "sum", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(torch.zeros(2, 3), mask, "token-mean", **{**kwargs, "num_tokens": 0.0})


def _surrogate_loop(ratio: float, adv: float, clip_low: float, clip_high: float) -> float:
    clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
    return -min(ratio * adv, clipped * adv)


@pytest.mark.parametrize(("clip_low", "clip_high"), [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_surrogate_value_gradient_and_fractions(clip_low: float, clip_high: float) -> None:
    gen = torch.Generator().manual_seed(8)
    mask = _mask(gen)
    ratios = 0.5 + torch.rand(B, T, generator=gen, dtype=torch.float64)  # band and both sides
    ratios[0, :4] = torch.tensor(
        [1 - clip_low - 0.01, 1 + clip_high - 0.01, 1.0, 1 + clip_high + 0.01]
    )
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    adv[0], adv[1] = 1.3, -0.7
    old_logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = (old_logp + ratios.log()).requires_grad_()
    num_tokens = float(mask.sum())
    out = policy_loss(
        logp,
        old_logp,
        adv,
        mask,
        loss_type="token-mean",
        num_sequences=float(B),
        num_tokens=num_tokens,
        max_completion_length=MAX_LEN,
        clip_low=clip_low,
        clip_high=clip_high,
    )
    out.loss.backward()

    total, expected_grad, n_low, n_high = 0.0, torch.zeros(B, T, dtype=torch.float64), 0, 0
    for b in range(B):
        a = adv[b].item()
        for t in range(T):
            if not mask[b, t]:
                continue
            r = ratios[b, t].item()
            total += _surrogate_loop(r, a, clip_low, clip_high)
            low, high = a < 0 and r < 1 - clip_low, a > 0 and r > 1 + clip_high
            n_low, n_high = n_low + low, n_high + high
            # d(-r * A)/dlogp = -r * A where the clip is inactive; zero where it is active.
            expected_grad[b, t] = 0.0 if (low or high) else -r * a / num_tokens
    assert n_low > 0 and n_high > 0, "test data must exercise both clip sides"
    torch.testing.assert_close(out.loss.item(), total / num_tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad, expected_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.clip_fraction_low.item(), n_low / num_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        out.clip_fraction_high.item(), n_high / num_tokens, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        out.ratio_mean.item(), _masked_mean_loop(ratios, mask), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_policy_loss_with_kl_and_entropy_matches_loop(loss_type: str, estimator: str) -> None:
    gen = torch.Generator().manual_seed(9)
    mask = _mask(gen)
    old_logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = old_logp + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref_logp = old_logp + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    kl_coef, entropy_coef, clip_low, clip_high = 0.05, 0.01, 0.2, 0.28
    norms = dict(num_sequences=float(B), num_tokens=float(mask.sum()))
    out = policy_loss(
        logp,
        old_logp,
        adv,
        mask,
        loss_type=loss_type,
        max_completion_length=MAX_LEN,
        clip_low=clip_low,
        clip_high=clip_high,
        ref_logp=ref_logp,
        kl_coef=kl_coef,
        kl_estimator=estimator,
        entropy=entropy,
        entropy_coef=entropy_coef,
        **norms,
    )
    per_token = torch.zeros(B, T, dtype=torch.float64)
    kl = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            lp, old, ref = logp[b, t].item(), old_logp[b, t].item(), ref_logp[b, t].item()
            kl[b, t] = _kl_loop(lp, ref, estimator)
            per_token[b, t] = (
                _surrogate_loop(math.exp(lp - old), adv[b].item(), clip_low, clip_high)
                + kl_coef * kl[b, t]
                - entropy_coef * entropy[b, t]
            )
    expected = _aggregate_loop(per_token, mask, loss_type, max_len=MAX_LEN, **norms)
    torch.testing.assert_close(out.loss.item(), expected, rtol=1e-12, atol=1e-12)
    assert out.kl is not None and out.entropy is not None
    torch.testing.assert_close(out.kl.item(), _masked_mean_loop(kl, mask), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        out.entropy.item(), _masked_mean_loop(entropy, mask), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_on_policy_equals_negative_aggregated_advantage(loss_type: str) -> None:
    gen = torch.Generator().manual_seed(10)
    mask = _mask(gen)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    kwargs = dict(
        num_sequences=float(B), num_tokens=float(mask.sum()), max_completion_length=MAX_LEN
    )
    out = policy_loss(logp, logp.clone(), adv, mask, loss_type=loss_type, **kwargs)
    expected = -aggregate(adv[:, None].expand(B, T), mask, loss_type, **kwargs)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    assert out.clip_fraction_low.item() == 0 and out.clip_fraction_high.item() == 0
    assert out.ratio_mean.item() == pytest.approx(1.0)
    assert out.kl is None and out.entropy is None


def test_policy_loss_rejects_bad_input() -> None:
    logp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2)
    kwargs = dict(
        loss_type="token-mean", num_sequences=2.0, num_tokens=6.0, max_completion_length=3
    )
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp, torch.zeros(2, 1), mask, **kwargs)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, torch.zeros(2, 4), adv, mask, **kwargs)
    with pytest.raises(ValueError, match="logp"):
        policy_loss(logp, logp, adv, torch.ones(3, 3, dtype=torch.bool), **kwargs)
    with pytest.raises(ValueError, match="requires ref_logp"):
        policy_loss(logp, logp, adv, mask, kl_coef=0.1, **kwargs)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, adv, mask, ref_logp=torch.zeros(2, 4), kl_coef=0.1, **kwargs)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp, adv, mask, entropy_coef=0.1, **kwargs)
    with pytest.raises(ValueError, match="clip"):
        policy_loss(logp, logp, adv, mask, clip_low=-0.1, **kwargs)


def test_log_prob_helpers_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="ids shape"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_entropy(torch.zeros(3, 5))
