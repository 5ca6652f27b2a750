"""bitsandbytes on CPU: the 8-bit AdamW config and the 8/4-bit frozen KL reference, run for real."""

from __future__ import annotations

import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from cropi_pl.cli import main as cli_main
from cropi_pl.grpo.rollout import pack, token_logps
from cropi_pl.policy.build import resolve_model_path
from cropi_pl.policy.quantization import load_quantized
from tests.cli_utils import ROOT, TINY, run_cli

PATH = resolve_model_path("embedded:tiny")
ADAMW8BIT = ROOT / "configs" / "optim" / "adamw8bit.yaml"


def _policy() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).train()


def _fixed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (4, 32), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _train(model, optimizer, batch, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_adamw8bit_state_is_uint8_above_min_size():
    model = _policy()
    optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    _train(model, optimizer, _fixed_batch(), 1)
    big = small = 0
    for p in model.parameters():
        state = optimizer.state[p]
        if p.numel() >= 4096:  # bitsandbytes' default min_8bit_size
            assert state["state1"].dtype == state["state2"].dtype == torch.uint8
            assert state["state1"].shape == p.shape
            big += 1
        else:
            assert state["state1"].dtype == torch.float32
            small += 1
    assert big > 0 and small > 0


def test_adamw8bit_trains_a_fixed_batch_like_adamw():
    batch = _fixed_batch()
    curves = {}
    for name, cls in (("adamw", torch.optim.AdamW), ("adamw8bit", bnb.optim.AdamW8bit)):
        model = _policy()
        curves[name] = _train(model, cls(model.parameters(), lr=3e-3, weight_decay=0.0), batch, 12)
    reference, quantized = curves["adamw"], curves["adamw8bit"]
    assert reference[-1] < 0.8 * reference[0]  # the batch is being fitted at all
    for step, (a, b) in enumerate(zip(reference, quantized, strict=True)):
        assert abs(a - b) <= 0.03 * a, f"step {step}: AdamW {a:.4f} vs AdamW8bit {b:.4f}"
    assert quantized != reference  # it did run the 8-bit update, not AdamW's


def test_adamw8bit_resume_restores_state_exactly(tmp_path: Path):
    batch = _fixed_batch(1)
    straight = _policy()
    optimizer = bnb.optim.AdamW8bit(straight.parameters(), lr=3e-3)
    _train(straight, optimizer, batch, 6)

    first = _policy()
    optimizer = bnb.optim.AdamW8bit(first.parameters(), lr=3e-3)
    _train(first, optimizer, batch, 3)
    torch.save({"model": first.state_dict(), "optim": optimizer.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    resumed = _policy()
    resumed.load_state_dict(saved["model"])
    optimizer2 = bnb.optim.AdamW8bit(resumed.parameters(), lr=3e-3)
    optimizer2.load_state_dict(saved["optim"])
    for p, q in zip(first.parameters(), resumed.parameters(), strict=True):
        for key, value in optimizer.state[p].items():
            restored = optimizer2.state[q][key]
            assert restored.dtype == value.dtype if torch.is_tensor(value) else True
            assert torch.equal(torch.as_tensor(restored), torch.as_tensor(value)), key
    _train(resumed, optimizer2, batch, 3)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("bits", "max_mean_error", "max_bytes_ratio"), [("8bit", 0.06, 0.3), ("4bit", 0.3, 0.16)]
)
def test_quantized_reference_is_close_and_small(bits: str, max_mean_error: float, max_bytes_ratio):
    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    full = _policy().eval()
    quantized = load_quantized(PATH, bits, torch.float32, torch.device("cpu"))
    kinds = {type(p).__name__ for p in quantized.parameters()}
    assert ("Int8Params" if bits == "8bit" else "Params4bit") in kinds
    ratio = quantized.get_memory_footprint() / full.get_memory_footprint()
    assert ratio <= max_bytes_ratio
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (20,), generator=gen).tolist() for _ in range(4)]
    completions = [torch.randint(3, 100, (30,), generator=gen).tolist() for _ in range(4)]
    batch = pack(prompts, completions, 0)
    with torch.no_grad():
        exact, _ = token_logps(full, batch)
        approx, _ = token_logps(quantized, batch)
    error = (approx - exact).abs()[batch.mask.bool()]
    assert torch.isfinite(approx).all()
    assert 0 < error.mean().item() <= max_mean_error  # quantized (not equal) but close


def test_quantized_reference_refuses_what_it_cannot_do(monkeypatch):
    with pytest.raises(RuntimeError, match="no 'meta' backend"):
        load_quantized(PATH, "8bit", torch.float32, torch.device("meta"))
    with pytest.raises(ValueError, match="reference_quantization"):
        load_quantized(PATH, "2bit", torch.float32, torch.device("cpu"))  # type: ignore[arg-type]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="needs bitsandbytes"):
        load_quantized(PATH, "4bit", torch.float32, torch.device("cpu"))


def _fit(run_dir: Path, *args: str) -> None:
    cli_main(
        [
            "fit",
            "--config",
            str(TINY),
            "--config",
            str(ADAMW8BIT),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.limit_val_batches=0",
            "--model.init_args.kl_coef=0.01",
            "--model.init_args.reference_quantization=4bit",
            *args,
        ]
    )


def test_cli_adamw8bit_with_4bit_reference_resumes_exactly(tmp_path: Path):
    """The config stack parses, trains with the KL term, and a resumed run equals a straight one."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _fit(straight, "--trainer.max_steps=2")
    _fit(split, "--trainer.max_steps=1")
    _fit(split, "--trainer.max_steps=2", "--ckpt_path=last")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 2
    assert not any(k.startswith("reference.") for k in a["state_dict"])  # rebuilt, not stored
    states = a["optimizer_states"][0]["state"].values()
    dtypes = [s["__bnb_optimizer_quant_state__"]["state1"].dtype for s in states]
    assert dtypes.count(torch.uint8) == sum(p.numel() >= 4096 for p in _policy().parameters())
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


def test_bitsandbytes_optimizer_under_fsdp2_is_refused_clearly(tmp_path: Path):
    proc = run_cli(
        "fit",
        "--config",
        str(ADAMW8BIT),
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=1",
        "--trainer.strategy.tensor_parallel_size=1",
        "--trainer.max_steps=1",
        run_dir=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "cannot step FSDP2-sharded (DTensor) parameters" in proc.stderr
