"""Re-sampling stale trajectories from the current policy (beyond the paper; off by default).

POPI reweights responses sampled once from the initial policy beta, and two kinds of pool prompts
go stale as the policy moves. A prompt whose K cached rewards are all equal has a zero gradient
at every stage, so the paper can never select it again, even once the policy solves it sometimes.
A prompt whose importance ratios pi_theta / beta have collapsed onto a few responses (low
effective sample size) gives a high-variance gradient estimate. At a stage boundary this module
samples K fresh responses for such prompts from the current policy, which becomes their behaviour
policy from then on (their ratios are taken against it).

Each stage's fresh rows are one parquet file under the run directory, written atomically, so a
resumed run loads them instead of sampling again, and later stages build on them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cropi_pl.influence.cache import TrajectoryCache, TrajectoryCacheError
from cropi_pl.influence.collector import Collector, SamplingSettings
from cropi_pl.influence.popi import behaviour_logps
from cropi_pl.influence.trajectories import PromptTrajectories, trajectories_from_columns
from cropi_pl.sharding import rank_and_world


@dataclass
class ResampleConfig:
    """Which pool prompts get fresh responses from the current policy at stages >= 1.

    Attributes:
        all_equal: prompts whose K stored rewards are all equal (zero POPI gradient).
        min_ess: also prompts whose importance ratios' effective sample size, as a fraction of
            K, is below this (costs one forward over the cached responses); None: off.
        max_prompts: at most this many prompts per stage, a seeded sample of the candidates;
            None: every candidate.
    """

    all_equal: bool = True
    min_ess: float | None = None
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        if self.min_ess is not None and not 0 < self.min_ess <= 1:
            raise ValueError(f"resample.min_ess must be in (0, 1], got {self.min_ess}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"resample.max_prompts must be >= 1, got {self.max_prompts}")
        if not self.all_equal and self.min_ess is None:
            raise ValueError("resample needs all_equal=true or a min_ess threshold")


@dataclass
class Drift:
    """Per prompt: summed log(beta / pi_theta) over response tokens, token count, ESS fraction."""

    log_ratio_sums: list[float]
    tokens: list[int]
    ess: list[float]

    def metrics(self) -> dict[str, float]:
        """Token-level KL(behaviour || current) estimate and the mean per-prompt ESS fraction."""
        return {
            "curriculum/kl_behaviour_current": sum(self.log_ratio_sums) / max(sum(self.tokens), 1),
            "curriculum/ess_fraction": sum(self.ess) / max(len(self.ess), 1),
        }


def ess_fraction(log_weights: torch.Tensor) -> float:
    """Effective sample size of importance weights exp(log_weights), divided by their count."""
    w = torch.exp(log_weights.double() - log_weights.max())
    return float(w.sum() ** 2 / (w.pow(2).sum() * w.numel()))


@torch.no_grad()
def measure_drift(model: nn.Module, trajs: Sequence[PromptTrajectories]) -> Drift:
    """How far ``model`` has moved from each prompt's behaviour policy on its stored responses."""
    sums, tokens, ess = [], [], []
    for t in trajs:
        current = behaviour_logps(model, t.prompt_ids, t.completion_ids)
        per_response = [
            sum(beh) - sum(cur) for cur, beh in zip(current, t.behaviour_logps, strict=True)
        ]
        sums.append(sum(per_response))
        tokens.append(sum(map(len, t.behaviour_logps)))
        ess.append(ess_fraction(-torch.tensor(per_response, dtype=torch.float64)))
    return Drift(sums, tokens, ess)


def stale_prompts(
    trajs: Sequence[PromptTrajectories],
    config: ResampleConfig,
    ess: Sequence[float] | None,
    seed: int,
) -> tuple[list[int], dict[str, float]]:
    """Indices (in pool order) of the prompts to re-sample, and how many met each criterion."""
    equal = [config.all_equal and len(set(t.rewards)) == 1 for t in trajs]
    if config.min_ess is not None and ess is None:
        raise ValueError("stale_prompts: min_ess is set but no ESS was measured")
    low = [config.min_ess is not None and e < config.min_ess for e in (ess or [1.0] * len(trajs))]
    candidates = [i for i, (a, b) in enumerate(zip(equal, low, strict=True)) if a or b]
    if config.max_prompts is not None and len(candidates) > config.max_prompts:
        candidates = sorted(random.Random(seed).sample(candidates, config.max_prompts))
    counts = {
        "curriculum/resample/all_equal": float(sum(equal)),
        "curriculum/resample/low_ess": float(sum(low)),
        "curriculum/resample/prompts": float(len(candidates)),
    }
    return candidates, counts


def _as_trajectories(columns: dict[str, list]) -> dict[str, PromptTrajectories]:
    return dict(zip(*trajectories_from_columns(columns), strict=True))


class ResampledStore:
    """Fresh rows per stage in ``directory/stage-XXX.parquet``; later stages override earlier."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, stage: int) -> Path:
        return self.directory / f"stage-{stage:03d}.parquet"

    def load(self, stage: int) -> dict[str, PromptTrajectories] | None:
        """The rows re-sampled at ``stage``, or None when that stage re-sampled nothing yet."""
        path = self.path(stage)
        if not path.exists():
            return None
        columns, meta = TrajectoryCache.read_shard(path)
        if meta.get("stage") != stage:
            raise TrajectoryCacheError(
                f"{path} holds stage {meta.get('stage')!r}, not {stage}; it was moved or renamed"
            )
        return _as_trajectories(columns)

    def apply(
        self, ids: Sequence[str], trajs: list[PromptTrajectories], stages: Iterable[int]
    ) -> list[PromptTrajectories]:
        """``trajs`` with the rows re-sampled at ``stages`` (in order) put in place."""
        for stage in stages:
            trajs = self.put(ids, trajs, self.load(stage) or {}, self.path(stage))
        return trajs

    @staticmethod
    def put(
        ids: Sequence[str],
        trajs: list[PromptTrajectories],
        fresh: dict[str, PromptTrajectories],
        source: Path,
    ) -> list[PromptTrajectories]:
        """``trajs`` (one per id) with ``fresh[id]`` in place of the stored row of ``id``."""
        index = {pid: i for i, pid in enumerate(ids)}
        out = list(trajs)
        for pid, t in fresh.items():
            if pid not in index:
                raise TrajectoryCacheError(
                    f"{source} has prompt {pid!r}, which is not in the pool; was the pool config "
                    "changed since these rows were sampled?"
                )
            out[index[pid]] = t
        return out

    def resample(
        self,
        stage: int,
        rows: list[dict],
        collector: Collector,
        settings: SamplingSettings,
    ) -> dict[str, PromptTrajectories]:
        """Sample ``rows`` (split across ranks), write the stage file on rank 0, return the rows.

        Every rank returns the same rows (gathered); seeds depend on (stage, settings.seed,
        prompt id, sample index) only, so the file does not depend on the number of ranks.
        """
        rank, world = rank_and_world()
        tag = f"resample|stage={stage}|seed={settings.seed}"
        mine = rows[rank::world]
        columns = TrajectoryCache.sample_columns(mine, collector, settings, tag) if mine else {}
        if world > 1:
            parts: list[dict[str, list]] = [{} for _ in range(world)]
            dist.all_gather_object(parts, columns)
        else:
            parts = [columns]
        merged: dict[str, list] = {}
        for part in parts:
            for key, values in part.items():
                merged.setdefault(key, []).extend(values)
        order = {r["id"]: n for n, r in enumerate(rows)}
        perm = sorted(range(len(merged.get("id", []))), key=lambda i: order[merged["id"][i]])
        merged = {key: [values[i] for i in perm] for key, values in merged.items()}
        if rank == 0 and merged:
            meta = {"stage": stage, "tag": tag, "sampling": settings.as_dict()}
            self.directory.mkdir(parents=True, exist_ok=True)
            TrajectoryCache.write_shard(self.path(stage), merged, meta)
        if world > 1:
            dist.barrier()
        return _as_trajectories(merged) if merged else {}
