"""The LightningDataModule: prompt pool, influence targets, eval sets and the current subset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader

from cropi_pl.data.sampler import SubsetBatchStream
from cropi_pl.influence.cache import TrajectoryCache
from cropi_pl.influence.collector import Collector, SamplingSettings
from cropi_pl.influence.fingerprints import fingerprint_model, fingerprint_rows
from cropi_pl.seeding import run_seed
from cropi_pl.sharding import rank_and_world
from cropi_pl.tasks.source import PromptSource, load_source

if TYPE_CHECKING:
    from torch import nn

    from cropi_pl.curriculum.contract import CurriculumPolicy


@dataclass
class TrajectorySettings:
    """The offline trajectory cache: K responses per prompt sampled once from the initial policy.

    Attributes:
        cache_dir: where shards live; default ``<trainer.default_root_dir>/trajectories``.
        pool_samples: K for pool prompts (the paper: 8).
        target_samples: K_val for target prompts (the paper: 32).
        temperature: behaviour sampling temperature (the reference code: 0.5).
        top_p: behaviour nucleus sampling.
        max_new_tokens: length budget; default the module's ``max_completion_length``.
        seed: sampling seed; default the run's ``seed_everything``.
        shard_size: prompts per parquet shard (the unit of resumption).
        rebuild: replace a cache made from another model, data or settings instead of refusing.
    """

    cache_dir: str | None = None
    pool_samples: int = 8
    target_samples: int = 32
    temperature: float = 0.5
    top_p: float = 1.0
    max_new_tokens: int | None = None
    seed: int | None = None
    shard_size: int = 64
    rebuild: bool = False

    def __post_init__(self) -> None:
        self.seed = run_seed(self.seed)


def collate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep rows as dicts: tokenisation belongs to the module, which owns the tokenizer."""
    return rows


class CurriculumDataModule(L.LightningDataModule):
    """Serves GRPO prompt batches from the current subset of the pool.

    It is the data side of the stage contract (``cropi_pl.curriculum.contract.CurriculumData``):
    a curriculum schedules the subsets (``schedule_subsets``), reads the pool and its trajectory
    cache, and sets each stage's subset (``set_subset``).

    Args:
        pool: the training prompts a curriculum selects from.
        eval_sets: named evaluation sets (for example ``targeted`` and ``untargeted``), scored by
            the module's validation loop.
        targets: named influence target sets (their mean gradient defines what "useful" means).
        batch_size: prompts per optimizer step, over all ranks (each gets ``batch_size / world``).
        batches_per_epoch: batches in one epoch; default: one pass over the current subset (a
            curriculum sets its stage length with ``schedule_subsets``).
        eval_batch_size: prompts per validation batch on each rank.
        seed: data order and selection seed; an epoch's order depends only on
            ``(seed, epoch)``; default the run's ``seed_everything``.
        trajectories: the offline trajectory cache used by influence and pass-rate selection.
    """

    def __init__(
        self,
        pool: PromptSource,
        eval_sets: dict[str, PromptSource] | None = None,
        targets: dict[str, PromptSource] | None = None,
        batch_size: int = 8,
        batches_per_epoch: int | None = None,
        eval_batch_size: int = 64,
        seed: int | None = None,
        trajectories: TrajectorySettings | None = None,
    ) -> None:
        super().__init__()
        self.pool_source = pool
        self.eval_sources = dict(eval_sets or {})
        self.target_sources = dict(targets or {})
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.eval_batch_size = eval_batch_size
        self.seed = run_seed(seed)
        self.trajectory_settings = trajectories or TrajectorySettings()
        self.pool: datasets.Dataset | None = None
        self.eval_data: dict[str, datasets.Dataset] = {}
        self.target_data: dict[str, datasets.Dataset] = {}
        self.subset: list[int] | None = None
        self.subset_stage: int | None = None
        self._prepare_epoch: Callable[[int], None] | None = None  # ``schedule_subsets``
        self._position = (0, 0)  # (epoch, training batches consumed in it)
        self._resume: tuple[int, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pool is None:
            self.pool = load_source(self.pool_source)
            self.eval_data = {k: load_source(v) for k, v in self.eval_sources.items()}
            self.target_data = {k: load_source(v) for k, v in self.target_sources.items()}
        if self.subset is None:
            self.subset = list(range(len(self.pool)))

    @property
    def eval_names(self) -> list[str]:
        return list(self.eval_sources)

    def eval_families(self) -> dict[str, list[str]]:
        """Eval set name -> its families (sorted), in loader order: the module's validation
        metrics are created from it before the first batch, identically on every rank."""
        self.setup()
        return {name: sorted(set(self.eval_data[name]["family"])) for name in self.eval_names}

    # ------------------------------------------------------ the stage contract
    def schedule_subsets(self, prepare: Callable[[int], None], batches_per_epoch: int) -> None:
        """Call ``prepare(epoch)`` before building each epoch's training loader (the curriculum
        sets the epoch's subset there), every epoch ``batches_per_epoch`` batches long."""
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self._prepare_epoch = prepare
        self.batches_per_epoch = batches_per_epoch

    def pool_rows(self) -> datasets.Dataset:
        self.setup()
        assert self.pool is not None
        return self.pool

    def target_names(self) -> list[str]:
        return list(self.target_sources)

    def set_subset(self, indices: list[int], stage: int | None = None) -> None:
        """Train on these pool rows from the next loader on (the curriculum's selection)."""
        assert self.pool is not None, "call setup() first"
        bad = [i for i in indices if not 0 <= i < len(self.pool)]
        if bad or not indices:
            raise ValueError(f"subset must be non-empty pool indices; bad: {bad[:5]}")
        self.subset = list(indices)
        self.subset_stage = stage

    def _world(self) -> tuple[int, int]:
        kwargs = (
            getattr(self.trainer.strategy, "distributed_sampler_kwargs", None)
            if self.trainer
            else None
        )
        if not kwargs:
            return 1, 0
        return kwargs["num_replicas"], kwargs["rank"]

    def num_batches(self) -> int:
        assert self.subset is not None
        return self.batches_per_epoch or max(1, len(self.subset) // self.batch_size)

    def train_dataloader(self) -> DataLoader:
        if self._prepare_epoch is not None:
            self._prepare_epoch(self.trainer.current_epoch)
        assert self.pool is not None and self.subset is not None
        world, rank = self._world()
        sampler = SubsetBatchStream(
            self.subset, self.batch_size, self.num_batches(), world, rank, self.seed
        )
        if self._resume is not None:
            sampler.resume_from(*self._resume)
            self._resume = None
        return DataLoader(
            self.pool,
            batch_size=self.batch_size // world,
            sampler=sampler,
            collate_fn=collate_rows,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                self.eval_data[name], batch_size=self.eval_batch_size, collate_fn=collate_rows
            )
            for name in self.eval_names
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as they reach the step (not when prefetched) for exact resume."""
        if self.trainer is not None and self.trainer.training:
            epoch = self.trainer.current_epoch
            consumed = self._position[1] + 1 if self._position[0] == epoch else 1
            self._position = (epoch, consumed)
        return batch

    def state_dict(self) -> dict[str, Any]:
        assert self.pool is not None and self.subset is not None
        return {
            "subset_ids": [self.pool[i]["id"] for i in self.subset],
            "subset_stage": self.subset_stage,
            "epoch": self._position[0],
            "batches_consumed": self._position[1],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.setup()
        assert self.pool is not None
        index = {pid: i for i, pid in enumerate(self.pool["id"])}
        missing = [pid for pid in state["subset_ids"] if pid not in index]
        if missing:
            raise ValueError(
                f"checkpoint subset names {len(missing)} prompt ids absent from the pool "
                f"(first: {missing[:3]}); was the pool config changed since the checkpoint?"
            )
        self.subset = [index[pid] for pid in state["subset_ids"]]
        self.subset_stage = state.get("subset_stage")
        self._position = (state["epoch"], state["batches_consumed"])
        self._resume = self._position

    # ------------------------------------------------------------ trajectories
    def trajectory_cache(self) -> TrajectoryCache:
        root = self.trajectory_settings.cache_dir
        if root is None:
            base = self.trainer.default_root_dir if self.trainer else "."
            root = str(Path(base) / "trajectories")
        return TrajectoryCache(root)

    def trajectory_splits(self) -> dict[str, tuple[datasets.Dataset, int]]:
        """Split name -> (rows, K): the pool and every influence target set."""
        assert self.pool is not None
        cfg = self.trajectory_settings
        splits = {"pool": (self.pool, cfg.pool_samples)}
        for name, data in self.target_data.items():
            splits[f"target/{name}"] = (data, cfg.target_samples)
        return splits

    def collector(
        self, model: nn.Module, policy: CurriculumPolicy, k: int
    ) -> tuple[Collector, SamplingSettings]:
        """A collector sampling ``k`` responses per prompt from ``model`` with the cache's
        settings; ``policy`` supplies the engine, prompt format, reward and length budget."""
        cfg = self.trajectory_settings
        return policy.trajectory_collector(
            model, k, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed
        )

    def pool_collector(
        self, model: nn.Module, policy: CurriculumPolicy
    ) -> tuple[Collector, SamplingSettings]:
        return self.collector(model, policy, self.trajectory_settings.pool_samples)

    def trajectories(
        self, behaviour: nn.Module, policy: CurriculumPolicy
    ) -> tuple[TrajectoryCache, list[str]]:
        """Collect (or resume collecting) every split with the behaviour policy; rank-split.

        A complete split whose shards are missing or corrupted gets those shards re-collected
        alone (the same rows and seeds). Returns the cache and one line per split saying what
        was done (for logs and ``tools/collect_trajectories.py``).

        ``behaviour`` must be the initial policy, unsharded (each rank samples its own prompts);
        ``policy`` supplies the engine, prompt format, reward and length budget.
        """
        self.setup()
        cfg = self.trajectory_settings
        cache = self.trajectory_cache()
        rank, world = rank_and_world()
        model_fp = fingerprint_model(behaviour)
        notes = []
        for split, (rows, k) in self.trajectory_splits().items():
            collector, settings = self.collector(behaviour, policy, k)
            complete = cache.is_complete(split)
            damaged = cache.damaged_shards(split)
            note = f"{split}: complete, nothing to do"
            if not complete or cfg.rebuild or damaged:
                repaired = cache.collect(
                    split,
                    rows,
                    collector,
                    settings,
                    model_fp,
                    fingerprint_rows(rows),
                    rank=rank,
                    world_size=world,
                    shard_size=cfg.shard_size,
                    rebuild=cfg.rebuild,
                )
                if world > 1:
                    dist.barrier()
                if rank == 0:
                    cache.mark_complete(split)
                if world > 1:
                    dist.barrier()
                note = f"{split}: collected" if not complete else f"{split}: rebuilt"
                if damaged and not cfg.rebuild:
                    same = [name for name, identical in repaired.items() if identical]
                    note = (
                        f"{split}: re-collected {len(damaged)} missing or corrupted shard(s) "
                        f"{', '.join(damaged)}; {len(same)} of the {len(repaired)} this rank "
                        "wrote have the original bytes"
                    )
            cache.check(split, model_fp, fingerprint_rows(rows), settings)
            notes.append(note)
        return cache, notes
