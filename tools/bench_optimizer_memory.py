"""Bytes of optimizer state (AdamW vs bitsandbytes' AdamW8bit) and of the frozen KL reference
(float32 vs 8-bit vs 4-bit), measured on real models after a real step on the CPU.

Optimizer state is every tensor in ``optimizer.state`` after one step (moments, 8-bit block
scales and quantization maps, step counters); the reference is ``get_memory_footprint()`` of the
model as loaded by :func:`cropi_pl.policy.quantization.load_quantized`.

    python tools/bench_optimizer_memory.py --out results/bench_optimizer_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from benchlib import machine_info

MODELS = ("embedded:tiny", "embedded:smollm2-135m-instruct")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in the optimizer's per-parameter state."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def measure(model_name: str) -> dict[str, Any]:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from cropi_pl.policy.build import resolve_model_path
    from cropi_pl.policy.quantization import load_quantized

    path = resolve_model_path(model_name)
    ids = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {"model_path": path}
    for name, cls in (("adamw", torch.optim.AdamW), ("adamw8bit", bnb.optim.AdamW8bit)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        optimizer = cls(model.parameters(), lr=1e-5)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        result[f"{name}_state_bytes"] = state_bytes(optimizer)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["parameter_bytes_fp32"] = result["parameters"] * 4
    result["adamw8bit_over_adamw"] = result["adamw8bit_state_bytes"] / result["adamw_state_bytes"]
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    result["reference_fp32_bytes"] = full.get_memory_footprint()
    for bits in ("8bit", "4bit"):
        quantized = load_quantized(path, bits, torch.float32, torch.device("cpu"))
        result[f"reference_{bits}_bytes"] = quantized.get_memory_footprint()
        result[f"reference_{bits}_over_fp32"] = (
            result[f"reference_{bits}_bytes"] / result["reference_fp32_bytes"]
        )
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    mb = 1e6
    lines = [
        "| model | parameters | AdamW state MB | AdamW8bit state MB (ratio) "
        "| reference fp32 / 8-bit / 4-bit MB |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['adamw_state_bytes'] / mb:.1f} "
            f"| {r['adamw8bit_state_bytes'] / mb:.1f} ({r['adamw8bit_over_adamw']:.3f}) "
            f"| {r['reference_fp32_bytes'] / mb:.1f} / {r['reference_8bit_bytes'] / mb:.1f} / "
            f"{r['reference_4bit_bytes'] / mb:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/bench_optimizer_memory.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    results = {name: measure(name) for name in args.models}
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"models": results, "machine": machine_info(args.threads, "bitsandbytes")}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
