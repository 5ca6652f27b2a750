"""Token-level GRPO losses: log-probs, entropy, KL estimators, loss aggregation, clipped surrogate.

All normalisers in :func:`aggregate` are global (whole generation batch, all micro-batches and
ranks), so gradient accumulation over micro-batches reproduces the full-batch loss exactly instead
of averaging per-micro-batch means (which would re-weight sequences by micro-batch composition).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
ImportanceSamplingMode = Literal[
    "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
]
IMPORTANCE_SAMPLING_MODES: tuple[str, ...] = (
    "token_truncate",
    "token_mask",
    "sequence_truncate",
    "sequence_mask",
)
LossType = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_TYPES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _per_row(logits: Tensor, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Apply ``fn`` to one float32 ``(T, V)`` row at a time.

    Upcasting the whole ``(B, T, V)`` tensor at once would hold a float32 copy of every vocab
    distribution in the batch; row by row, peak extra memory is one sequence's worth.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (B, T, V), got shape {tuple(logits.shape)}")
    return torch.stack([fn(logits[b].float(), b) for b in range(logits.shape[0])])


def selective_log_softmax(logits: Tensor, ids: Tensor) -> Tensor:
    """``log softmax(logits)[ids]`` of shape ``(B, T)``, in float32, without a full log-softmax."""
    if ids.shape != logits.shape[:2]:
        raise ValueError(
            f"ids shape {tuple(ids.shape)} does not match logits (B, T) = {tuple(logits.shape[:2])}"
        )
    ids = ids.long()

    def row(lg: Tensor, b: int) -> Tensor:
        picked = lg.gather(-1, ids[b].unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(lg, dim=-1)

    return _per_row(logits, row)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` per token, shape ``(B, T)``, in float32."""

    def row(lg: Tensor, _b: int) -> Tensor:
        logp = torch.log_softmax(lg, dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)

    return _per_row(logits, row)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    k1 is unbiased but can be negative; k2 is biased, low variance; k3 ("low_var_kl") is unbiased
    and always >= 0.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"ref_logp shape {tuple(ref_logp.shape)} does not match logp {tuple(logp.shape)}"
        )
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator must be one of 'k1', 'k2', 'k3', got {estimator!r}")


def _check_mask(name: str, tensor: Tensor, mask: Tensor) -> None:
    if tensor.ndim != 2 or tensor.shape != mask.shape:
        raise ValueError(
            f"{name} must have shape (B, T) equal to mask {tuple(mask.shape)}, "
            f"got {tuple(tensor.shape)}"
        )


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_type: LossType,
    *,
    num_sequences: float,
    num_tokens: float,
    max_completion_length: int,
) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar with global normalisers.

    token-mean (DAPO) weights every token equally; seq-mean-token-mean (original GRPO) weights every
    sequence equally; seq-mean-token-sum-norm (Dr. GRPO) divides by a constant so longer responses
    are not down-weighted per token.
    """
    _check_mask("per_token", per_token, mask)
    for name, value in (
        ("num_sequences", num_sequences),
        ("num_tokens", num_tokens),
        ("max_completion_length", max_completion_length),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    keep = mask.bool()
    # masked_fill (not a product) so non-finite values at padded positions cannot leak in as NaN.
    masked = per_token.masked_fill(~keep, 0.0)
    if loss_type == "token-mean":
        return masked.sum() / num_tokens
    if loss_type == "seq-mean-token-mean":
        lengths = keep.sum(dim=1).clamp(min=1).to(masked.dtype)
        return (masked.sum(dim=1) / lengths).sum() / num_sequences
    if loss_type == "seq-mean-token-sum-norm":
        return masked.sum() / (num_sequences * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean over unmasked tokens of this micro-batch, detached (a logging statistic)."""
    values = values.detach()
    values = values.to(torch.promote_types(values.dtype, torch.float32)).masked_fill(~keep, 0.0)
    return values.sum() / keep.sum().clamp(min=1)


def engine_importance_weights(
    trainer_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    mode: ImportanceSamplingMode = "token_truncate",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """Per-token weights correcting for sampling with an engine whose numbers differ from ours.

    The engine (vLLM: other kernels, other precision) samples from pi_engine, the loss assumes
    pi_old (the trainer's log-probs of the same tokens); the ratio ``pi_old / pi_engine`` reweights
    each token. ``*_truncate`` clamps it to ``[clip_min, clip_max]`` (truncated importance sampling,
    TIS), ``*_mask`` zeroes it outside that range; ``sequence_*`` uses one ratio per sequence, the
    product over its tokens. Missing engine log-probs (NaN) count as no mismatch. The names follow
    TRL's ``vllm_importance_sampling_*`` options (verl calls the cap ``tis_imp_ratio_cap``).
    Returns a detached ``(B, T)`` tensor, 0 at masked positions.
    """
    _check_mask("trainer_logp", trainer_logp, mask)
    _check_mask("engine_logp", engine_logp, mask)
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(
            f"importance sampling mode must be one of {IMPORTANCE_SAMPLING_MODES}, got {mode!r}"
        )
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"clip_min ({clip_min}) must not exceed clip_max ({clip_max})")
    keep = mask.bool()
    diff = (trainer_logp.detach() - engine_logp.detach()).float()
    diff = torch.nan_to_num(diff, nan=0.0).masked_fill(~keep, 0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=1, keepdim=True).expand_as(diff)
    ratio = torch.exp(diff)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=low, max=high)
    else:
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    return ratio.masked_fill(~keep, 0.0)


@dataclass
class PolicyLossOutput:
    loss: Tensor
    clip_fraction_low: Tensor
    clip_fraction_high: Tensor
    kl: Tensor | None
    entropy: Tensor | None
    ratio_mean: Tensor


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType,
    num_sequences: float,
    num_tokens: float,
    max_completion_length: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    importance_weights: Tensor | None = None,
) -> PolicyLossOutput:
    """PPO-clipped GRPO surrogate with optional KL penalty and entropy bonus.

    Per token: ``-min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)`` with
    ``rho = exp(logp - old_logp)``; asymmetric bounds allow DAPO's clip-higher. Pass
    ``clip_high=math.inf`` and ``clip_low=1`` to disable clipping. ``kl`` and ``entropy`` in the
    output are reported whenever their inputs are given, even with a zero coefficient.
    ``importance_weights`` (detached, e.g. from :func:`engine_importance_weights`) multiply the
    clipped surrogate per token, before the KL and entropy terms are added (as TRL does).
    """
    _check_mask("logp", logp, mask)
    _check_mask("old_logp", old_logp, mask)
    if advantages.shape != (logp.shape[0],):
        raise ValueError(
            f"advantages must have shape (B,) = ({logp.shape[0]},), got {tuple(advantages.shape)}"
        )
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 requires ref_logp (reference policy log-probs)")
    if entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} > 0 requires per-token entropy")
    if ref_logp is not None:
        _check_mask("ref_logp", ref_logp, mask)
    if entropy is not None:
        _check_mask("entropy", entropy, mask)
    if importance_weights is not None:
        _check_mask("importance_weights", importance_weights, mask)

    keep = mask.bool()
    # Behaviour log-probs and advantages are constants of the objective: no gradient through them.
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach().to(per_token.dtype)

    kl = None
    if ref_logp is not None:
        kl_per_token = kl_estimate(logp, ref_logp.detach(), kl_estimator)
        kl = _masked_mean(kl_per_token, keep)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl_per_token
    entropy_mean = None
    if entropy is not None:
        entropy_mean = _masked_mean(entropy, keep)
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * entropy

    loss = aggregate(
        per_token,
        mask,
        loss_type,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_completion_length=max_completion_length,
    )
    return PolicyLossOutput(
        loss=loss,
        clip_fraction_low=_masked_mean((ratio < 1.0 - clip_low) & (adv < 0), keep),
        clip_fraction_high=_masked_mean((ratio > 1.0 + clip_high) & (adv > 0), keep),
        kl=kl,
        entropy=entropy_mean,
        ratio_mean=_masked_mean(ratio, keep),
    )
