"""Collect the offline trajectory cache of a config without training.

    python tools/collect_trajectories.py --config configs/cropi_tiny.yaml [--key value ...]

Samples K responses per pool and target prompt from the initial policy (the behaviour policy),
stores them with behaviour log-probs and rewards, and resumes an interrupted collection. A
complete cache is checked shard by shard: a missing or corrupted shard is re-collected alone (the
same rows and seeds, so the same bytes on a reproducible engine), and the tool prints per split
what it did. Under
``torchrun --nproc_per_node N`` the prompts are split across ranks. ``fit`` runs the same
collection automatically when the cache is missing; this tool lets you do it ahead of time.
"""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist

from cropi_pl.cli import main as cli_main


def main(argv: list[str] | None = None) -> None:
    cli = cli_main(argv if argv is not None else sys.argv[1:], run=False)
    module, dm = cli.model, cli.datamodule
    dm.trainer = cli.trainer  # for default_root_dir
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    start = time.perf_counter()
    cache, notes = dm.trajectories(module.initial_policy(), module)
    seconds = time.perf_counter() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        for note, (split, (rows, k)) in zip(notes, dm.trajectory_splits().items(), strict=True):
            size = cache.size_bytes(split)
            print(note)
            print(
                f"  {len(rows)} prompts x {k} responses, {size / 1e6:.2f} MB "
                f"({size / max(len(rows), 1) / 1e3:.1f} kB/prompt) in {cache.path(split)}"
            )
        print(f"collection took {seconds:.1f}s")


if __name__ == "__main__":
    main()
