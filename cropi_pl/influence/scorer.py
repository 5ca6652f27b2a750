"""One influence pass: projected POPI gradients of pool and target prompts, and their cosines."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from cropi_pl.influence.popi import (
    Method,
    POPIConfig,
    POPIGradients,
    PromptTrajectories,
    zero_mask,
)
from cropi_pl.influence.projection import ProjectionConfig, SparseProjector
from cropi_pl.influence.selection import cosine_scores, target_mean
from cropi_pl.sharding import rank_and_world


@dataclass
class InfluenceResult:
    """Per target set, the cosine of every pool prompt's projected gradient with the target mean."""

    scores: dict[str, Tensor]
    eligible: Tensor  # bool (N,): pool prompts with a non-zero gradient
    pool_vectors: Tensor  # (N, k) float32, zero rows for ineligible prompts
    target_means: dict[str, Tensor]
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)


class InfluenceScorer:
    """Computes :class:`InfluenceResult` at the model's current parameters.

    The prompts are split round-robin over ranks; each rank projects its share and an all-reduce
    assembles the full matrix, so every rank makes the same selection as a single process would.
    The projector is fixed by its seed, so scores of different stages are comparable. Gradients
    are buffered ``projection_batch`` prompts at a time (memory: that many full gradients) because
    each projection call streams the whole random matrix once. ``method`` is ``POPIGradients``'s
    (None: vmap on CUDA, one backward per prompt elsewhere).
    """

    def __init__(
        self,
        popi: POPIConfig | None = None,
        projection: ProjectionConfig | None = None,
        prompts_per_batch: int = 8,
        max_target_prompts: int = 100,
        seed: int = 0,
        projection_batch: int = 128,
        method: Method | None = None,
    ) -> None:
        self.popi = popi or POPIConfig()
        self.projection = projection or ProjectionConfig()
        self.prompts_per_batch = prompts_per_batch
        self.max_target_prompts = max_target_prompts
        self.seed = seed
        self.projection_batch = projection_batch
        self.method = method
        self._projector: SparseProjector | None = None

    def project(
        self,
        model: nn.Module,
        trajs: Sequence[PromptTrajectories],
        desc: str = "influence",
        progress: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """``(vectors (n, k), nonzero (n,))`` for all prompts, computed in rank shares."""
        rank, world = rank_and_world()
        device = next(model.parameters()).device
        grads = POPIGradients(model, self.popi, self.prompts_per_batch, self.method)
        if self._projector is None or self._projector.num_params != grads.num_params:
            self._projector = SparseProjector(grads.num_params, self.projection)
        nonzero = torch.tensor([not z for z in zero_mask(trajs)])
        mine = [i for i in range(len(trajs)) if nonzero[i] and i % world == rank]
        vectors = torch.zeros(len(trajs), self.projection.dim, device=device)
        bar = tqdm(total=len(mine), desc=desc, disable=not progress or rank != 0, leave=False)
        pending: list[tuple[list[int], Tensor]] = []

        def flush() -> None:
            # The projector regenerates its random matrix per call: project many rows at once.
            rows = torch.tensor([mine[i] for batch, _ in pending for i in batch], device=device)
            flat = torch.cat([g for _, g in pending])
            vectors[rows] = self._projector.project(flat).to(device)
            pending.clear()

        for batch, flat in grads.compute([trajs[i] for i in mine]):
            pending.append((batch, flat))
            if sum(len(b) for b, _ in pending) >= self.projection_batch:
                flush()
            bar.update(len(batch))
        if pending:
            flush()
        bar.close()
        if world > 1:
            dist.all_reduce(vectors)  # each row is non-zero on exactly one rank
        return vectors.cpu(), nonzero

    def score(
        self,
        model: nn.Module,
        pool: Sequence[PromptTrajectories],
        targets: dict[str, Sequence[PromptTrajectories]],
        progress: bool = True,
    ) -> InfluenceResult:
        start = time.perf_counter()
        means: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        for name, trajs in targets.items():
            chosen = self._target_subset(trajs)
            vectors, nonzero = self.project(model, chosen, f"target {name}", progress)
            means[name] = target_mean(vectors, nonzero, self.max_target_prompts, self.seed)
            stats[f"target_prompts/{name}"] = float(nonzero.sum())
        pool_vectors, eligible = self.project(model, pool, "pool", progress)
        scores = {name: cosine_scores(pool_vectors, mean) for name, mean in means.items()}
        stats["zero_gradient_prompts"] = float((~eligible).sum())
        return InfluenceResult(
            scores, eligible, pool_vectors, means, time.perf_counter() - start, stats
        )

    def _target_subset(self, trajs: Sequence[PromptTrajectories]) -> list[PromptTrajectories]:
        """Up to ``max_target_prompts`` non-zero target prompts, chosen by seed (saves passes)."""
        candidates = [t for t, z in zip(trajs, zero_mask(trajs), strict=True) if not z]
        if not candidates:
            raise ValueError(
                "every target prompt has all-equal cached rewards, so the target gradient is zero; "
                "use a target set the behaviour policy sometimes solves, or sample more responses"
            )
        if len(candidates) > self.max_target_prompts:
            candidates = random.Random(self.seed).sample(candidates, self.max_target_prompts)
        return candidates
