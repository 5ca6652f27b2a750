"""Re-sampling stale trajectories: ESS and drift against brute force, the stale criteria, and the
per-stage store (round trip, overlay order, resume, bad files)."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cropi_pl.curriculum.resampling import (
    ResampleConfig,
    ResampledStore,
    ess_fraction,
    measure_drift,
    stale_prompts,
)
from cropi_pl.generation.hf import HFGenerateEngine
from cropi_pl.influence.cache import TrajectoryCacheError
from cropi_pl.influence.collector import Collector, SamplingSettings
from cropi_pl.influence.popi import behaviour_logps
from cropi_pl.influence.trajectories import PromptTrajectories
from cropi_pl.policy.prompting import PromptEncoder
from tests.models import tiny_char_llama, tiny_llama
from tests.test_trajectories import SETTINGS, FakePolicy, make_rows


def _random_trajs(rng: random.Random, n: int, k: int = 4) -> list[PromptTrajectories]:
    out = []
    for _ in range(n):
        completions = [[rng.randrange(3, 30) for _ in range(rng.randint(1, 5))] for _ in range(k)]
        out.append(
            PromptTrajectories(
                prompt_ids=[rng.randrange(3, 30) for _ in range(rng.randint(1, 4))],
                completion_ids=completions,
                behaviour_logps=[[0.0] * len(c) for c in completions],
                rewards=[float(rng.random() < 0.5) for _ in range(k)],
            )
        )
    return out


def test_ess_fraction_matches_brute_force():
    rng = random.Random()
    for _ in range(20):
        k = rng.randint(1, 12)
        log_w = [rng.gauss(0, 3) for _ in range(k)]
        w = [math.exp(x) for x in log_w]
        expected = sum(w) ** 2 / (k * sum(x * x for x in w))
        assert ess_fraction(torch.tensor(log_w, dtype=torch.float64)) == pytest.approx(
            expected, rel=1e-9
        )
    assert ess_fraction(torch.zeros(8)) == pytest.approx(1.0)
    assert ess_fraction(torch.tensor([0.0, -200.0, -200.0, -200.0])) == pytest.approx(0.25)


def test_drift_is_zero_at_the_behaviour_policy_and_matches_brute_force_elsewhere():
    seed = random.randrange(10_000)
    beta, theta = tiny_llama(seed, 30), tiny_llama(seed + 1, 30)
    trajs = _random_trajs(random.Random(seed), 5)
    for t in trajs:
        t.behaviour_logps = behaviour_logps(beta, t.prompt_ids, t.completion_ids)
    same = measure_drift(beta, trajs)
    assert same.metrics()["curriculum/kl_behaviour_current"] == pytest.approx(0.0, abs=1e-6)
    assert same.ess == pytest.approx([1.0] * 5, abs=1e-6)
    moved = measure_drift(theta, trajs)
    for i, t in enumerate(trajs):
        diffs = []
        for completion, beh in zip(t.completion_ids, t.behaviour_logps, strict=True):
            cur = behaviour_logps(theta, t.prompt_ids, [completion])[0]  # one at a time
            diffs.append(sum(beh) - sum(cur))
        w = [math.exp(-d) for d in diffs]
        assert moved.log_ratio_sums[i] == pytest.approx(sum(diffs), rel=1e-4, abs=1e-4)
        assert moved.tokens[i] == sum(map(len, t.completion_ids))
        expected = sum(w) ** 2 / (len(w) * sum(x * x for x in w))
        assert moved.ess[i] == pytest.approx(expected, rel=1e-4)
    kl = sum(moved.log_ratio_sums) / sum(moved.tokens)
    assert moved.metrics()["curriculum/kl_behaviour_current"] == pytest.approx(kl)


def test_stale_prompts_by_each_criterion_and_seeded_cap():
    rewards = [[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1], [0.5, 0.5, 0.5]]
    trajs = [PromptTrajectories([1], [[2]] * 3, [[0.0]] * 3, r) for r in rewards]
    ess = [0.9, 0.2, 0.9, 0.6, 0.1]
    chosen, counts = stale_prompts(trajs, ResampleConfig(), None, seed=0)
    assert chosen == [0, 2, 4]
    assert counts["curriculum/resample/all_equal"] == 3
    chosen, counts = stale_prompts(trajs, ResampleConfig(all_equal=False, min_ess=0.5), ess, 0)
    assert chosen == [1, 4] and counts["curriculum/resample/low_ess"] == 2
    chosen, _ = stale_prompts(trajs, ResampleConfig(min_ess=0.7), ess, 0)
    assert chosen == [0, 1, 2, 3, 4]
    capped = ResampleConfig(min_ess=0.7, max_prompts=2)
    picks = {tuple(stale_prompts(trajs, capped, ess, seed)[0]) for seed in range(30)}
    assert all(len(p) == 2 and list(p) == sorted(p) for p in picks) and len(picks) > 1
    assert stale_prompts(trajs, capped, ess, 7) == stale_prompts(trajs, capped, ess, 7)
    with pytest.raises(ValueError, match="no ESS"):
        stale_prompts(trajs, ResampleConfig(min_ess=0.5), None, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_ess": 1.5}, "min_ess"),
        ({"max_prompts": 0}, "max_prompts"),
        ({"all_equal": False}, "all_equal=true or a min_ess"),
    ],
)
def test_config_errors_name_the_knob(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResampleConfig(**kwargs)


def _fresh(store: ResampledStore, stage: int, rows, policy: FakePolicy | None = None):
    return store.resample(stage, rows, (policy or FakePolicy()).collector(), SETTINGS)


def test_store_round_trip_overlay_order_and_resume(tmp_path):
    rows = make_rows(6).to_list()
    store = ResampledStore(tmp_path / "resampled")
    assert store.load(1) is None
    first = _fresh(store, 1, rows[1:4])
    assert list(first) == [r["id"] for r in rows[1:4]]
    assert store.load(1) == first  # what a resumed run reads back
    second = _fresh(store, 2, rows[2:3])
    assert second[rows[2]["id"]] != first[rows[2]["id"]]  # the stage is part of the seed
    ids = [r["id"] for r in rows]
    base = _random_trajs(random.Random(0), 6)
    merged = store.apply(ids, base, [1, 2])
    assert merged[0] is base[0] and merged[4] is base[4] and merged[5] is base[5]
    assert merged[1] == first[ids[1]] and merged[3] == first[ids[3]]
    assert merged[2] == second[ids[2]]  # a later stage overrides an earlier one
    again = ResampledStore(tmp_path / "again")
    assert _fresh(again, 1, rows[1:4]) == first  # same seed and stage: same rows
    assert _fresh(store, 3, []) == {} and store.load(3) is None


def test_store_rejects_foreign_or_moved_files(tmp_path):
    rows = make_rows(3).to_list()
    store = ResampledStore(tmp_path)
    _fresh(store, 1, rows)
    base = _random_trajs(random.Random(0), 3)
    with pytest.raises(
        TrajectoryCacheError, match=f"stage-001.parquet has prompt '{rows[0]['id']}'"
    ):
        store.apply(["other", "ids", "here"], base, [1])
    store.path(1).rename(store.path(2))
    with pytest.raises(TrajectoryCacheError, match="holds stage 1, not 2"):
        store.load(2)
    store.path(3).write_bytes(b"PAR1 partial")
    with pytest.raises(TrajectoryCacheError, match="stage-003.parquet is missing or not"):
        store.load(3)


def test_fresh_rows_carry_the_sampling_policys_log_probs(tmp_path):
    from cropi_pl.policy.tokenizer import build_tokenizer
    from cropi_pl.rewards.numeric import ExactNumberReward

    tokenizer = build_tokenizer()
    model = tiny_char_llama(random.randrange(10_000))
    settings = SamplingSettings(num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=5, seed=1)
    collector = Collector.for_model(
        model, PromptEncoder(tokenizer), HFGenerateEngine(), ExactNumberReward(), settings
    )
    rows = [{"id": f"q{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(3)]
    fresh = ResampledStore(tmp_path).resample(1, rows, collector, settings)
    for row in rows:
        t = fresh[row["id"]]
        assert len(t.completion_ids) == 3 and len(t.rewards) == 3
        expected = behaviour_logps(model, t.prompt_ids, t.completion_ids)
        for got, want in zip(t.behaviour_logps, expected, strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)


def _rank_resample(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fresh = _fresh(ResampledStore(root), 1, make_rows(5).to_list())
    torch.save(fresh, f"{root}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_write_and_return_the_single_process_rows(tmp_path):
    rows = make_rows(5).to_list()
    single = _fresh(ResampledStore(tmp_path / "one"), 1, rows)
    two = tmp_path / "two"
    two.mkdir()
    port = 29500 + random.randrange(1000)
    mp.start_processes(_rank_resample, args=(2, port, str(two)), nprocs=2, start_method="fork")
    for rank in range(2):  # each rank sampled half the prompts and got every row back
        assert torch.load(two / f"rank{rank}.pt", weights_only=False) == single
    assert ResampledStore(two).load(1) == single
