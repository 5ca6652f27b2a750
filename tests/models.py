"""Tiny random Llama policies for tests: one builder, so fixtures differ only in what they say."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
    """A tiny random Llama over the embedded character tokenizer, with its special token ids."""
    tokenizer = build_tokenizer()
    return tiny_llama(
        seed,
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
