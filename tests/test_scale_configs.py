"""The paper-scale configs: parsed by the real CLI, and their FSDP2 plan built on the meta device.

No weights, no GPU: the Qwen2.5 architectures come from ``configs/<model>/hf_config.json`` (the
hub's config.json sizes) and an 8-rank process group is faked in this one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from cropi_pl.cli import CROPICLI
from cropi_pl.cli import main as cli_main
from cropi_pl.sharding import decoder_layers, shard_per_layer
from tests.cli_utils import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import memory_plan  # noqa: E402

MODELS = {
    "qwen2.5-1.5b-instruct": ("Qwen/Qwen2.5-1.5B-Instruct", 1_543_714_304),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
}
CONFIGS = [(model, method) for model in MODELS for method in ("grpo", "cropi")]


def _parse(monkeypatch, *configs: Path):
    """The namespace LightningCLI builds from ``configs``, without instantiating anything."""
    monkeypatch.setattr(CROPICLI, "instantiate_classes", lambda self: None)
    args = [arg for config in configs for arg in ("--config", str(config))]
    return cli_main(args, run=False).config


@pytest.mark.parametrize(("model", "method"), CONFIGS)
def test_config_parses_with_the_papers_settings(monkeypatch, model: str, method: str):
    config = _parse(monkeypatch, ROOT / "configs" / model / f"{method}.yaml")
    hub_name, _ = MODELS[model]
    trainer, module, data = config.trainer, config.model.init_args, config.data.init_args
    strategy = trainer.strategy
    assert strategy.class_path == "cropi_pl.checkpointing.VerifiedModelParallelStrategy"
    assert strategy.init_args.data_parallel_size == trainer.devices * trainer.num_nodes == 8
    assert trainer.precision == "bf16-mixed" and trainer.accelerator == "gpu"
    assert module.model == hub_name
    assert module.gradient_checkpointing is True
    assert module.engine.class_path == "cropi_pl.generation.VLLMEngine"
    assert module.engine.init_args.dtype == "bfloat16"
    assert module.optimizer.init_args.lr == 1e-6
    assert (module.kl_coef, module.kl_estimator, module.entropy_coef) == (0.001, "k3", 0.001)
    assert (data.batch_size, module.num_generations, module.num_iterations) == (128, 8, 1)
    assert module.prompt_format == "chat"
    assert (config.curriculum is not None) == (method == "cropi")
    if method == "cropi":
        curriculum = config.curriculum.init_args
        assert curriculum.ratio == 0.1 and curriculum.projection.dim == 32768
        assert data.trajectories.pool_samples == 8 and data.trajectories.target_samples == 32
        assert data.trajectories.temperature == 0.5


def test_8bit_adamw_overlay_keeps_the_learning_rate(monkeypatch):
    config = _parse(
        monkeypatch,
        ROOT / "configs" / "qwen2.5-7b-instruct" / "grpo.yaml",
        ROOT / "configs" / "optim" / "adamw8bit.yaml",
    )
    optimizer = config.model.init_args.optimizer
    assert optimizer.class_path == "bitsandbytes.optim.AdamW8bit"
    assert optimizer.init_args.lr == 1e-6 and optimizer.init_args.weight_decay == 0.01


@pytest.fixture
def fake_world_of_8():
    """A default process group of 8 ranks in this process (collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model", list(MODELS))
def test_fsdp2_plan_on_the_meta_device(fake_world_of_8, model: str):
    from torch.distributed.device_mesh import init_device_mesh

    policy = memory_plan.meta_model(ROOT / "configs" / model / "hf_config.json")
    _, parameters = MODELS[model]
    counts = memory_plan.parameter_counts(policy)
    assert counts["total"] == parameters
    policy.gradient_checkpointing_enable()  # as configure_model does for these configs
    shard_per_layer(policy, init_device_mesh("cpu", (8,)))
    assert len(decoder_layers(policy)) == policy.config.num_hidden_layers == 28
    params = list(policy.parameters())
    assert all(isinstance(p, DTensor) and p.device_mesh.size() == 8 for p in params)
    assert all(p.placements == (Shard(0),) for p in params)
    assert all(p.to_local().device.type == "meta" for p in params)  # nothing was materialised
    local = sum(p.to_local().numel() for p in params)  # rank 0's shard, padding included
    assert parameters / 8 <= local <= parameters / 8 * 1.001
    planned = memory_plan.per_gpu_gib(counts, 8, 1536)["policy_weights_fp32"]
    assert local * 4 / memory_plan.GIB == pytest.approx(planned, rel=1e-3)
    assert all(p.dtype == torch.float32 for p in params)  # master weights under bf16-mixed
