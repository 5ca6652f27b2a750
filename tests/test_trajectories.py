"""The offline trajectory cache: contents, resume, rank layout, fingerprints and corruption."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from cropi_pl.generation.engine import Completion
from cropi_pl.influence.cache import CacheMismatchError, TrajectoryCache, TrajectoryCacheError
from cropi_pl.influence.collector import Collector, SamplingSettings, seed_tag
from cropi_pl.influence.fingerprints import fingerprint_model, fingerprint_rows
from cropi_pl.policy.prompting import PromptEncoder
from tests.models import tiny_llama

VOCAB = 40
SETTINGS = SamplingSettings(num_samples=3, temperature=0.7, top_p=1.0, max_new_tokens=6, seed=5)
MODEL_FP, DATA_FP = "m" * 64, "d" * 64


class Killed(RuntimeError):
    pass


class FakePolicy:
    """Samples that are a pure function of (seed_tag, prompt id, sample index), like a seeded
    engine; ``fail_after`` raises on the next ``sample`` call after that many, like a kill."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.sample_calls = 0
        self.sampled_ids: list[str] = []

    def one(self, tag: str, row: dict, j: int) -> Completion:
        rng = random.Random(f"{tag}|{row['id']}|{j}")
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 6))]
        return Completion(ids, truncated=rng.random() < 0.3)

    @staticmethod
    def prompt(row: dict) -> list[int]:
        return [4 + ord(c) % (VOCAB - 4) for c in row["prompt"]]

    def sample(
        self, rows: list[dict], k: int, temperature: float, tag: str
    ) -> tuple[list[list[int]], list[Completion]]:
        if self.fail_after is not None and self.sample_calls >= self.fail_after:
            raise Killed("simulated kill")
        self.sample_calls += 1
        self.sampled_ids.extend(r["id"] for r in rows)
        return (
            [self.prompt(r) for r in rows for _ in range(k)],
            [self.one(tag, r, j) for r in rows for j in range(k)],
        )

    @staticmethod
    def reward(ids: list[int], answer: str) -> float:
        return float((sum(ids) + int(answer)) % 3 == 0)

    def score(self, rows: list[dict], completions: list[Completion], k: int) -> list[float]:
        return [self.reward(c.ids, rows[i // k]["answer"]) for i, c in enumerate(completions)]

    @staticmethod
    def logp(prompt: list[int], ids: list[int]) -> list[float]:
        # float32-representable, so storage as float32 must round-trip exactly
        return [float(np.float32(-((sum(prompt) + 7 * t + i) % 11) / 3)) for i, t in enumerate(ids)]

    def logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        return [self.logp(p, c) for p, c in zip(prompts, completions, strict=True)]

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)

    def collector(self) -> Collector:
        return Collector(self.sample, self.score, self.logps, self.decode)


def make_rows(n: int, salt: str = "") -> datasets.Dataset:
    rng = random.Random(f"rows{salt}")
    return datasets.Dataset.from_dict(
        {
            "id": [f"p{i}{salt}" for i in range(n)],
            "prompt": [f"Q{rng.randint(0, 999)}+{i}" for i in range(n)],
            "answer": [str(rng.randint(0, 50)) for _ in range(n)],
        }
    )


def collect(root: Path, rows: datasets.Dataset, policy: FakePolicy | None = None, **kw) -> None:
    args = {"settings": SETTINGS, "model_fp": MODEL_FP, "data_fp": DATA_FP, "shard_size": 3}
    args.update(kw)
    settings, model_fp, data_fp = args.pop("settings"), args.pop("model_fp"), args.pop("data_fp")
    TrajectoryCache(root).collect(
        "pool",
        rows,
        (policy or FakePolicy()).collector(),
        settings,
        model_fp,
        data_fp,
        progress=False,
        **args,
    )


def shard_bytes(root: Path) -> dict[str, bytes]:
    directory = TrajectoryCache(root).path("pool")
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_round_trip_matches_direct_calls(tmp_path: Path) -> None:
    rows = make_rows(8)
    collect(tmp_path, rows)
    cache = TrajectoryCache(tmp_path)
    loaded = cache.load("pool").to_list()
    policy, k, tag = FakePolicy(), SETTINGS.num_samples, seed_tag("pool", SETTINGS)
    assert [r["id"] for r in loaded] == rows["id"]
    for row, got in zip(rows.to_list(), loaded, strict=True):
        samples = [policy.one(tag, row, j) for j in range(k)]
        prompt = FakePolicy.prompt(row)
        assert got["prompt_ids"] == prompt
        assert got["completion_ids"] == [c.ids for c in samples]
        assert got["truncated"] == [c.truncated for c in samples]
        assert got["behaviour_logps"] == [FakePolicy.logp(prompt, c.ids) for c in samples]
        assert got["rewards"] == [FakePolicy.reward(c.ids, row["answer"]) for c in samples]
        assert got["texts"] == [FakePolicy.decode(c.ids) for c in samples]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["splits"]["pool"]
    assert manifest["model"] == MODEL_FP and entry["data"] == DATA_FP
    assert entry["sampling"] == SETTINGS.as_dict() and entry["complete"]
    assert entry["num_prompts"] == 8 and len(entry["shards"]) == 3
    assert cache.is_complete("pool")
    assert cache.size_bytes("pool") == sum(len(b) for b in shard_bytes(tmp_path).values()) > 0

    again = FakePolicy()
    collect(tmp_path, rows, again)  # a complete, matching split: nothing to sample or rewrite
    assert again.sample_calls == 0 and cache.manifest() == manifest

    ids, trajs = cache.to_trajectories("pool")
    assert ids == rows["id"]
    assert [t.completion_ids for t in trajs] == [r["completion_ids"] for r in loaded]
    assert [t.behaviour_logps for t in trajs] == [r["behaviour_logps"] for r in loaded]
    rates = cache.pass_rates("pool")
    for r in loaded:
        assert rates[r["id"]] == sum(1 for x in r["rewards"] if x >= 0.5) / k


def test_samples_depend_on_seed_and_split_not_on_shard_size(tmp_path: Path) -> None:
    rows = make_rows(7)
    collect(tmp_path / "a", rows, shard_size=2)
    collect(tmp_path / "b", rows, shard_size=5)
    collect(tmp_path / "c", rows, settings=SamplingSettings(3, 0.7, 1.0, 6, seed=6))
    a, b, c = (TrajectoryCache(tmp_path / x).load("pool").to_list() for x in "abc")
    assert a == b
    assert [r["completion_ids"] for r in a] != [r["completion_ids"] for r in c]


def test_killed_collection_resumes_to_identical_cache(tmp_path: Path) -> None:
    rows = make_rows(10)  # 4 shards of 3
    collect(tmp_path / "full", rows)
    with pytest.raises(Killed):
        collect(tmp_path / "resumed", rows, FakePolicy(fail_after=2))
    cache = TrajectoryCache(tmp_path / "resumed")
    assert not cache.is_complete("pool")
    with pytest.raises(TrajectoryCacheError, match="'pool'.*incomplete"):
        cache.load("pool")
    # a kill in the middle of a write leaves a partial tmp file behind
    (cache.path("pool") / "shard-00002.parquet.tmp").write_bytes(b"PAR1 partial")
    resumed = FakePolicy()
    collect(tmp_path / "resumed", rows, resumed)
    assert resumed.sampled_ids == rows["id"][6:]  # only the two missing shards
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "full")
    full = TrajectoryCache(tmp_path / "full")
    assert cache.load("pool").to_list() == full.load("pool").to_list()
    assert cache.manifest() == full.manifest()


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    rows = make_rows(11)
    collect(tmp_path / "one", rows)
    two = TrajectoryCache(tmp_path / "two")
    collect(tmp_path / "two", rows, rank=1, world_size=2)  # rank 1 first: no manifest yet
    with pytest.raises(TrajectoryCacheError, match="no trajectories for split 'pool'"):
        two.load("pool")
    collect(tmp_path / "two", rows, rank=0, world_size=2)
    assert not two.is_complete("pool")
    with pytest.raises(TrajectoryCacheError, match="'pool'.*incomplete"):
        two.load("pool")
    two.mark_complete("pool")
    assert two.load("pool").to_list() == TrajectoryCache(tmp_path / "one").load("pool").to_list()
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")


def test_mark_complete_names_missing_shards(tmp_path: Path) -> None:
    rows = make_rows(9)
    collect(tmp_path, rows, rank=0, world_size=2)  # shards 0 and 2 of 3
    with pytest.raises(TrajectoryCacheError, match="shard-00001.parquet missing"):
        TrajectoryCache(tmp_path).mark_complete("pool")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_fp": "x" * 64}, "model"),
        ({"data_fp": "y" * 64}, "data"),
        ({"settings": SamplingSettings(3, 1.0, 1.0, 6, seed=5)}, "sampling.temperature"),
        ({"settings": SamplingSettings(4, 0.7, 1.0, 6, seed=5)}, "sampling.num_samples"),
        ({"settings": SamplingSettings(3, 0.7, 1.0, 6, seed=9)}, "sampling.seed"),
    ],
)
def test_mismatch_is_refused_naming_the_field(tmp_path: Path, change: dict, field: str) -> None:
    rows = make_rows(5)
    collect(tmp_path, rows)
    before = shard_bytes(tmp_path)
    with pytest.raises(CacheMismatchError) as err:
        collect(tmp_path, rows, **change)
    assert err.value.fields == [field]
    message = str(err.value)
    assert f"  {field}: stored" in message and "rebuild=True" in message
    assert "trajectories.rebuild: true" in message and str(tmp_path) in message
    assert shard_bytes(tmp_path) == before  # nothing was touched

    collect(tmp_path, rows, rebuild=True, **change)
    collect(tmp_path / "fresh", rows, **change)
    got = TrajectoryCache(tmp_path).load("pool").to_list()
    assert got == TrajectoryCache(tmp_path / "fresh").load("pool").to_list()
    TrajectoryCache(tmp_path).check("pool", **_check_args(change))  # now consistent


def _check_args(change: dict) -> dict:
    args = {"model_fp": MODEL_FP, "data_fp": DATA_FP, "settings": SETTINGS}
    args.update(change)
    return args


def test_mismatch_is_found_in_shards_without_manifest(tmp_path: Path) -> None:
    """Ranks see foreign data through the shard footers alone (e.g. a deleted manifest)."""
    rows = make_rows(5)
    collect(tmp_path, rows)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CacheMismatchError, match="shard-00000.parquet") as err:
        collect(tmp_path, rows, data_fp="z" * 64)
    assert err.value.fields == ["data"]


def test_new_model_drops_other_splits(tmp_path: Path) -> None:
    cache = TrajectoryCache(tmp_path)
    policy = FakePolicy()
    cache.collect(
        "target/a", make_rows(4), policy.collector(), SETTINGS, MODEL_FP, DATA_FP, progress=False
    )
    with pytest.raises(CacheMismatchError, match=r"model: stored") as err:
        cache.check("pool", "n" * 64, DATA_FP, SETTINGS)
    assert err.value.fields == ["model"]
    collect(tmp_path, make_rows(4), model_fp="n" * 64, rebuild=True)
    assert set(cache.manifest()["splits"]) == {"pool"}
    with pytest.raises(TrajectoryCacheError, match="'target/a'"):
        cache.load("target/a")


def test_truncated_shard_after_completion_names_file(tmp_path: Path) -> None:
    rows = make_rows(7)
    collect(tmp_path, rows)
    cache = TrajectoryCache(tmp_path)
    shard = cache.path("pool") / "shard-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrajectoryCacheError, match=str(shard)):
        cache.load("pool")
    # collection repairs it: the footer is unreadable, so the shard is resampled
    collect(tmp_path, rows)
    assert shard.read_bytes() == data
    assert len(cache.load("pool")) == 7


def test_flipped_byte_fails_checksum(tmp_path: Path) -> None:
    collect(tmp_path, make_rows(4))
    cache = TrajectoryCache(tmp_path)
    shard = cache.path("pool") / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TrajectoryCacheError, match=f"{shard}.*corrupted"):
        cache.load("pool")


def test_missing_split_and_bad_names(tmp_path: Path) -> None:
    cache = TrajectoryCache(tmp_path)
    with pytest.raises(TrajectoryCacheError, match=f"'pool'.*{tmp_path}"):
        cache.load("pool")
    for bad in ("", "../x", "a//b", ".hidden"):
        with pytest.raises(ValueError, match="invalid split name"):
            cache.path(bad)
    assert cache.path("target/gsm8k").parent == cache.path("pool").parent
    assert cache.size_bytes("pool") == 0


def test_empty_split(tmp_path: Path) -> None:
    collect(tmp_path, make_rows(0))
    loaded = TrajectoryCache(tmp_path).load("pool")
    assert len(loaded) == 0 and set(loaded.column_names) >= {"completion_ids", "rewards"}


def test_bad_collector_output_names_prompt(tmp_path: Path) -> None:
    rows = make_rows(4)
    policy = FakePolicy()
    short = Collector(
        policy.sample,
        policy.score,
        lambda p, c: [lp[:-1] if i == 4 else lp for i, lp in enumerate(policy.logps(p, c))],
        policy.decode,
    )
    with pytest.raises(ValueError, match="prompt 'p1': sample 1 has"):
        TrajectoryCache(tmp_path).collect(
            "pool", rows, short, SETTINGS, MODEL_FP, DATA_FP, shard_size=4, progress=False
        )
    few = Collector(policy.sample, lambda r, c, k: [1.0], policy.logps, policy.decode)
    with pytest.raises(ValueError, match="1 rewards for 12 completions"):
        TrajectoryCache(tmp_path).collect(
            "pool", rows, few, SETTINGS, MODEL_FP, DATA_FP, shard_size=4, progress=False
        )
    dup = datasets.Dataset.from_dict(
        {"id": ["a", "b", "a"], "prompt": ["1"] * 3, "answer": ["1"] * 3}
    )
    with pytest.raises(ValueError, match="duplicate prompt id 'a'"):
        collect(tmp_path, dup)


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        SamplingSettings(0, 1.0, 1.0, 4, 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(2, 1.0, 0.0, 4, 0)


def policy(seed: int, vocab: int) -> LlamaForCausalLM:
    return tiny_llama(seed, vocab, width=32, layers=2, heads=4, max_positions=128)


def test_fingerprints() -> None:
    model = policy(0, VOCAB)
    fp = fingerprint_model(model)
    assert fp == fingerprint_model(policy(0, VOCAB))
    with torch.no_grad():
        p = model.model.layers[1].mlp.up_proj.weight
        p[3, 5] = torch.nextafter(p[3, 5], torch.tensor(1.0))  # one ulp of one weight
    assert fingerprint_model(model) != fp
    assert fingerprint_model(policy(0, VOCAB).to(torch.bfloat16)) != fp

    rows = make_rows(5)
    fp_rows = fingerprint_rows(rows)
    assert fp_rows == fingerprint_rows(make_rows(5))
    answers = rows["answer"]
    changed = rows.remove_columns("answer").add_column("answer", ["x", *answers[1:]])
    assert fingerprint_rows(changed) != fp_rows
    assert fingerprint_rows(rows.select([1, 0, 2, 3, 4])) != fp_rows
    with pytest.raises(ValueError, match="'answer'"):
        fingerprint_rows(rows.remove_columns("answer"))


def test_real_tiny_llama_collection(tmp_path: Path) -> None:
    """HF sampling end to end; stored log-probs equal a per-token brute-force log-softmax."""
    from cropi_pl.generation.hf import HFGenerateEngine
    from cropi_pl.policy.tokenizer import build_tokenizer
    from cropi_pl.rewards.numeric import ExactNumberReward
    from cropi_pl.tasks.arithmetic import generate_tasks

    tokenizer = build_tokenizer()
    model = policy(1, len(tokenizer))
    rows = generate_tasks(families=("add",), difficulties=(1,), num_per_cell=2, split="validation")
    settings = SamplingSettings(num_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=3)
    reward = ExactNumberReward()
    collector = Collector.for_model(
        model, PromptEncoder(tokenizer), HFGenerateEngine(), reward, settings
    )
    cache = TrajectoryCache(tmp_path)
    args = (settings, fingerprint_model(model), fingerprint_rows(rows))
    cache.collect("val", rows, collector, *args, shard_size=1, progress=True)
    loaded = cache.load("val").to_list()
    assert [r["id"] for r in loaded] == rows["id"]
    for row, got in zip(rows.to_list(), loaded, strict=True):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert got["prompt_ids"] == prompt
        for ids, lps, text, truncated, r in zip(
            got["completion_ids"],
            got["behaviour_logps"],
            got["texts"],
            got["truncated"],
            got["rewards"],
            strict=True,
        ):
            assert truncated == (tokenizer.eos_token_id not in ids)
            if truncated:
                assert len(ids) == settings.max_new_tokens
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
            assert r == reward([row["prompt"]], [text], [row["answer"]], [row])[0]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0].double()
            ref = [
                torch.log_softmax(logits[len(prompt) - 1 + t], -1)[tok].item()
                for t, tok in enumerate(ids)
            ]
            np.testing.assert_allclose(lps, ref, atol=1e-5, rtol=0)
    # resampling in a fresh cache (different shard layout) reproduces the same samples
    cache2 = TrajectoryCache(tmp_path / "again")
    cache2.collect("val", rows, collector, *args, shard_size=2, progress=False)
    assert cache2.load("val").to_list() == loaded


def test_resume_with_other_shard_size_drops_old_layout(tmp_path: Path) -> None:
    rows = make_rows(10)
    collect(tmp_path / "full", rows, shard_size=4)
    with pytest.raises(Killed):
        collect(tmp_path / "resumed", rows, FakePolicy(fail_after=4), shard_size=2)
    collect(tmp_path / "resumed", rows, shard_size=4)
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "full")


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_damaged_shard_of_a_complete_cache_is_recollected_alone(tmp_path: Path, damage) -> None:
    rows = make_rows(9)
    collect(tmp_path, rows)
    original = shard_bytes(tmp_path)
    manifest = TrajectoryCache(tmp_path).manifest()
    shard = TrajectoryCache(tmp_path).path("pool") / "shard-00001.parquet"
    if damage == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    cache = TrajectoryCache(tmp_path)
    assert cache.damaged_shards("pool") == ["shard-00001.parquet"]
    with pytest.raises(TrajectoryCacheError, match="tools/collect_trajectories.py"):
        cache.load("pool")
    policy = FakePolicy()
    repaired = cache.collect(
        "pool", rows, policy.collector(), SETTINGS, MODEL_FP, DATA_FP, progress=False
    )
    assert repaired == {"shard-00001.parquet": True}  # the same bytes as the original
    assert policy.sampled_ids == rows["id"][3:6]  # that shard's rows, nothing else
    assert shard_bytes(tmp_path) == original
    assert cache.manifest() == manifest
    assert cache.damaged_shards("pool") == []
