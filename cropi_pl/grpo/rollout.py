"""Packing sampled completions into right-padded training tensors and scoring them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from cropi_pl.grpo.losses import selective_log_softmax, token_entropy


@dataclass
class PackedBatch:
    """``input_ids`` (B, L) = prompt + completion + right padding; ``mask`` (B, L-1) marks the
    shifted positions whose target token is a completion token."""

    input_ids: Tensor
    mask: Tensor

    def rows(self, index: slice | Tensor) -> PackedBatch:
        """A micro-batch (a slice or a tensor of row indices), trimmed to its longest real
        sequence to save compute."""
        mask = self.mask[index]
        width = int(mask.any(0).nonzero().max()) + 2 if mask.any() else 2
        return PackedBatch(self.input_ids[index, :width], mask[:, : width - 1])

    def micro_batches(self, size: int) -> list[Tensor]:
        """Row indices of micro-batches of at most ``size`` rows. With more than one, rows go in
        order of their real length (prompt + completion), so each micro-batch, trimmed to its own
        longest row, pads little: one long prompt with a long completion no longer pads every
        row to its width. A batch that fits in one micro-batch keeps its order (same sums)."""
        count = self.mask.shape[0]
        if size >= count:
            return [torch.arange(count)]
        positions = torch.arange(1, self.mask.shape[1] + 1)
        ends = (self.mask.bool() * positions).amax(dim=1)  # last completion target, 0 if none
        return list(torch.argsort(ends, stable=True).split(size))


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> PackedBatch:
    """Right-pad ``prompt + completion`` rows; no attention mask is needed (causal attention)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width - 1)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return PackedBatch(ids, mask)


def pack_token_values(
    prompts: list[list[int]], values: list[list[float]], shape: torch.Size | tuple[int, int]
) -> Tensor:
    """Per-completion-token values (e.g. the engine's log-probs) at the positions :func:`pack`
    marks in its mask; NaN everywhere else."""
    if len(prompts) != len(values):
        raise ValueError(f"{len(prompts)} prompts but {len(values)} value lists")
    out = torch.full(tuple(shape), float("nan"))
    for i, (p, v) in enumerate(zip(prompts, values, strict=True)):
        out[i, len(p) - 1 : len(p) + len(v) - 1] = torch.tensor(v, dtype=out.dtype)
    return out


def token_logps(
    model: nn.Module, batch: PackedBatch, entropy: Literal["none", "detached", "grad"] = "none"
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of each next token (B, L-1), float32, and optionally entropies.

    ``entropy="detached"`` computes entropies for logging without adding them to the graph.
    """
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    logits = model(input_ids=ids).logits[:, :-1]
    logp = selective_log_softmax(logits, ids[:, 1:])
    if entropy == "none":
        return logp, None
    return logp, token_entropy(logits if entropy == "grad" else logits.detach())
