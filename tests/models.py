"""Tiny random Llama policies for tests: one builder, so fixtures differ only in what they say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM

from cropi_pl.policy.build import PolicySpec
from cropi_pl.policy.tokenizer import build_tokenizer


def tiny_llama(
    seed: int,
    vocab_size: int,
    *,
    width: int = 16,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 2,
    max_positions: int = 64,
    **overrides: object,
) -> LlamaForCausalLM:
    """A seeded random Llama in eval mode (MLP width ``2 * width``)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        **overrides,
    )
    return LlamaForCausalLM(config).float().eval()


def tiny_char_llama(seed: int) -> LlamaForCausalLM:
    """A tiny random Llama over the embedded character tokenizer, built as the shipped policy is."""
    spec = PolicySpec(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=32,
        max_positions=64,
        tie_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(spec.config(build_tokenizer())).eval()


# A ChatML-like template in the style of SmolLM2/Qwen (system turn only when given), opening with
# the BOS token the way Llama-3 and Gemma templates do, so BOS handling is exercised.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(*, chat_template: bool = False, adds_bos: bool = False) -> Any:
    """The embedded character tokenizer, optionally with a chat template and/or a BOS that
    ``add_special_tokens`` prepends (as Llama tokenizers do)."""
    tokenizer = build_tokenizer()
    if adds_bos:
        bos = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
        )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_chat_policy(folder: Path, seed: int = 0) -> Path:
    """A tiny random char-level Llama whose tokenizer has :data:`CHAT_TEMPLATE`, saved as an HF
    folder the CLI can load with ``model: <folder>``."""
    tokenizer = char_tokenizer(chat_template=True)
    model = tiny_char_llama(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
