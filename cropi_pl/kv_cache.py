"""The keyword of an HF causal LM's KV cache, which transformers renamed.

Two places run a prompt once and continue its rows from its KV cache: generation
(:mod:`cropi_pl.generation.hf`) and the influence pass (:mod:`cropi_pl.influence.popi`), both
under the option ``share_prompt_cache``. The main environment has transformers 5.2x, the vLLM one
an older release.
"""

from __future__ import annotations

import inspect

from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The forward argument and output field holding the KV cache: ``cache`` since transformers
    5.2x, ``past_key_values`` before (the vLLM environment pins an older transformers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
