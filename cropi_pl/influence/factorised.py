"""LoGra-style factorised projection of per-prompt POPI gradients of linear layers."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from cropi_pl.influence.gradients import HookedCalls, hooked_backward, segment_outer
from cropi_pl.influence.popi import POPIConfig, collate, gradient_mode, plan_batches, vocab_size_of
from cropi_pl.influence.trajectories import PromptTrajectories
from cropi_pl.seeding import derive_seed


class FactorisedProjection:
    """LoGra-style projection of POPI gradients of ``nn.Linear`` weights, never forming a gradient.

    For a linear layer y = x W^T the weight gradient of a prompt is G = sum_tokens g x^T with
    g = dL/dy, so its projection with the Kronecker product of P_out (out x k_out) and P_in
    (in x k_in) is
        vec(G) @ kron(P_out, P_in) = vec(P_out^T G P_in) = sum_tokens outer(P_out^T g, P_in^T x),
    built from the layer inputs (forward hooks) and output gradients (autograd with respect to the
    hooked outputs) in k_out * k_in numbers per layer: the d-dimensional gradient never exists.
    All prompts of a batch share one ordinary forward/backward of their distinct responses as
    (R, T) rows: rows never interact, so each row's activation gradient is its own prompt's.
    Biases are not projected (LoGra's convention). P_in and P_out are Gaussian / sqrt(k) from a
    CPU generator seeded by (seed, layer name), identical on every machine. Output layout: layers
    in ``layer_names`` order (``offsets``), each flattened row-major as (k_out, k_in).
    """

    def __init__(
        self,
        model: nn.Module,
        config: POPIConfig,
        k_in: int,
        k_out: int,
        seed: int = 0,
        module_filter: str | None = None,
        prompts_per_batch: int = 8,
    ) -> None:
        if k_in < 1 or k_out < 1 or prompts_per_batch < 1:
            raise ValueError(
                f"k_in, k_out and prompts_per_batch must be >= 1, got {k_in}, {k_out}, "
                f"{prompts_per_batch}"
            )
        self.model = model
        self.config = config
        self.prompts_per_batch = prompts_per_batch
        pattern = re.compile(module_filter) if module_filter is not None else None
        self._layers = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (pattern is None or pattern.search(name))
        }
        if not self._layers:
            raise ValueError(
                f"module_filter {module_filter!r} matches no nn.Linear of {type(model).__name__}"
            )
        self.layer_names: list[str] = list(self._layers)
        self.projections: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in self._layers.items():
            gen = torch.Generator().manual_seed(derive_seed("factorised", seed, name))
            p_in = torch.randn(layer.in_features, k_in, generator=gen) / k_in**0.5
            p_out = torch.randn(layer.out_features, k_out, generator=gen) / k_out**0.5
            device = layer.weight.device
            self.projections[name] = (p_in.to(device), p_out.to(device))
        self.offsets = {name: j * k_in * k_out for j, name in enumerate(self.layer_names)}
        self.dim: int = len(self.layer_names) * k_in * k_out
        self._vocab_size = vocab_size_of(model)

    def project(
        self, trajs: Sequence[PromptTrajectories], summed: bool = False
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (indices into trajs, (p, dim) float32 projected gradients) for non-zero prompts;
        with ``summed``, (1, dim): their sum, each layer's calls summed as one prompt's."""
        with gradient_mode(self.model, self.config):
            for indices in plan_batches(trajs, self._vocab_size, self.prompts_per_batch):
                yield indices, self._project_batch([trajs[i] for i in indices], summed)

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The linear layers whose (input, output gradient) calls ``project_calls`` needs."""
        return dict(self._layers)

    def _project_batch(self, trajs: list[PromptTrajectories], summed: bool) -> Tensor:
        device = next(iter(self._layers.values())).weight.device
        block = collate(trajs, device, self.config.deduplicate)
        hooked = hooked_backward(self.model, self._layers, block, self.config)
        return self.project_calls(hooked.merged() if summed else hooked)

    def project_calls(self, hooked: HookedCalls) -> Tensor:
        """(p, dim) projections from ``hooked_backward``'s calls of (at least) ``layers``."""
        p, pieces = len(hooked.sizes[0]), []
        for name in self.layer_names:
            p_in, p_out = self.projections[name]
            piece = p_in.new_zeros(p, p_out.shape[1], p_in.shape[1])
            for x, g, forward in hooked.calls[name]:  # a layer called several times adds each
                sizes = hooked.sizes[forward]
                segment_outer(g.float() @ p_out, x.float() @ p_in, sizes, piece)
            pieces.append(piece.reshape(p, -1))
        return torch.cat(pieces, dim=1)
