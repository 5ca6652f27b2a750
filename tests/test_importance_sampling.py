"""Engine-vs-trainer importance weights (TIS, masked and sequence variants) by explicit loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cropi_pl.cli import main as cli_main
from cropi_pl.generation import HFGenerateEngine
from cropi_pl.grpo.losses import (
    IMPORTANCE_SAMPLING_MODES,
    engine_importance_weights,
    policy_loss,
)
from cropi_pl.grpo.rollout import pack, token_logps
from tests.cli_utils import TINY, event_tags

B, T = 5, 6


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) < 0.75
    mask[0, :3] = True
    mask[4] = False  # an empty row
    trainer = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    # Differences of either sign, large enough to cross both bounds.
    engine = trainer + torch.randn(B, T, generator=gen, dtype=torch.float64) * 1.5
    engine[0, 0] = float("nan")  # a token the engine could not score
    engine[0, 1] = trainer[0, 1] + 2.0  # ratio e^-2 ~ 0.135: below clip_min
    engine[0, 2] = trainer[0, 2] - 2.0  # ratio e^2 ~ 7.4: above clip_max
    return trainer, engine, mask


def _weights_loop(trainer, engine, mask, mode, clip_min, clip_max) -> list[list[float]]:
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    out = []
    for b in range(B):
        diffs = []
        for t in range(T):
            d = trainer[b, t].item() - engine[b, t].item()
            diffs.append(0.0 if (math.isnan(d) or not mask[b, t]) else d)
        row = []
        for t in range(T):
            r = math.exp(sum(diffs) if mode.startswith("sequence") else diffs[t])
            if mode.endswith("truncate"):
                r = min(max(r, low), high)
            elif r < low or r > high:
                r = 0.0
            row.append(r if mask[b, t] else 0.0)
        out.append(row)
    return out


@pytest.mark.parametrize("mode", IMPORTANCE_SAMPLING_MODES)
@pytest.mark.parametrize(("clip_min", "clip_max"), [(None, 3.0), (0.5, 2.0), (0.2, None)])
def test_importance_weights_match_loop(mode: str, clip_min: float | None, clip_max) -> None:
    trainer, engine, mask = _inputs(0)
    got = engine_importance_weights(trainer, engine, mask, mode, clip_min, clip_max)
    expected = torch.tensor(_weights_loop(trainer, engine, mask, mode, clip_min, clip_max))
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got).all()
    if mode == "token_truncate" and clip_max is not None:
        assert got[0, 2].item() == pytest.approx(clip_max)  # the capped token is exercised


def test_importance_weights_reject_bad_input() -> None:
    trainer, engine, mask = _inputs(1)
    with pytest.raises(ValueError, match="mode"):
        engine_importance_weights(trainer, engine, mask, "token_clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_min"):
        engine_importance_weights(trainer, engine, mask, clip_min=3.0, clip_max=2.0)
    with pytest.raises(ValueError, match="engine_logp"):
        engine_importance_weights(trainer, engine[:, :-1], mask)


@pytest.mark.parametrize("loss_type", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_weighted_by_tis_matches_loop(loss_type: str) -> None:
    """Loss and gradient: the weight multiplies the clipped surrogate, not the KL term."""
    trainer, engine, mask = _inputs(2)
    gen = torch.Generator().manual_seed(3)
    old = trainer
    logp = (old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    weights = engine_importance_weights(old, engine, mask, "token_truncate", None, 2.0).double()
    kl_coef, clip = 0.1, 0.2
    num_tokens = float(mask.sum())
    out = policy_loss(
        logp,
        old,
        adv,
        mask,
        loss_type=loss_type,
        num_sequences=float(B),
        num_tokens=num_tokens,
        max_completion_length=T,
        clip_low=clip,
        clip_high=clip,
        ref_logp=ref,
        kl_coef=kl_coef,
        kl_estimator="k1",
        importance_weights=weights,
    )
    out.loss.backward()
    total, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        kept = [t for t in range(T) if mask[b, t]]
        norm = num_tokens if loss_type == "token-mean" else B * max(len(kept), 1)
        a = adv[b].item()
        for t in kept:
            lp, w = logp[b, t].item(), weights[b, t].item()
            r = math.exp(lp - old[b, t].item())
            clipped = min(max(r, 1 - clip), 1 + clip)
            active = (a > 0 and r > 1 + clip) or (a < 0 and r < 1 - clip)
            total += (w * -min(r * a, clipped * a) + kl_coef * (lp - ref[b, t].item())) / norm
            grad[b, t] = ((0.0 if active else -w * r * a) + kl_coef) / norm
    torch.testing.assert_close(out.loss.item(), total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad, grad, rtol=1e-12, atol=1e-12)
    # The weights were not all 1: this comparison would catch a loss that ignored them.
    assert (weights[mask] - 1).abs().max() > 0.5


class OffsetLogprobEngine(HFGenerateEngine):
    """HF sampling that reports the policy's own log-probs shifted by ``offset``: a stand-in for
    an engine whose numbers differ from the trainer's by a known amount."""

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset

    def generate(self, model, prompts, **kwargs):
        out = super().generate(model, prompts, **kwargs)
        rows = [p for p in prompts for _ in range(kwargs["num_samples"])]
        batch = pack(rows, [c.ids for c in out], kwargs["pad_token_id"])
        with torch.no_grad():
            logp, _ = token_logps(model, batch)
        for i, (p, c) in enumerate(zip(rows, out, strict=True)):
            c.logprobs = (logp[i, len(p) - 1 : len(p) - 1 + len(c.ids)] + self.offset).tolist()
        return out


def _fit(run_dir: Path, *args: str) -> dict[str, list[float]]:
    cli_main(
        [
            "fit",
            "--config",
            str(TINY),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            *args,
        ]
    )
    return event_tags(run_dir)


def test_module_aligns_engine_logprobs_and_applies_tis(tmp_path: Path):
    """Engine log-probs 0.5 below the trainer's: the logged gap is 0.5 and every token's
    truncated weight exp(0.5) (below the cap), which needs the packing to align tokens exactly."""
    tags = _fit(
        tmp_path / "run",
        f"--model.init_args.engine={__name__}.OffsetLogprobEngine",
        "--model.init_args.engine.offset=-0.5",
        "--model.init_args.vllm_importance_sampling_correction=true",
    )
    gap = "sampling/sampling_logp_difference"
    assert tags[f"{gap}/mean"] == pytest.approx([0.5, 0.5], abs=1e-4)
    assert tags[f"{gap}/max"] == pytest.approx([0.5, 0.5], abs=1e-4)
    ratio = tags["sampling/importance_sampling_ratio/mean"]
    assert ratio == pytest.approx([math.exp(0.5)] * 2, rel=1e-4)


def test_correction_without_engine_logprobs_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="needs an engine that reports"):
        _fit(tmp_path / "run", "--model.init_args.vllm_importance_sampling_correction=true")
