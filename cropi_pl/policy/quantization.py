"""A frozen model loaded in 8 or 4 bits with bitsandbytes (the KL reference needs no gradients).

An 8-bit reference holds about a quarter of the float32 bytes (half of bf16), a 4-bit (NF4) one
about an eighth, at the price of a small error in the reference log-probs: the KL penalty then
measures the distance to a slightly perturbed reference.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

ReferenceQuantization = Literal["8bit", "4bit"]


def load_quantized(
    path: str, quantization: ReferenceQuantization, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Load ``path`` with its linear layers quantized, placed on ``device``, for inference only.

    Raises a ``RuntimeError`` naming the missing piece when bitsandbytes is absent or has no
    backend for ``device``.
    """
    if quantization not in ("8bit", "4bit"):
        raise ValueError(
            f"reference_quantization must be null, '8bit' or '4bit', got {quantization!r}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"reference_quantization={quantization!r} needs bitsandbytes: "
            "`pip install bitsandbytes` (or the `gpu` extra), or set reference_quantization: null"
        )
    import bitsandbytes

    supported = getattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    if device.type not in supported:
        raise RuntimeError(
            f"reference_quantization={quantization!r}: bitsandbytes {bitsandbytes.__version__} "
            f"has no {device.type!r} backend (supported: {sorted(supported)}); "
            "set reference_quantization: null"
        )
    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    place = device.index if device.type == "cuda" and device.index is not None else device.type
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=config, device_map={"": place}
    )
