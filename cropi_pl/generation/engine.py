"""The engine interface the GRPO module samples through.

Engines receive token ids and return token ids, so the trainer owns tokenisation and an engine can
be swapped (HF ``generate`` on any device, vLLM on CUDA) without touching the loss code.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn


@dataclass
class Completion:
    """One sampled completion; ``truncated`` means no end-of-sequence within the length budget."""

    ids: list[int]
    truncated: bool


def row_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of its parts (no salted ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
