"""Fingerprints of what stored trajectories depend on: the model's weights and the prompt rows.

The trajectory cache refuses data sampled from another model or data set by comparing these.
"""

from __future__ import annotations

import hashlib
import json

import datasets
import torch
from torch import nn
from torch.distributed.tensor import DTensor


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over state_dict names, shapes, dtypes and bytes.

    Sharded (DTensor) entries are gathered with ``full_tensor()``, a collective: call this on
    every rank. Renamed modules (e.g. ``torch.compile``'s ``_orig_mod.``) change the fingerprint.
    """
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if value.is_meta:
            raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device")
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint_rows(ds: datasets.Dataset) -> str:
    """sha256 over (id, prompt, answer) in row order: what the stored samples depend on."""
    missing = [c for c in ("id", "prompt", "answer") if c not in ds.column_names]
    if missing:
        raise ValueError(f"fingerprint_rows: dataset lacks columns {missing} ({ds.column_names})")
    digest = hashlib.sha256()
    columns = ds.select_columns(["id", "prompt", "answer"]).to_dict()
    for row in zip(columns["id"], columns["prompt"], columns["answer"], strict=True):
        digest.update(json.dumps([str(v) for v in row]).encode() + b"\n")
    return digest.hexdigest()
