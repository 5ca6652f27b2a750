"""Per-GPU memory of the model state in a GRPO run under FSDP2, from the model config alone.

The model is built on the meta device (no weights, nothing downloaded) to count parameters; the
bytes follow from how each piece is stored:

* policy: float32 master weights and float32 gradients, sharded over the GPUs (bf16-mixed keeps
  float32 masters; FSDP2 gathers one decoder layer at a time in bf16 for compute);
* optimizer: AdamW's two float32 moments, sharded; an 8-bit AdamW keeps one byte per moment for
  tensors of at least 4096 elements plus one float32 scale per 256-value block (2 x 4 / 256
  bytes per parameter), float32 moments for the small ones;
* KL reference: float32 and sharded like the policy, or loaded by bitsandbytes in 8 or 4 bits
  (decoder linear weights quantized, embeddings, head and norms kept in float32) and replicated;
* vLLM: a bf16 copy of the weights on every GPU (its KV cache comes on top, inside
  ``gpu_memory_utilization``);
* logits: one sequence's bf16 logits plus the float32 row the loss upcasts, per micro-batch row.

Activations (checkpointed layer inputs) and CUDA workspace come on top and depend on the
micro-batch size.

    python tools/memory_plan.py configs/qwen2.5-1.5b-instruct/hf_config.json \\
        configs/qwen2.5-7b-instruct/hf_config.json --gpus 8 --sequence 1536
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30
MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size
BLOCK = 256  # values per 8-bit block (one float32 scale each)


def meta_model(config_path: str | Path) -> nn.Module:
    """The causal LM of an HF ``config.json`` on the meta device (shapes only), float32 as the
    master weights under bf16-mixed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters; those in tensors of >= 4096 elements; those in decoder linear weights."""
    decoder_linear = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in f".{name}"
    }
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "large": sum(p.numel() for p in params if p.numel() >= MIN_8BIT_SIZE),
        "decoder_linear": sum(p.numel() for p in params if id(p) in decoder_linear),
        "vocab_size": model.config.vocab_size,
    }


def per_gpu_gib(counts: dict[str, int], gpus: int, sequence: int) -> dict[str, float]:
    """GiB per GPU of each piece of state (see the module docstring)."""
    total, large, linear = counts["total"], counts["large"], counts["decoder_linear"]
    small = total - large
    eight_bit_state = 2 * large + 2 * 4 * large / BLOCK + 8 * small
    rows = {
        "policy_weights_fp32": 4 * total / gpus,
        "policy_grads_fp32": 4 * total / gpus,
        "adamw": 8 * total / gpus,
        "adamw_8bit": eight_bit_state / gpus,
        "reference_fp32_sharded": 4 * total / gpus,
        "reference_8bit_replicated": linear + 4 * (total - linear),
        "reference_4bit_replicated": linear / 2 + 4 * (total - linear),
        "vllm_weights_bf16": 2 * total,
        "logits_per_sequence": sequence * counts["vocab_size"] * (2 + 4),
    }
    return {key: value / GIB for key, value in rows.items()}


def totals(gib: dict[str, float]) -> dict[str, float]:
    """Model state per GPU with the configs' float32 sharded reference: AdamW or 8-bit AdamW.

    A replicated 8/4-bit reference only pays off on few GPUs: sharded over 8, float32 is smaller.
    """
    base = gib["policy_weights_fp32"] + gib["policy_grads_fp32"] + gib["vllm_weights_bf16"]
    base += gib["reference_fp32_sharded"]
    return {"total_adamw": base + gib["adamw"], "total_adamw_8bit": base + gib["adamw_8bit"]}


def format_table(plans: dict[str, dict[str, Any]], gpus: int) -> str:
    header = (
        f"| model | parameters | weights + grads (fp32, /{gpus}) | AdamW | 8-bit AdamW | "
        "reference fp32 / 8-bit / 4-bit | vLLM bf16 copy | logits per sequence | "
        "total with AdamW | total with 8-bit AdamW |"
    )
    lines = [header, "|" + "---|" * 10]
    for name, plan in plans.items():
        g = plan["per_gpu_gib"]
        t = plan["totals_gib"]
        lines.append(
            f"| {name} | {plan['counts']['total'] / 1e9:.2f}B "
            f"| {g['policy_weights_fp32'] + g['policy_grads_fp32']:.2f} | {g['adamw']:.2f} "
            f"| {g['adamw_8bit']:.2f} | {g['reference_fp32_sharded']:.2f} / "
            f"{g['reference_8bit_replicated']:.2f} / {g['reference_4bit_replicated']:.2f} "
            f"| {g['vllm_weights_bf16']:.2f} | {g['logits_per_sequence']:.2f} "
            f"| {t['total_adamw']:.1f} | {t['total_adamw_8bit']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path, help="HF config.json files")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs FSDP2 shards over")
    parser.add_argument("--sequence", type=int, default=1536, help="prompt + completion tokens")
    parser.add_argument("--out", type=Path, default=None, help="also write the plan as JSON")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.sequence < 1:
        parser.error("--gpus and --sequence must be positive")
    plans = {}
    for path in args.configs:
        counts = parameter_counts(meta_model(path))
        gib = per_gpu_gib(counts, args.gpus, args.sequence)
        plans[path.parent.name] = {"counts": counts, "per_gpu_gib": gib, "totals_gib": totals(gib)}
    print(format_table(plans, args.gpus))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"gpus": args.gpus, "sequence": args.sequence, "models": plans}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
