"""The engine interface the GRPO module samples through.

Engines receive token ids and return token ids, so the trainer owns tokenisation and an engine can
be swapped (HF ``generate`` on any device, vLLM on CUDA or a CPU build) without touching the loss
code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

_WEIGHTS_VERSION = "_cropi_weights_version"


@dataclass
class Completion:
    """One sampled completion; ``truncated`` means no end-of-sequence within the length budget.

    ``logprobs`` holds the engine's log-probability of each sampled token under the raw model
    distribution (before temperature and top-p), one per entry of ``ids``, when the engine reports
    them (vLLM does, HF ``generate`` does not); the trainer compares them with its own to correct
    an engine-vs-trainer mismatch.
    """

    ids: list[int]
    truncated: bool
    logprobs: list[float] | None = None


def mark_weights_updated(model: nn.Module) -> None:
    """Record that ``model``'s weights changed (call after every optimizer step).

    Engines holding their own copy of the weights (vLLM) push again only when this counter moved,
    so validation and collection calls between two steps cost no transfer. Parameter version
    counters alone cannot tell: fused optimizers and bitsandbytes write through ``.data``.
    """
    setattr(model, _WEIGHTS_VERSION, weights_version(model) + 1)


def weights_version(model: nn.Module) -> int:
    """How many times :func:`mark_weights_updated` was called on ``model``."""
    return getattr(model, _WEIGHTS_VERSION, 0)


class GenerationEngine(ABC):
    """Samples completions for prompts given as token ids.

    ``seeds`` has one entry per returned completion (prompt-major): engines that honour it make each
    completion a function of its own seed alone, independent of batch composition and rank layout.
    """

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_id: int,
        pad_token_id: int,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        """Return ``len(prompts) * num_samples`` completions, grouped by prompt.

        ``temperature == 0`` means greedy decoding.
        """
