"""One influence pass: projected POPI gradients of pool and target prompts, and their cosines."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from cropi_pl.influence.factorised import FactorisedProjection
from cropi_pl.influence.gradients import Method, POPIGradients
from cropi_pl.influence.popi import POPIConfig
from cropi_pl.influence.projection import ProjectionConfig, SparseProjector
from cropi_pl.influence.selection import cosine_scores
from cropi_pl.influence.trajectories import PromptTrajectories, zero_mask
from cropi_pl.seeding import run_seed
from cropi_pl.sharding import rank_and_world

# (prompts, summed) -> (indices, (p, dim) projections, or (1, dim) their sum with summed=True)
ProjectFn = Callable[[Sequence[PromptTrajectories], bool], Iterator[tuple[list[int], Tensor]]]


@dataclass
class InfluenceResult:
    """Per target set, the cosine of every pool prompt's projected gradient with the target mean."""

    scores: dict[str, Tensor]
    eligible: Tensor  # bool (N,): pool prompts with a non-zero gradient
    pool_vectors: Tensor  # (N, dim) float32, zero rows for ineligible prompts
    target_means: dict[str, Tensor]
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)


class InfluenceScorer:
    """Computes :class:`InfluenceResult` at the model's current parameters.

    The prompts are split round-robin over ranks; each rank projects its share and an all-reduce
    assembles the full matrix, so every rank makes the same selection as a single process would.
    The projection is fixed by its seed, so scores of different stages are comparable.

    Cost controls (``tools/bench_influence.py`` measures each against exact scores):
    prompts whose cached rewards are all equal are skipped before any forward pass (their
    gradient is exactly zero); a target set's mean is the projection of its summed gradient
    (``project_mean``: plain backwards, no per-prompt gradient); ``responses_per_prompt`` uses
    only the first K' stored responses of each prompt; ``popi.param_filter`` differentiates a
    parameter subset (the backward stops early); ``popi.autocast_bf16`` runs the passes in bf16
    with fp32 accumulation; gradients are streamed parameter by parameter into the projection
    (``projection.kind="countsketch"`` costs one scatter-add per kept coordinate), so at most
    ``prompts_per_batch`` full gradients exist (one with ``method="loop"``).
    ``factorised=(k_in, k_out)`` replaces the gradient and the projection by
    :class:`~cropi_pl.influence.factorised.FactorisedProjection` (linear layers matching
    ``popi.param_filter``, seeded by ``projection.seed``): the gradient is never formed.
    ``method`` is ``POPIGradients``'s (None: vmap on CUDA, the per-prompt loop elsewhere).
    """

    def __init__(
        self,
        popi: POPIConfig | None = None,
        projection: ProjectionConfig | None = None,
        prompts_per_batch: int = 8,
        max_target_prompts: int = 100,
        seed: int | None = None,
        method: Method | None = None,
        responses_per_prompt: int | None = None,
        factorised: tuple[int, int] | None = None,
    ) -> None:
        if responses_per_prompt is not None and responses_per_prompt < 2:
            raise ValueError(
                f"responses_per_prompt must be >= 2 (a group needs two rewards), "
                f"got {responses_per_prompt}"
            )
        self.popi = popi or POPIConfig()
        self.projection = projection or ProjectionConfig()
        self.prompts_per_batch = prompts_per_batch
        self.max_target_prompts = max_target_prompts
        self.seed = run_seed(seed)
        self.method = method
        self.responses_per_prompt = responses_per_prompt
        self.factorised = None if factorised is None else (int(factorised[0]), int(factorised[1]))
        self._projector: SparseProjector | None = None

    def _engine(self, model: nn.Module) -> tuple[int, ProjectFn]:
        """(output dim, function yielding (indices, projected rows)) for ``model``."""
        if self.factorised is not None:
            k_in, k_out = self.factorised
            engine = FactorisedProjection(
                model,
                self.popi,
                k_in,
                k_out,
                seed=self.projection.seed,
                module_filter=self.popi.param_filter,
                prompts_per_batch=self.prompts_per_batch,
            )
            return engine.dim, engine.project
        grads = POPIGradients(model, self.popi, self.prompts_per_batch, self.method)
        if self._projector is None or self._projector.num_params != grads.num_params:
            self._projector = SparseProjector(grads.num_params, self.projection)
        projector = self._projector
        return projector.config.dim, lambda trajs, summed: grads.project(trajs, projector, summed)

    def _responses(self, traj: PromptTrajectories) -> PromptTrajectories:
        """The first ``responses_per_prompt`` stored responses of ``traj``."""
        n = self.responses_per_prompt
        if n is None or len(traj.rewards) <= n:
            return traj
        return PromptTrajectories(
            traj.prompt_ids, traj.completion_ids[:n], traj.behaviour_logps[:n], traj.rewards[:n]
        )

    def project(
        self,
        model: nn.Module,
        trajs: Sequence[PromptTrajectories],
        desc: str = "influence",
        progress: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """``(vectors (n, dim), nonzero (n,))`` for all prompts, computed in rank shares."""
        rank, world = rank_and_world()
        device = next(model.parameters()).device
        trajs = [self._responses(t) for t in trajs]
        dim, project = self._engine(model)
        nonzero = torch.tensor([not z for z in zero_mask(trajs)])
        mine = [i for i in range(len(trajs)) if nonzero[i] and i % world == rank]
        vectors = torch.zeros(len(trajs), dim, device=device)
        bar = tqdm(total=len(mine), desc=desc, disable=not progress or rank != 0, leave=False)
        for batch, projected in project([trajs[i] for i in mine], False):
            rows = torch.tensor([mine[i] for i in batch], device=device)
            vectors[rows] = projected.to(device)
            bar.update(len(batch))
        bar.close()
        if world > 1:
            dist.all_reduce(vectors)  # each row is non-zero on exactly one rank
        return vectors.cpu(), nonzero

    def project_mean(
        self,
        model: nn.Module,
        trajs: Sequence[PromptTrajectories],
        desc: str = "influence",
        progress: bool = True,
    ) -> Tensor:
        """(dim,) mean projected gradient of ``trajs`` (zero-gradient prompts count as zeros), as
        the projection of their summed gradient: the projection is linear, so the mean needs one
        plain backward per batch and no per-prompt gradient. Rank shares are all-reduced."""
        if not trajs:
            raise ValueError(f"{desc}: no prompts to average")
        rank, world = rank_and_world()
        device = next(model.parameters()).device
        dim, project = self._engine(model)
        mine = [self._responses(t) for t in trajs[rank::world]]
        total = torch.zeros(dim, device=device)
        bar = tqdm(total=len(mine), desc=desc, disable=not progress or rank != 0, leave=False)
        for batch, summed in project(mine, True):
            total += summed[0].to(device)
            bar.update(len(batch))
        bar.close()
        if world > 1:
            dist.all_reduce(total)
        return (total.double() / len(trajs)).float().cpu()

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
            chosen = self.target_subset(trajs)
            means[name] = self.project_mean(model, chosen, f"target {name}", progress)
            stats[f"target_prompts/{name}"] = float(len(chosen))
        pool_vectors, eligible = self.project(model, pool, "pool", progress)
        scores = {name: cosine_scores(pool_vectors, mean) for name, mean in means.items()}
        stats["zero_gradient_prompts"] = float((~eligible).sum())
        return InfluenceResult(
            scores, eligible, pool_vectors, means, time.perf_counter() - start, stats
        )

    def target_subset(self, trajs: Sequence[PromptTrajectories]) -> list[PromptTrajectories]:
        """Up to ``max_target_prompts`` target prompts with a non-zero gradient (after
        ``responses_per_prompt``), chosen by seed (saves passes)."""
        trajs = [self._responses(t) for t in trajs]
        candidates = [t for t, z in zip(trajs, zero_mask(trajs), strict=True) if not z]
        if not candidates:
            raise ValueError(
                "every target prompt has all-equal cached rewards, so the target gradient is zero; "
                "use a target set the behaviour policy sometimes solves, or sample more responses"
            )
        if len(candidates) > self.max_target_prompts:
            candidates = random.Random(self.seed).sample(candidates, self.max_target_prompts)
        return candidates
