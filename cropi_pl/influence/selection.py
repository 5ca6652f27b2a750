"""Cosine scores and the selectors of one curriculum stage (docs/method.md 5-6).

Influence selection scores each pool prompt by the cosine between its projected gradient and the
mean projected gradient of each target (validation) set (``InfluenceScorer.project_mean``), then
merges the per-set rankings. The baselines (random, pass rate, learnability, full data) sit behind
the same ``Selector`` interface so the curriculum can swap them with one argument. Every ranking
breaks ties by the lower pool index, so a selection is a pure function of its inputs and seed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from cropi_pl.atomic import atomic_file

__all__ = [
    "FullSelector",
    "InfluenceSelector",
    "LearnabilitySelector",
    "PassRateSelector",
    "RandomSelector",
    "Selection",
    "SelectionContext",
    "Selector",
    "cosine_scores",
    "max_merge",
    "reciprocal_rank_merge",
    "selection_size",
]


def cosine_scores(pool: torch.Tensor, target: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """Cosine ``(N,)`` float32 of each pool vector with ``target``, computed in float64.

    The pool is read ``rows`` rows at a time, so no float64 copy of the whole (N, k) matrix is
    ever made (at the paper's scale, 50k prompts at k = 32768, that copy alone would be 13 GB).
    A zero pool vector scores 0 (not NaN); callers exclude such prompts with an ``eligible``
    mask."""
    if pool.dim() != 2 or target.shape != (pool.shape[1],):
        raise ValueError(
            f"cosine_scores: expected pool (N, k) and target (k,), got {tuple(pool.shape)} "
            f"and {tuple(target.shape)}"
        )
    target64 = target.double()
    target_norm = target64.norm()
    if not torch.isfinite(target_norm) or target_norm == 0:
        raise ValueError(f"cosine_scores: target vector has norm {target_norm.item()}")
    scores = torch.empty(pool.shape[0], dtype=torch.float32, device=pool.device)
    for start in range(0, pool.shape[0], rows):
        chunk = pool[start : start + rows]
        bad = (~torch.isfinite(chunk)).any(dim=1).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"cosine_scores: pool row {start + bad[0].item()} has non-finite values"
            )
        chunk64 = chunk.double()
        norms = chunk64.norm(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        dots = chunk64 @ target64
        scores[start : start + rows] = torch.where(norms > 0, dots / (safe * target_norm), 0.0)
    return scores


def _check_scores(scores: dict[str, torch.Tensor], eligible: torch.Tensor, n: int) -> None:
    if not scores:
        raise ValueError("selection: no target score sets given")
    if n < 1:
        raise ValueError(f"selection: n must be >= 1, got {n}")
    if eligible.dim() != 1 or eligible.dtype != torch.bool:
        raise ValueError(f"selection: eligible must be a 1-D bool mask, got {eligible.dtype}")
    for name, values in scores.items():
        if values.shape != eligible.shape:
            raise ValueError(
                f"selection: scores[{name!r}] has shape {tuple(values.shape)}, "
                f"expected {tuple(eligible.shape)}"
            )


def _top_n(values: torch.Tensor, eligible: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest eligible ``values``, best first, ties by lower index."""
    candidates = torch.nonzero(eligible.cpu()).flatten()
    chosen = values.detach().cpu()[candidates]
    if torch.isnan(chosen).any():
        row = candidates[torch.isnan(chosen)][0].item()
        raise ValueError(f"selection: score of eligible row {row} is NaN")
    order = torch.argsort(chosen, descending=True, stable=True)
    return candidates[order[:n]]


def reciprocal_rank_merge(
    scores: dict[str, torch.Tensor], eligible: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-target-set rankings: ``score(s) = sum_v 1/rank_v(s)`` over the sets whose top ``n``
    (eligible only) contains ``s``; keep the top ``n`` by merged score, ties by best single rank,
    then by index. Returns indices best first and their merged scores (float64). Sums are exact
    fractions so that equal merged scores are true ties."""
    _check_scores(scores, eligible, n)
    ranks: dict[int, list[int]] = {}
    for values in scores.values():
        for rank, index in enumerate(_top_n(values, eligible, n).tolist(), start=1):
            ranks.setdefault(index, []).append(rank)
    merged = {index: sum(Fraction(1, r) for r in rs) for index, rs in ranks.items()}
    order = sorted(ranks, key=lambda i: (-merged[i], min(ranks[i]), i))[:n]
    return (
        torch.tensor(order, dtype=torch.long),
        torch.tensor([float(merged[i]) for i in order], dtype=torch.float64),
    )


def max_merge(
    scores: dict[str, torch.Tensor], eligible: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``n`` eligible prompts by their maximum cosine over target sets (ties by index);
    returns indices best first and that maximum (float64)."""
    _check_scores(scores, eligible, n)
    best = torch.stack([v.detach().cpu().double() for v in scores.values()]).amax(dim=0)
    indices = _top_n(best, eligible, n)
    return indices, best[indices]


@dataclass
class SelectionContext:
    """What a selector may look at for one stage; each selector checks the fields it needs."""

    ids: list[str]
    pass_rate: torch.Tensor | None = None
    scores: dict[str, torch.Tensor] | None = None
    eligible: torch.Tensor | None = None
    seed: int = 0
    stage: int = 0

    def __post_init__(self) -> None:
        size = (len(self.ids),)
        named = {"pass_rate": self.pass_rate, "eligible": self.eligible}
        named.update({f"scores[{k!r}]": v for k, v in (self.scores or {}).items()})
        for name, value in named.items():
            if value is not None and tuple(value.shape) != size:
                raise ValueError(
                    f"SelectionContext.{name} has shape {tuple(value.shape)}, expected {size}"
                )
        if self.eligible is not None and self.eligible.dtype != torch.bool:
            raise ValueError(f"SelectionContext.eligible must be bool, got {self.eligible.dtype}")
        if self.pass_rate is not None:
            outside = ~((self.pass_rate >= 0) & (self.pass_rate <= 1))
            if outside.any():
                row = outside.nonzero().flatten()[0].item()
                raise ValueError(
                    f"SelectionContext.pass_rate[{row}] = {self.pass_rate[row].item()} "
                    "is not in [0, 1]"
                )

    def require(self, field: str, selector: str) -> Any:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"{selector} selector needs SelectionContext.{field}, which is None")
        return value

    def generator(self) -> torch.Generator:
        """Stage-dependent stream, so random baselines draw a fresh subset every stage."""
        return torch.Generator().manual_seed(self.seed + self.stage)


@dataclass
class Selection:
    """The prompts chosen for one stage, best first, with the score each selector ranked by."""

    ids: list[str]
    indices: list[int]
    scores: list[float]
    method: str
    stage: int

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.indices) == len(self.scores):
            raise ValueError(
                f"Selection: {len(self.ids)} ids, {len(self.indices)} indices and "
                f"{len(self.scores)} scores differ in length"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Selection:
        data = json.loads(text)
        missing = [k for k in ("ids", "indices", "scores", "method", "stage") if k not in data]
        if missing:
            raise ValueError(f"Selection JSON lacks key(s) {missing}")
        return cls(
            ids=[str(i) for i in data["ids"]],
            indices=[int(i) for i in data["indices"]],
            scores=[float(s) for s in data["scores"]],
            method=str(data["method"]),
            stage=int(data["stage"]),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Selection:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Selection.load: no selection file at {path}")
        try:
            return cls.from_json(Path(path).read_text())
        except (ValueError, TypeError) as err:
            raise ValueError(f"Selection.load: {path} is not a valid selection: {err}") from err


def _selection(
    ctx: SelectionContext, indices: list[int], scores: list[float], method: str
) -> Selection:
    return Selection(
        ids=[ctx.ids[i] for i in indices],
        indices=indices,
        scores=[float(s) for s in scores],
        method=method,
        stage=ctx.stage,
    )


def _check_n(n: int, selector: str) -> None:
    if n < 1:
        raise ValueError(f"{selector} selector: n must be >= 1, got {n}")


class Selector(Protocol):
    name: str

    def select(self, ctx: SelectionContext, n: int) -> Selection: ...


class InfluenceSelector:
    """CROPI: top ``n`` eligible prompts by cosine to the target gradients, merged over sets."""

    def __init__(self, merge: Literal["rrf", "max"] = "rrf") -> None:
        if merge not in ("rrf", "max"):
            raise ValueError(f"InfluenceSelector: merge must be 'rrf' or 'max', got {merge!r}")
        self.merge = merge
        self.name = f"influence_{merge}"

    def select(self, ctx: SelectionContext, n: int) -> Selection:
        scores = ctx.require("scores", self.name)
        eligible = ctx.require("eligible", self.name)
        merge = reciprocal_rank_merge if self.merge == "rrf" else max_merge
        indices, merged = merge(scores, eligible, n)
        return _selection(ctx, indices.tolist(), merged.tolist(), self.name)


class RandomSelector:
    """Uniform random subset of ``n`` prompts, redrawn at every stage (seed + stage); score 0."""

    name = "random"

    def select(self, ctx: SelectionContext, n: int) -> Selection:
        _check_n(n, self.name)
        indices = torch.randperm(len(ctx.ids), generator=ctx.generator())[:n].tolist()
        return _selection(ctx, indices, [0.0] * len(indices), self.name)


class PassRateSelector:
    """Prompts the behaviour policy sometimes solves (0 < p < 1), in seeded random order.

    If fewer than ``n`` such prompts exist, all of them are returned and nothing else is added: the
    baseline's definition is the filter, not the size. Score = pass rate."""

    name = "pass_rate"

    def select(self, ctx: SelectionContext, n: int) -> Selection:
        _check_n(n, self.name)
        rate = ctx.require("pass_rate", self.name).detach().cpu()
        candidates = torch.nonzero((rate > 0) & (rate < 1)).flatten()
        order = torch.randperm(candidates.numel(), generator=ctx.generator())
        indices = candidates[order[:n]].tolist()
        return _selection(ctx, indices, rate[indices].tolist(), self.name)


class LearnabilitySelector:
    """Top ``n`` by p(1-p), the variance of a prompt's reward; ties by index.

    Scores are rounded to 1e-6 first: pass rates are k/K fractions, often stored in float32, so p
    and 1-p (e.g. 0.8 and 0.2) give products that differ by round-off alone and must still tie.
    Distinct k/K values stay apart for any K below 1000."""

    name = "learnability"

    def select(self, ctx: SelectionContext, n: int) -> Selection:
        _check_n(n, self.name)
        rate = ctx.require("pass_rate", self.name).detach().cpu().double()
        learnability = torch.round(rate * (1 - rate), decimals=6)
        indices = _top_n(learnability, torch.ones_like(rate, dtype=torch.bool), n).tolist()
        return _selection(ctx, indices, learnability[indices].tolist(), self.name)


class FullSelector:
    """The whole pool (full-data baseline); ``n`` is ignored. Score 0."""

    name = "full"

    def select(self, ctx: SelectionContext, n: int) -> Selection:
        indices = list(range(len(ctx.ids)))
        return _selection(ctx, indices, [0.0] * len(indices), self.name)


def selection_size(pool_size: int, ratio: float) -> int:
    """``N = max(1, round(ratio * pool_size))`` (half rounds up), never more than the pool."""
    if pool_size < 1:
        raise ValueError(f"selection_size: pool_size must be >= 1, got {pool_size}")
    if not 0 < ratio <= 1:
        raise ValueError(f"selection_size: ratio must be in (0, 1], got {ratio}")
    return min(pool_size, max(1, math.floor(ratio * pool_size + 0.5)))
