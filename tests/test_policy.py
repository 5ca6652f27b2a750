"""Embedded policy: tokenizer round-trip, shipped checkpoint, deterministic build, path resolution."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.policy.build import (
    PolicySpec,
    build_policy,
    embedded_policy_path,
    extract_answer,
    pass_rate_histogram,
    resolve_model_path,
)
from cropi_pl.policy.tokenizer import CHARACTERS, build_tokenizer

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


def test_build_policy_is_deterministic_in_the_seed(tmp_path):
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        out = build_policy(
            tmp_path / name,
            TINY,
            seed=seed,
            sft_steps=3,
            batch_size=4,
            train_per_cell=2,
            eval_per_cell=1,
            num_samples=2,
            progress=False,
        )
        return AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


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
    with pytest.raises(FileNotFoundError, match="embedded:nope.*tools/build_policy.py"):
        resolve_model_path("embedded:nope")
