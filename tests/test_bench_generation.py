"""tools/bench_generation.py on the HF engines: a one-round run that checks their tokens agree."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_generation  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def test_hf_engines_run_and_sample_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tool sets both for its process
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "bench.json"
    argv = ["--models", "embedded:tiny", "--engines", "hf", "hf_generate", "hf_unshared"]
    argv += ["--prompts", "3", "--samples", "4", "--max-new-tokens", "24", "--rounds", "2"]
    assert bench_generation.main([*argv, "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["models"]["embedded:tiny"]
    for name in ("hf", "hf_generate", "hf_unshared"):
        engine = result["engines"][name]
        assert engine["same_tokens_as_hf"] is True
        assert [r["tokens"] for r in engine["rounds"]] == [
            r["tokens"] for r in result["engines"]["hf"]["rounds"]
        ]
        assert all(r["tokens"] > 0 for r in engine["rounds"])
    assert result["speedup_vs_hf"]["hf"]["median"] == 1.0
