"""tools/bench_grpo.py: token counting, medians, and a one-step run of both frameworks."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_grpo  # noqa: E402

from cropi_pl.policy.tokenizer import build_tokenizer  # noqa: E402
from tests.models import tiny_char_llama  # noqa: E402


def test_completion_tokens_counts_up_to_first_eos():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    eos, width, new = 2, 5, 9
    seqs = torch.randint(3, 20, (12, width + new), generator=gen)
    for row in range(12):  # some rows end early (maybe twice), some never
        for _ in range(int(torch.randint(0, 3, (), generator=gen))):
            seqs[row, width + int(torch.randint(0, new, (), generator=gen))] = eos
    expected = 0
    for row in seqs.tolist():
        for token in row[width:]:
            expected += 1
            if token == eos:
                break
    assert bench_grpo.completion_tokens(seqs, width, eos) == expected
    assert bench_grpo.completion_tokens(seqs[:, :width], width, eos) == 0


def _record(rng: random.Random) -> bench_grpo.StepRecord:
    return bench_grpo.StepRecord(
        step_s=rng.uniform(1, 2),
        rollout_s=rng.uniform(0.5, 1),
        generation_s=rng.uniform(0.1, 0.5),
        training_s=rng.uniform(0.1, 1),
        cpu_s=rng.uniform(0.1, 3),
        completion_tokens=rng.randrange(1, 500),
    )


def test_summarize_takes_medians_after_each_runs_warmup():
    rng = random.Random()
    runs = [[_record(rng) for _ in range(6)] for _ in range(3)]
    summary = bench_grpo.summarize(runs, warmup=2)
    kept = runs[0][2:] + runs[1][2:] + runs[2][2:]

    def median(values):
        ordered = sorted(values)
        return (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # 12 values

    for name in bench_grpo.METRICS:
        assert summary[name] == pytest.approx(median(getattr(r, name) for r in kept))
    tok_per_s = median(r.completion_tokens / r.generation_s for r in kept)
    assert summary["generated_tokens_per_s"] == pytest.approx(tok_per_s)
    assert summary["measured_steps"] == 12
    with pytest.raises(ValueError, match="no measured steps"):
        bench_grpo.summarize(runs, warmup=6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("policy")
    tokenizer = build_tokenizer()
    tiny_char_llama(0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_both_frameworks_run_the_same_prompts(tiny_model):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e .[bench]")
    config = bench_grpo.BenchConfig(
        model=tiny_model,
        steps=2,
        warmup=0,
        prompts_per_step=2,
        num_generations=2,
        max_completion_length=4,
        threads=torch.get_num_threads(),
        num_per_cell=2,
    )
    expected = [[row["prompt"] for row in batch] for batch in bench_grpo.step_batches(config)]
    assert len(expected) == 2 and expected[0] != expected[1]
    for name in bench_grpo.RUNNERS:
        records = bench_grpo.run_one(name, config)
        assert [r.prompts for r in records] == expected, name
        for r in records:
            assert 0 < r.generation_s <= r.rollout_s < r.step_s, name
            assert r.training_s == pytest.approx(r.step_s - r.rollout_s)
            assert 4 <= r.completion_tokens <= 4 * 4, name  # 4 completions of 1..4 tokens
