"""A missing or corrupted shard of a real trajectory cache is re-collected alone, to the same
bytes, by ``tools/collect_trajectories.py`` (which says so) and by ``fit``."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.cli_utils import CROPI, ROOT, run_cli

sys.path.insert(0, str(ROOT / "tools"))
import collect_trajectories  # noqa: E402


def _shards(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted((run_dir / "trajectories").rglob("shard-*.parquet"))
    }


def test_deleted_and_corrupted_real_shards_are_recollected(tmp_path: Path, capsys) -> None:
    args = ["--config", str(CROPI), f"--trainer.default_root_dir={tmp_path}"]
    collect_trajectories.main(args)
    original = _shards(tmp_path)
    assert len(original) >= 2  # pool and target splits
    first = tmp_path / sorted(original)[0]
    first.unlink()
    capsys.readouterr()
    collect_trajectories.main(args)
    out = capsys.readouterr().out
    assert f"re-collected 1 missing or corrupted shard(s) {first.name}" in out
    assert "1 of the 1 this rank wrote have the original bytes" in out
    assert out.count("complete, nothing to do") == len(original) - 1
    assert _shards(tmp_path) == original
    # fit repairs a corrupted shard before it reads the cache
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    run_cli(
        "fit",
        "--trainer.max_steps=1",
        "--trainer.val_check_interval=1",
        config=CROPI,
        run_dir=tmp_path,
    )
    assert _shards(tmp_path) == original
