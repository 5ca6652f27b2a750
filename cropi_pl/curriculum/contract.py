"""The stage contract: everything the curriculum asks of the data module and of the module.

:class:`~cropi_pl.curriculum.callback.CurriculumCallback` drives the stages through these two
interfaces only (``CurriculumDataModule`` and ``GRPOModule`` implement them); it reads no other
attribute of either and changes no trainer setting. One stage, as the callback runs it:

1. ``setup("fit")``: checks that the trainer rebuilds the training loader every epoch
   (``reload_dataloaders_every_n_epochs=1``, which the CLI sets for a curriculum), then
   ``data.schedule_subsets(prepare, stage_steps // policy.optimizer_steps_per_batch)``: a stage
   is one epoch of that many batches.
2. Before building the training loader of epoch ``e``, the data module calls ``prepare(e)``.
   If ``data.subset_stage`` is already that epoch's stage (a resumed run restored it), nothing
   happens. Otherwise the callback selects:

   - ``data.trajectories(policy.initial_policy(), policy)``: the cache of K responses per pool
     and target prompt sampled from the initial policy, collected once (the policy supplies the
     sampling engine, the prompt format and the reward through ``policy.trajectory_collector``);
   - ``policy.current_policy(into)``: an unsharded model holding the current parameters, whose
     POPI gradients the influence pass takes (``cropi_pl.influence``);
   - optionally re-sampled stale pool rows: ``data.pool_collector(model, policy)`` samples them
     from the current policy;
   - the selector's choice goes back with ``data.set_subset(indices, stage)``, and the loader of
     epoch ``e`` serves it.

The method behind each step: ``docs/method.md``; the data flow: ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import datasets
from torch import nn

if TYPE_CHECKING:
    from cropi_pl.influence.trajectories import Collector, SamplingSettings, TrajectoryCache


@runtime_checkable
class CurriculumPolicy(Protocol):
    """What the curriculum asks of the module being trained (``GRPOModule``)."""

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps taken on each training batch (GRPO's ``num_iterations``)."""
        ...

    def initial_policy(self) -> nn.Module:
        """A fresh unsharded copy of the initial policy (the behaviour policy beta), in eval
        mode, on this rank's device."""
        ...

    def current_policy(self, into: nn.Module) -> nn.Module:
        """``into`` (an ``initial_policy()`` copy) loaded with the current parameters, gathered
        on every rank when they are sharded."""
        ...

    def trajectory_collector(
        self,
        model: nn.Module,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int | None,
        seed: int,
    ) -> tuple[Collector, SamplingSettings]:
        """A collector sampling ``model`` with this module's engine and prompt format and
        scoring with its first reward, and the settings it samples with
        (``max_new_tokens=None``: the module's completion budget)."""
        ...


@runtime_checkable
class CurriculumData(Protocol):
    """What the curriculum asks of the data module (``CurriculumDataModule``)."""

    @property
    def seed(self) -> int:
        """The data seed: selections and re-sampling derive their randomness from it."""
        ...

    @property
    def subset_stage(self) -> int | None:
        """The stage whose subset the next loader serves (None before the first selection)."""
        ...

    def schedule_subsets(self, prepare: Callable[[int], None], batches_per_epoch: int) -> None:
        """Call ``prepare(epoch)`` before building each epoch's training loader, and make every
        epoch ``batches_per_epoch`` batches long."""
        ...

    def pool_rows(self) -> datasets.Dataset:
        """The training pool (``id``, ``prompt``, ``answer``, ``family``, ... per row)."""
        ...

    def target_names(self) -> list[str]:
        """The influence target sets, by name."""
        ...

    def trajectories(
        self, behaviour: nn.Module, policy: CurriculumPolicy
    ) -> tuple[TrajectoryCache, list[str]]:
        """The trajectory cache of the pool (split ``pool``) and of every target set (splits
        ``target/<name>``), sampled from ``behaviour``: collected (or its damaged shards
        re-collected) where needed, verified against ``behaviour``, the data and the sampling
        settings; with one line per split saying what was done."""
        ...

    def pool_collector(
        self, model: nn.Module, policy: CurriculumPolicy
    ) -> tuple[Collector, SamplingSettings]:
        """A collector sampling ``model`` the way the pool's cache was sampled."""
        ...

    def set_subset(self, indices: list[int], stage: int) -> None:
        """Train on these pool rows (indices into ``pool_rows()``) from the next loader on."""
        ...
