"""Process layout and FSDP2 sharding applied from ``configure_model`` (same code path on CPU/gloo
and on GPUs)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks: the natural FSDP unit (one all-gather per block)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(
            f"found no '*DecoderLayer' modules in {type(model).__name__}; cannot shard per layer"
        )
    return layers


def shard_per_layer(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, norm, head)."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
