"""Tiny random Llama policies for tests: one builder, so fixtures differ only in what they say."""

from __future__ import annotations

import torch
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
