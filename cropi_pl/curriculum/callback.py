"""The CROPI curriculum as a Lightning Callback: reselect the training subset at every stage."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from cropi_pl.atomic import atomic_file
from cropi_pl.curriculum.contract import CurriculumData, CurriculumPolicy
from cropi_pl.curriculum.resampling import (
    ResampleConfig,
    ResampledStore,
    measure_drift,
    stale_prompts,
)
from cropi_pl.influence.cache import TrajectoryCache
from cropi_pl.influence.gradients import Method
from cropi_pl.influence.popi import POPIConfig
from cropi_pl.influence.projection import ProjectionConfig
from cropi_pl.influence.scorer import InfluenceScorer
from cropi_pl.influence.selection import (
    InfluenceSelector,
    LearnabilitySelector,
    PassRateSelector,
    Selection,
    SelectionContext,
    Selector,
    selection_size,
)
from cropi_pl.influence.trajectories import PromptTrajectories, pass_rate
from cropi_pl.seeding import derive_seed

TRAJECTORY_SELECTORS = (InfluenceSelector, PassRateSelector, LearnabilitySelector)


def stage_summary(
    selection: Selection,
    pool_size: int,
    families: Counter[str],
    ctx: SelectionContext,
    metrics: dict[str, float],
) -> str:
    """The one console line a stage prints: size, method, time, family mix, pass-rate band.

    For example ``stage 1: selected 45 of 448 prompts (10.0%) by influence in 14.2 s; families
    mul 13, mod 11, add 9, ...; behaviour pass rate 0.12-0.88 (median 0.50; pool median 0.25)``.
    """
    n = len(selection.ids)
    line = (
        f"stage {selection.stage}: selected {n} of {pool_size} prompts "
        f"({100 * n / max(pool_size, 1):.1f}%) by {selection.method} "
        f"in {metrics.get('curriculum/selection_seconds', 0.0):.1f} s; families "
        + ", ".join(f"{family} {count}" for family, count in families.most_common())
    )
    if ctx.pass_rate is not None and n:
        chosen = ctx.pass_rate[torch.tensor(selection.indices)]
        line += (
            f"; behaviour pass rate {chosen.min().item():.2f}-{chosen.max().item():.2f} "
            f"(median {chosen.median().item():.2f}; pool median "
            f"{ctx.pass_rate.median().item():.2f})"
        )
    return line


def _parties(
    trainer: L.Trainer, module: L.LightningModule
) -> tuple[CurriculumData, CurriculumPolicy]:
    """The trainer's data module and ``module``, checked against the stage contract."""
    data = trainer.datamodule
    if not isinstance(data, CurriculumData):
        raise TypeError(
            f"CurriculumCallback needs a data module implementing "
            f"cropi_pl.curriculum.contract.CurriculumData (CurriculumDataModule), got "
            f"{type(data).__name__}"
        )
    if not isinstance(module, CurriculumPolicy):
        raise TypeError(
            f"CurriculumCallback needs a module implementing "
            f"cropi_pl.curriculum.contract.CurriculumPolicy (GRPOModule), got "
            f"{type(module).__name__}"
        )
    return data, module


def _histograms(writer: Any, selection: Selection, ctx: SelectionContext, step: int) -> None:
    """TensorBoard histograms of the stage's scores and of the behaviour pass rates (pool and
    selection); the scalar statistics go to every logger."""
    if selection.scores and any(math.isfinite(s) for s in selection.scores):
        writer.add_histogram("curriculum/scores", torch.tensor(selection.scores), step)
    if ctx.pass_rate is not None:
        writer.add_histogram("curriculum/pass_rate_pool", ctx.pass_rate, step)
        chosen = ctx.pass_rate[torch.tensor(selection.indices)]
        writer.add_histogram("curriculum/pass_rate_selected", chosen, step)


class CurriculumCallback(L.Callback):
    """Stage ``m`` is epoch ``m`` and lasts ``stage_steps`` optimizer steps.

    Before the loader of an epoch is built, the DataModule asks this callback for that epoch's
    subset; a new stage selects ``ratio * |pool|`` prompts with ``selector`` at the current
    parameters (influence: projected POPI gradients against each target set). Because the
    subset is decided when the loader is built, a resumed run gets the same subset as the
    uninterrupted one, even when it was killed right at a stage boundary.

    Args:
        selector: ``InfluenceSelector`` (CROPI), ``RandomSelector``, ``PassRateSelector``,
            ``LearnabilitySelector`` or ``FullSelector``.
        ratio: fraction of the pool selected per stage (the paper: 0.1).
        stage_steps: optimizer steps per stage.
        reselect: select again at every stage (CROPI); ``False`` keeps stage 0's subset
            (single-stage "static" influence).
        popi: off-policy gradient options (ratio clipping, reweighting, parameter subset,
            bf16 autocast, attention kernel of the pass).
        projection: sparse random projection (dimension, kept fraction, kind, seed).
        prompts_per_batch: prompts per backward pass in the influence pass.
        responses_per_prompt: stored responses used per prompt (None: all K); fewer make the
            influence pass cheaper (``InfluenceScorer``).
        factorised: ``(k_in, k_out)`` to score with the LoGra-style factorised projection of
            linear layers instead of full gradients (``InfluenceScorer``).
        method: per-prompt gradients by "hooks" (one backward per batch), "vmap" or "loop"
            (one backward per prompt); default: vmap on CUDA, loop elsewhere (``POPIGradients``).
        max_target_prompts: target prompts averaged into each target gradient (the paper: 100).
        log_drift: log KL(behaviour || current) and the importance ratios' effective sample size
            on the cached pool responses at every stage (one extra forward over the cache, about
            a third of an influence pass on the embedded policy).
        resample: re-sample stale pool trajectories (all-equal rewards, low ESS) from the current
            policy at stages >= 1 (``cropi_pl.curriculum.resampling``); None: the paper's
            behaviour, every stage reweights the initial policy's samples. The fresh rows go to
            ``<default_root_dir>/resampled/stage-XXX.parquet`` and are reused on resume.
        selection_dir: where ``stage-XXX.json`` selections go; default
            ``<default_root_dir>/selections``, next to the checkpoints.
        progress: show progress bars for collection and influence passes.
    """

    def __init__(
        self,
        selector: Selector | None = None,
        ratio: float = 0.1,
        stage_steps: int = 20,
        reselect: bool = True,
        popi: POPIConfig | None = None,
        projection: ProjectionConfig | None = None,
        prompts_per_batch: int = 8,
        method: Method | None = None,
        responses_per_prompt: int | None = None,
        factorised: tuple[int, int] | None = None,
        max_target_prompts: int = 100,
        log_drift: bool = False,
        resample: ResampleConfig | None = None,
        selection_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if stage_steps < 1:
            raise ValueError(f"stage_steps must be >= 1, got {stage_steps}")
        self.selector = selector or InfluenceSelector()
        self.ratio = ratio
        self.stage_steps = stage_steps
        self.reselect = reselect
        self.scorer = InfluenceScorer(
            popi,
            projection,
            prompts_per_batch,
            max_target_prompts,
            method=method,
            responses_per_prompt=responses_per_prompt,
            factorised=factorised,
        )
        self.log_drift = log_drift
        self.resample = resample
        self.selection_dir = selection_dir
        self.progress = progress
        self.history: dict[int, list[str]] = {}
        self._scratch: nn.Module | None = None
        self._cache: TrajectoryCache | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Schedule the stages with the data module (``cropi_pl.curriculum.contract``)."""
        if stage != "fit":
            return
        data, policy = _parties(trainer, pl_module)
        iterations = policy.optimizer_steps_per_batch
        if self.stage_steps % iterations:
            raise ValueError(
                f"stage_steps={self.stage_steps} must be a multiple of num_iterations={iterations}"
            )
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "CurriculumCallback needs Trainer(reload_dataloaders_every_n_epochs=1): every "
                "stage is an epoch whose loader serves that stage's subset (the CLI sets it), got "
                f"{trainer.reload_dataloaders_every_n_epochs}"
            )
        prepare = partial(self.ensure_stage, trainer, data, policy)
        data.schedule_subsets(prepare, self.stage_steps // iterations)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): v for k, v in state_dict.get("history", {}).items()}

    # -------------------------------------------------------------- selection
    def stage_of(self, epoch: int) -> int:
        return epoch if self.reselect else 0

    def ensure_stage(
        self, trainer: L.Trainer, data: CurriculumData, policy: CurriculumPolicy, epoch: int
    ) -> None:
        """Make the data module's subset the one of ``epoch``'s stage, selecting if needed."""
        stage = self.stage_of(epoch)
        if data.subset_stage == stage:
            return
        selection = self.select(trainer, data, policy, stage)
        data.set_subset(selection.indices, stage)

    def select(
        self, trainer: L.Trainer, data: CurriculumData, policy: CurriculumPolicy, stage: int
    ) -> Selection:
        start = time.perf_counter()
        pool = data.pool_rows()
        pool_ids = list(pool["id"])
        n = selection_size(len(pool_ids), self.ratio)
        ctx = SelectionContext(ids=pool_ids, seed=data.seed, stage=stage)
        metrics: dict[str, float] = {}
        pool_trajs: list[PromptTrajectories] = []
        if isinstance(self.selector, TRAJECTORY_SELECTORS):
            if self._cache is None:  # collected (or verified) once per process
                self._cache, notes = data.trajectories(policy.initial_policy(), policy)
                for note in notes:
                    rank_zero_info(f"trajectory cache {note}")
            _, pool_trajs = self._cache.to_trajectories("pool")
        if isinstance(self.selector, InfluenceSelector):
            if self._scratch is None:
                self._scratch = policy.initial_policy()
            model = policy.current_policy(into=self._scratch)
            pool_trajs = self._freshen(trainer, data, policy, model, pool_trajs, stage, metrics)
            targets = {
                name: self._cache.to_trajectories(f"target/{name}")[1]
                for name in data.target_names()
            }
            if not targets:
                raise ValueError("influence selection needs data.targets (influence target sets)")
            result = self.scorer.score(model, pool_trajs, targets, self.progress)
            ctx.scores, ctx.eligible = result.scores, result.eligible
            metrics.update({f"curriculum/{k}": v for k, v in result.stats.items()})
            metrics["curriculum/influence_seconds"] = result.seconds
        if pool_trajs:
            ctx.pass_rate = torch.tensor(
                [pass_rate(t.rewards) for t in pool_trajs], dtype=torch.float32
            )
        selection = self.selector.select(ctx, n)
        selection.stage = stage
        metrics["curriculum/selection_seconds"] = time.perf_counter() - start
        self._record(trainer, pool, selection, ctx, metrics)
        return selection

    # ---------------------------------------------------------------- helpers
    def _freshen(
        self,
        trainer: L.Trainer,
        data: CurriculumData,
        policy: CurriculumPolicy,
        model: nn.Module,
        trajs: list[PromptTrajectories],
        stage: int,
        metrics: dict[str, float],
    ) -> list[PromptTrajectories]:
        """The pool's trajectories as this stage scores them: stored rows, with the rows that
        earlier stages and this one re-sampled put in place (``resample``); logs drift."""
        pool = data.pool_rows()
        ids = list(pool["id"])
        store = ResampledStore(Path(trainer.default_root_dir) / "resampled")
        if self.resample is not None:
            trajs = store.apply(ids, trajs, range(1, stage))
        fresh = store.load(stage) if self.resample is not None and stage > 0 else {}
        needs_ess = fresh is None and self.resample.min_ess is not None
        drift = measure_drift(model, trajs) if self.log_drift or needs_ess else None
        if self.log_drift:
            metrics.update(drift.metrics())
        if fresh is None:  # re-sampling is on and this stage has not re-sampled yet
            start = time.perf_counter()
            seed = derive_seed("resample", data.seed, stage)
            ess = drift.ess if drift is not None else None
            chosen, counts = stale_prompts(trajs, self.resample, ess, seed)
            collector, settings = data.pool_collector(model, policy)
            fresh = store.resample(stage, pool.select(chosen).to_list(), collector, settings)
            metrics.update(counts)
            metrics["curriculum/resample_seconds"] = time.perf_counter() - start
        return store.put(ids, trajs, fresh, store.path(stage))

    def _record(
        self,
        trainer: L.Trainer,
        pool: datasets.Dataset,
        selection: Selection,
        ctx: SelectionContext,
        metrics: dict[str, float],
    ) -> None:
        stage = selection.stage
        previous = self.history.get(stage - 1)
        self.history[stage] = list(selection.ids)
        if trainer.global_rank != 0:
            return
        directory = Path(self.selection_dir or Path(trainer.default_root_dir) / "selections")
        directory.mkdir(parents=True, exist_ok=True)
        selection.save(directory / f"stage-{stage:03d}.json")
        metrics["curriculum/stage"] = float(stage)
        metrics["curriculum/selection_size"] = float(len(selection.ids))
        if previous is not None:
            overlap = len(set(previous) & set(selection.ids)) / max(1, len(selection.ids))
            metrics["curriculum/overlap_with_previous"] = overlap
        families = Counter(pool[i]["family"] for i in selection.indices)
        for family, count in families.items():
            metrics[f"curriculum/family/{family}"] = count / len(selection.indices)
        rank_zero_info(stage_summary(selection, len(pool), families, ctx, metrics))
        step = stage * self.stage_steps
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                _histograms(logger.experiment, selection, ctx, step)
        with atomic_file(directory / f"stage-{stage:03d}.metrics.json") as tmp:
            Path(tmp).write_text(json.dumps(metrics, indent=1, sort_keys=True))
