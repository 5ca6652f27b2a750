"""The trained policy as a Hugging Face folder that transformers and vLLM load directly.

A Lightning checkpoint holds the policy inside the module's state dict (``policy.`` keys, and
under FSDP2 sharded over ranks); users want ``from_pretrained(folder)``. :class:`HFExport`
writes that folder at the end of ``fit`` (``<default_root_dir>/hf_model`` by default) and
``tools/export_hf.py`` writes it from any checkpoint of the module.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from cropi_pl.atomic import atomic_directory
from cropi_pl.checkpointing import verify_checkpoint

DCP_METADATA = "meta.pt"  # what Lightning writes next to a distributed checkpoint's shards
POLICY_PREFIX = "policy."


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``model`` whole and on the CPU, tied parameters as one tensor.

    Under FSDP2 (DTensor parameters) this gathers the shards: a collective every rank must
    enter; rank 0 receives the tensors, the other ranks an empty dict.
    """
    if any(isinstance(p, DTensor) for p in model.parameters()):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    # Gathering (or a copy off the GPU) makes one tensor per name; give a tied parameter's
    # names one tensor again, so save_pretrained sees the tie and writes it once.
    names_by_param: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param[id(param)].append(name)
    for first, *aliases in names_by_param.values():
        for alias in aliases:
            if first in state and alias in state:
                state[alias] = state[first]
    return state


def save_hf_folder(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike[str],
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` (config, generation config, safetensors) and ``tokenizer`` to ``out``.

    ``state_dict`` replaces the model's own tensors (pass :func:`full_state_dict`'s result for a
    sharded model). The folder is written next to ``out`` and renamed into place, so an
    interrupted export leaves the previous folder (or none), never a partial one.
    """
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)


class HFExport(L.Callback):
    """At the end of ``fit``, write the policy and tokenizer as an HF folder in the run directory.

    Args:
        folder: where, relative to ``trainer.default_root_dir`` (an absolute path is used as
            is); ``None`` turns the export off.
    """

    def __init__(self, folder: str | None = "hf_model") -> None:
        self.folder = folder

    def path(self, trainer: L.Trainer) -> Path | None:
        return None if self.folder is None else Path(trainer.default_root_dir) / self.folder

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.path(trainer)
        policy = getattr(pl_module, "policy", None)
        if out is None or policy is None:
            return
        state = full_state_dict(policy)  # every rank: a collective under FSDP2
        if trainer.is_global_zero:
            save_hf_folder(policy, pl_module.tokenizer, out, state)
            rank_zero_info(f"Exported the policy and tokenizer to {out}")
        trainer.strategy.barrier("hf_export")


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """(everything but the tensors, the policy tensors) of a file checkpoint; for a distributed
    (FSDP2) checkpoint folder the tensors are ``None``: they are loaded into the model later."""
    verify_checkpoint(path)
    try:
        if path.is_dir():
            if not (path / DCP_METADATA).is_file():
                raise ValueError(f"no {DCP_METADATA}: not a Lightning distributed checkpoint")
            return torch.load(path / DCP_METADATA, map_location="cpu", weights_only=True), None
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is not a readable Lightning checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    tensors = {
        k[len(POLICY_PREFIX) :]: v
        for k, v in checkpoint.pop("state_dict").items()
        if k.startswith(POLICY_PREFIX)
    }
    return checkpoint, tensors


def _module_class(hparams: dict[str, Any], path: Path) -> type[L.LightningModule]:
    from cropi_pl.grpo.module import GRPOModule

    class_path = hparams.get("_class_path", "cropi_pl.grpo.module.GRPOModule")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{path}: cannot import its module class {class_path}") from error
    if not (isinstance(cls, type) and issubclass(cls, GRPOModule)):
        raise ValueError(f"{path} is a checkpoint of {class_path}, not of cropi_pl's GRPOModule")
    return cls


def module_from_checkpoint(path: str | os.PathLike[str]) -> L.LightningModule:
    """A ``GRPOModule`` (or subclass) rebuilt from a checkpoint's hyperparameters, holding its
    policy weights; file checkpoints and FSDP2 distributed checkpoint folders alike.

    Rewards, engine and optimizer are not part of a checkpoint's hyperparameters and get their
    defaults: the result is for exporting and evaluating the policy, not for resuming.
    """
    path = Path(path)
    checkpoint, tensors = _read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "model" not in hparams:
        raise ValueError(
            f"{path} is not a checkpoint of cropi_pl's GRPOModule: its hyper_parameters "
            f"{'are missing' if hparams is None else 'name no model'}"
        )
    cls = _module_class(hparams, path)
    accepted = inspect.signature(cls.__init__).parameters
    module = cls(**{k: v for k, v in hparams.items() if k in accepted})
    module.configure_model()
    policy = module.policy
    if tensors is None:
        state = {"state_dict": {POLICY_PREFIX + k: v for k, v in policy.state_dict().items()}}
        dcp.load(state, checkpoint_id=path, no_dist=True)
        return module
    if not tensors:
        raise ValueError(f"{path} holds no '{POLICY_PREFIX}*' tensors: not a GRPOModule checkpoint")
    policy.to(next(iter(tensors.values())).dtype)  # keep the trained dtype (bf16-true runs)
    policy.load_state_dict(tensors, strict=True)
    return module


def export_checkpoint(ckpt: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a module checkpoint's policy and tokenizer as an HF folder at ``out``."""
    module = module_from_checkpoint(ckpt)
    return save_hf_folder(module.policy, module.tokenizer, out)
