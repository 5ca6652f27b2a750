"""The embedded starting policy: a character-level tokenizer and a tiny SFT-warmed Llama."""

from cropi_pl.policy.build import PolicySpec, build_policy, embedded_policy_path, resolve_model_path
from cropi_pl.policy.tokenizer import build_tokenizer

__all__ = [
    "PolicySpec",
    "build_policy",
    "build_tokenizer",
    "embedded_policy_path",
    "resolve_model_path",
]
