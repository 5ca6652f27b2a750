"""The vLLM engine, run for real (CPU build of vLLM; ``tools/run_tests.sh`` runs these).

Deselected from the default run (``-m 'not vllm'``): vLLM pins its own transformers, so these run
in the environment ``tools/vllm_venv.sh`` builds. Nothing here is skipped: without vLLM they fail.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.generation.engine import mark_weights_updated
from cropi_pl.generation.vllm import VLLMEngine
from cropi_pl.grpo.rollout import pack, token_logps
from cropi_pl.policy.build import resolve_model_path
from tests.cli_utils import ROOT, event_tags, run_cli_process

pytestmark = pytest.mark.vllm

PATH = resolve_model_path("embedded:tiny")
VLLM_CONFIG = ROOT / "configs" / "engine" / "vllm.yaml"
CROPI = ROOT / "tests" / "configs" / "cropi_test.yaml"
PARITY = 1e-4  # max |engine log-prob - trainer log-prob| of a sampled token
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(PATH)


@pytest.fixture(scope="module")
def engine():
    """One in-process engine for the module (start-up costs seconds)."""
    return VLLMEngine(max_model_len=160)


def _policy() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()


def _long_prompts(tokenizer, count: int = 2) -> list[list[int]]:
    """Prompts longer than one 128-token KV block, so a stale prefix cache would show."""
    text = "Q: 12+34=? A: 12+34=46 #### 46\n" * 8
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    question = tokenizer("Q: 7*8=?\nA: ", add_special_tokens=False)["input_ids"]
    return [ids[: 130 + 3 * i] + question for i in range(count)]


def _sample(engine, model, tokenizer, prompts, seeds, num_samples=2):
    return engine.generate(
        model,
        prompts,
        num_samples=num_samples,
        max_new_tokens=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seeds=seeds,
    )


def _max_gap(model, prompts, completions, num_samples=2) -> float:
    """Largest |engine log-prob - teacher-forced log-prob of ``model``| over sampled tokens."""
    rows = [p for p in prompts for _ in range(num_samples)]
    batch = pack(rows, [c.ids for c in completions], 0)
    with torch.no_grad():
        logp, _ = token_logps(model, batch)
    engine = torch.zeros_like(logp)
    for i, (p, c) in enumerate(zip(rows, completions, strict=True)):
        engine[i, len(p) - 1 : len(p) - 1 + len(c.ids)] = torch.tensor(c.logprobs)
    return float(((engine - logp) * batch.mask).abs().max())


def _perturb_and_step(model, prompts) -> None:
    """Perturb every weight, then take an AdamW step, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(input_ids=torch.tensor(prompts[:1])).logits.logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    mark_weights_updated(model)


def test_push_after_optimizer_step_gives_logprob_parity(engine, tokenizer):
    policy = _policy()
    prompts = _long_prompts(tokenizer)
    seeds = [11, 12, 13, 14]
    before = _sample(engine, policy, tokenizer, prompts, seeds)
    first = _max_gap(policy, prompts, before)
    assert first <= PARITY
    assert all(c.ids for c in before) and min(len(p) for p in prompts) > 128
    old = copy.deepcopy(policy)
    _perturb_and_step(policy, prompts)
    after = _sample(engine, policy, tokenizer, prompts, seeds)
    gap = _max_gap(policy, prompts, after)
    stale = _max_gap(old, prompts, after)
    lengths = [len(p) for p in prompts]
    print(f"prompt lengths {lengths}: parity at start {first:.2e}, after a step {gap:.2e}, ")
    print(f"against the stale weights {stale:.2e}")
    assert gap <= PARITY
    assert stale > 100 * PARITY  # the weights did change: stale weights would fail the check


def test_push_happens_once_per_weight_change(engine, tokenizer):
    policy = _policy()
    prompts = _long_prompts(tokenizer, 1)
    start = engine.num_pushes
    for _ in range(3):  # validation, collection, rollouts between two steps: one push
        _sample(engine, policy, tokenizer, prompts, [1, 2])
    assert engine.num_pushes == start + 1
    _perturb_and_step(policy, prompts)
    for _ in range(2):
        out = _sample(engine, policy, tokenizer, prompts, [1, 2])
    assert engine.num_pushes == start + 2
    assert _max_gap(policy, prompts, out) <= PARITY
    other = _policy()  # another model object (e.g. the behaviour policy): pushed as well
    _sample(engine, other, tokenizer, prompts, [1, 2])
    assert engine.num_pushes == start + 3


def test_same_seeds_same_completions_in_any_batch(engine, tokenizer):
    policy = _policy()
    prompts = _long_prompts(tokenizer, 3)
    seeds = list(range(100, 106))
    full = _sample(engine, policy, tokenizer, prompts, seeds)
    # The last prompt alone, and in reverse order with the others: same seeds, same completions.
    alone = _sample(engine, policy, tokenizer, prompts[2:], seeds[4:])
    reordered = _sample(
        engine, policy, tokenizer, prompts[::-1], seeds[4:] + seeds[2:4] + seeds[:2]
    )
    assert [c.ids for c in alone] == [c.ids for c in full[4:]]
    assert [c.ids for c in reordered] == [c.ids for c in full[4:] + full[2:4] + full[:2]]
    again = _sample(engine, policy, tokenizer, prompts, seeds)
    assert [c.ids for c in again] == [c.ids for c in full]
    other = _sample(engine, policy, tokenizer, prompts, [s + 1000 for s in seeds])
    assert [c.ids for c in other] != [c.ids for c in full]


def test_fsdp2_policy_is_gathered_one_parameter_at_a_time(engine, tokenizer):
    from torch.distributed.device_mesh import init_device_mesh

    from cropi_pl.sharding import shard_per_layer

    if not dist.is_initialized():  # the engine fixture usually initialised a 1-rank group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
    policy = _policy()
    _perturb_and_step(policy, _long_prompts(tokenizer, 1))
    reference = copy.deepcopy(policy)
    sharded = shard_per_layer(policy, init_device_mesh("cpu", (1,)))
    assert any(type(p).__name__ == "DTensor" for p in sharded.parameters())
    prompts = _long_prompts(tokenizer)
    out = _sample(engine, sharded, tokenizer, prompts, [5, 6, 7, 8])
    gap = _max_gap(reference, prompts, out)
    print(f"FSDP2 policy: parity {gap:.2e}")
    assert gap <= PARITY


def test_separate_process_engine_matches_in_process(engine, tokenizer):
    policy = _policy()
    prompts = _long_prompts(tokenizer)
    seeds = [21, 22, 23, 24]
    separate = VLLMEngine(max_model_len=160, separate_process=True, push_bucket_mb=1)
    try:
        first = _sample(separate, policy, tokenizer, prompts, seeds)
        assert _max_gap(policy, prompts, first) <= PARITY
        _perturb_and_step(policy, prompts)
        after = _sample(separate, policy, tokenizer, prompts, seeds)
        assert separate.num_pushes == 2
        gap = _max_gap(policy, prompts, after)
        print(f"separate process: start-up {separate.startup_seconds:.1f}s, parity {gap:.2e}")
        assert gap <= PARITY
        # Same seeds, same weights: the two engines sample the same tokens.
        local = _sample(engine, policy, tokenizer, prompts, seeds)
        assert [c.ids for c in local] == [c.ids for c in after]
    finally:
        separate.close()


def test_grpo_fit_through_the_cli(tmp_path: Path):
    """Rollouts and validation through vLLM; the logged engine-vs-trainer gap proves each step's
    rollouts came from that step's weights (a missed push would show a gap of order 1)."""
    run_cli_process(
        "fit",
        "--config",
        str(VLLM_CONFIG),
        "--model.init_args.vllm_importance_sampling_correction=true",
        run_dir=tmp_path,
        timeout=600,
    )
    tags = event_tags(tmp_path)
    gaps = tags["sampling/sampling_logp_difference/max"]
    assert len(gaps) == 4 and max(gaps) <= PARITY
    assert all(abs(r - 1) <= 1e-3 for r in tags["sampling/importance_sampling_ratio/mean"])
    assert "val/targeted/accuracy" in tags
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_trajectory_collection_through_the_cli_is_seeded(tmp_path: Path):
    tables = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        run_cli_process(
            "--config",
            str(VLLM_CONFIG),
            run_dir=run_dir,
            config=CROPI,
            timeout=600,
            script=ROOT / "tools" / "collect_trajectories.py",
        )
        shards = sorted((run_dir / "trajectories").rglob("*.parquet"))
        assert shards, f"no trajectory shards under {run_dir}"
        tables.append({s.relative_to(run_dir): pq.read_table(s).to_pydict() for s in shards})
    assert tables[0] == tables[1]  # same seeds: the same completions, rewards and log-probs
    columns = next(iter(tables[0].values()))
    assert columns and any(len(c) for c in columns.values())
