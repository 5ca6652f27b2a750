"""Embedded policy: tokenizer round-trip, shipped checkpoint, seeded build, path resolution."""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from cropi_pl.policy.build import (
    METADATA_FILE,
    PolicySpec,
    _collate,
    _encode_sft,
    build_policy,
    embedded_policy_path,
    extract_answer,
    pass_rate_histogram,
    pass_rates,
    per_cell_mean,
    resolve_model_path,
    with_guesses,
)
from cropi_pl.policy.tokenizer import CHARACTERS, build_tokenizer
from cropi_pl.tasks.arithmetic import generate_tasks
from cropi_pl.tasks.stepwise import StepwiseTasks

TINY = PolicySpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32)


def _random_text(rng: random.Random, length: int) -> str:
    # Extra weight on spaces and newlines: the characters a whitespace-splitting tokenizer loses.
    return "".join(rng.choice(CHARACTERS + (" ", "\n") * 10) for _ in range(length))


def test_tokenizer_round_trips_printable_text_and_saved_copy(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    rng = random.Random(torch.initial_seed())
    texts = [_random_text(rng, rng.randint(1, 60)) for _ in range(200)]
    texts += ["Q: 23+45\nA: ", "  leading and trailing  ", "\n\n", "Q: Ann has 3 pens\nA: 1 #### 1"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text), repr(text)  # one token per character, nothing added
        assert tokenizer.decode(ids) == text
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text


def test_tokenizer_special_ids_and_padding():
    tokenizer = build_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (0, 1)
    assert (tokenizer.eos_token_id, tokenizer.unk_token_id) == (2, 3)
    assert len(tokenizer) == 4 + 95 + 1
    assert tokenizer("\u00e9")["input_ids"] == [tokenizer.unk_token_id]
    batch = tokenizer(["Q: 1\nA: ", "Q: 12+3\nA: "], padding=True)
    assert batch["input_ids"][0][:3] == [0, 0, 0]  # left padding for generation
    assert batch["attention_mask"][0] == [0, 0, 0] + [1] * 8
    assert tokenizer.decode([5, 6, tokenizer.eos_token_id, 0], skip_special_tokens=True) == '!"'


def test_shipped_policy_loads_offline_and_answers_easy_prompts():
    path = resolve_model_path("embedded:tiny")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == 0
    assert model.num_parameters() < 2_000_000 and model.dtype == torch.float32
    prompts = ["Q: 2+3\nA: ", "Q: 7-4\nA: ", "Q: max(12,15)\nA: "]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=32, do_sample=False)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], True)
    assert all("####" in c for c in completions), completions
    assert extract_answer(completions[0]) == "5", completions


def test_shipped_policy_batched_left_padded_greedy_matches_one_prompt_at_a_time():
    path = resolve_model_path("embedded:tiny")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # Short and long prompts (unequal left padding); ones the policy solves and ones it cannot.
    tasks = generate_tasks(["add", "word", "mul"], [1, 4], num_per_cell=1, split="test")
    batched = pass_rates(model, tokenizer, tasks, max_new_tokens=40)
    expected = []
    for prompt, answer in zip(tasks["prompt"], tasks["answer"], strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        expected.append(float(extract_answer(tokenizer.decode(out[0, ids.shape[1] :])) == answer))
    assert batched == expected
    assert 0 < sum(expected) < len(expected), expected


def test_sft_loss_is_cross_entropy_on_completion_and_eos_only():
    tokenizer = build_tokenizer()
    tasks = generate_tasks(["add", "word"], [1, 3], num_per_cell=2, seed=int(torch.randint(99, ())))
    examples = _encode_sft(tokenizer, tasks)
    batch = _collate(examples, tokenizer.pad_token_id)
    model = LlamaForCausalLM(TINY.config(tokenizer)).eval()
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for row, (ids, prompt_len) in enumerate(examples):
        assert tokenizer.decode(ids[prompt_len:-1]) == tasks[row]["solution"]
        assert ids[-1] == tokenizer.eos_token_id
        for t in range(prompt_len, len(ids)):  # predict token t from position t - 1
            total -= torch.log_softmax(logits[row, t - 1].double(), -1)[ids[t]].item()
            count += 1
    torch.testing.assert_close(
        loss.double(), torch.tensor(total / count).double(), atol=1e-5, rtol=0
    )


def test_per_cell_mean_matches_explicit_loops():
    tasks = generate_tasks(["add", "mod"], [1, 2, 4], num_per_cell=3, split="validation")
    values = torch.rand(len(tasks)).tolist()
    means = per_cell_mean(tasks, values)
    for family in ("add", "mod"):
        for difficulty in (1, 2, 4):
            picked = [
                v
                for v, row in zip(values, tasks, strict=True)
                if row["family"] == family and row["difficulty"] == difficulty
            ]
            assert means[family][str(difficulty)] == pytest.approx(sum(picked) / len(picked))


@pytest.mark.parametrize("tasks", ["arithmetic", "stepwise"])
def test_build_policy_is_deterministic_in_the_seed(tmp_path, tasks):
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        out = build_policy(
            tmp_path / name,
            TINY,
            seed=seed,
            sft_steps=3,
            batch_size=4,
            train_per_cell=2,
            eval_per_cell=0,
            progress=False,
            tasks=tasks,
        )
        assert json.loads((out / METADATA_FILE).read_text())["tasks"] == tasks
        return AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_shipped_stepwise_policy_executes_steps_and_leaves_room_to_learn():
    """The testbed's policy writes worked steps, and its recorded sampled pass rates are spread
    between 0 and 1 (GRPO needs prompts it sometimes solves); it ships under 20 MB."""
    path = Path(resolve_model_path("embedded:stepwise"))
    assert sum(f.stat().st_size for f in path.iterdir()) < 20e6
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["tasks"] == "stepwise" and meta["wall_seconds"] < 15 * 60
    assert meta["guess_fraction"] == 0.25  # it sometimes guesses: GRPO learns to work the steps
    stats = meta["stats"]
    assert 0.2 < stats["sampled_pass_rate"] < 0.8 and stats["fraction_mixed"] > 0.4
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tasks = StepwiseTasks(families=["add", "mul"], difficulties=[2], num_per_cell=4).load()
    greedy = pass_rates(model, tokenizer, tasks, max_new_tokens=72)
    assert sum(greedy) >= 4, greedy


def test_extract_answer_and_histogram_buckets():
    assert extract_answer("3+4=7 #### 7") == "7"
    assert extract_answer("9-12=-3 ####-3 #### 5") == "-3"
    assert extract_answer("3+4=7") is None
    rates = [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1]
    expected = {"0": 1, "(0,0.25]": 2, "(0.25,0.5]": 2, "(0.5,0.75]": 2, "(0.75,1)": 1, "1": 2}
    assert pass_rate_histogram(rates) == expected


def test_resolve_model_path():
    assert resolve_model_path("some/hub-model") == "some/hub-model"
    assert resolve_model_path("embedded:tiny") == str(embedded_policy_path())
    assert resolve_model_path("embedded:stepwise") == str(embedded_policy_path("stepwise-policy"))
    with pytest.raises(FileNotFoundError, match="embedded:nope.*tools/build_policy.py"):
        resolve_model_path("embedded:nope")


def test_bad_spec_and_budget_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        PolicySpec(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        PolicySpec(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="sft_steps"):
        build_policy(tmp_path, TINY, sft_steps=0, progress=False)


def test_with_guesses_replaces_a_seeded_share_of_solutions_by_the_bare_answer():
    tasks = StepwiseTasks(num_per_cell=40, split="train").load()
    mixed = with_guesses(tasks, 0.5, seed=3)
    guessed = [s == f"#### {a}" for s, a in zip(mixed["solution"], tasks["answer"], strict=True)]
    assert 0.4 < sum(guessed) / len(tasks) < 0.6
    kept = [s for s, g in zip(mixed["solution"], guessed, strict=True) if not g]
    assert kept == [s for s, g in zip(tasks["solution"], guessed, strict=True) if not g]
    assert mixed["solution"] == with_guesses(tasks, 0.5, seed=3)["solution"]
    assert mixed["solution"] != with_guesses(tasks, 0.5, seed=4)["solution"]
    assert with_guesses(tasks, 0.0, seed=3)["solution"] == tasks["solution"]
    with pytest.raises(ValueError, match="guess fraction"):
        with_guesses(tasks, 1.0, seed=0)


def test_with_guesses_per_family_fractions():
    """Named families get their own share of bare answers; the others keep the default."""
    tasks = StepwiseTasks(num_per_cell=60, split="train").load()
    mixed = with_guesses(tasks, 0.05, seed=1, by_family={"mul": 0.6, "mod": 0.0})
    share: dict[str, list[bool]] = {}
    for family, solution, answer in zip(
        tasks["family"], mixed["solution"], tasks["answer"], strict=True
    ):
        share.setdefault(family, []).append(solution == f"#### {answer}")
    rate = {family: sum(g) / len(g) for family, g in share.items()}
    assert 0.45 < rate["mul"] < 0.75 and rate["mod"] == 0.0
    assert all(0.0 < rate[f] < 0.15 for f in ("add", "sub", "cmp", "word")), rate
    assert with_guesses(tasks, 0.0, seed=1, by_family={"mul": 0.0})["solution"] == tasks["solution"]
    for fraction, div in ((0.1, 0.5), (0.0, 0.0)):  # a misspelt family fails even at zero
        with pytest.raises(ValueError, match=r"families \['div'\]"):
            with_guesses(tasks, fraction, seed=1, by_family={"div": div})
    with pytest.raises(ValueError, match="family 'mul'"):
        with_guesses(tasks, 0.1, seed=1, by_family={"mul": 1.5})


def test_family_fraction_argument_parses_family_equals_fraction():
    """``--family-guess-fraction`` items: ``FAMILY=FRACTION`` or an argparse error naming it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from build_policy import family_fraction

    fraction = random.random()
    assert family_fraction(f"mul={fraction}") == ("mul", fraction)
    for bad in ("mul", "mul=", "=0.5", "mul=x", "mul=0.5=1"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(bad))):
            family_fraction(bad)
