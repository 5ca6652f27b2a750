"""Length-sorted micro-batches: the same rows, less padding, the same gradient and log-probs as
one full batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cropi_pl.cli import main
from cropi_pl.grpo.module import GRPOModule
from cropi_pl.grpo.rollout import PackedBatch, pack
from tests.cli_utils import TINY


def _random_batch(rows: int, vocab: int, seed: int) -> PackedBatch:
    gen = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(3, vocab, (length,), generator=gen).tolist()

    prompts = [ids(int(torch.randint(2, 12, (), generator=gen))) for _ in range(rows)]
    completions = [ids(int(torch.randint(1, 20, (), generator=gen))) for _ in range(rows)]
    return pack(prompts, completions, pad_id=0)


def _ends(batch: PackedBatch) -> torch.Tensor:
    """Brute force: each row's last completion-target position + 1."""
    return torch.tensor([int(row.nonzero().max()) + 1 for row in batch.mask])


def test_micro_batches_go_in_length_order_and_a_single_one_keeps_the_order() -> None:
    batch = _random_batch(rows=11, vocab=50, seed=0)
    assert [b.tolist() for b in batch.micro_batches(11)] == [list(range(11))]
    assert [b.tolist() for b in batch.micro_batches(64)] == [list(range(11))]
    parts = batch.micro_batches(3)
    assert [len(p) for p in parts] == [3, 3, 3, 2]
    order = torch.cat(parts)
    assert sorted(order.tolist()) == list(range(11))  # every row exactly once
    ends = _ends(batch)[order]
    assert torch.all(ends[1:] >= ends[:-1])
    for part in parts:  # each trimmed to its own longest row
        assert batch.rows(part).input_ids.shape[1] == int(_ends(batch)[part].max()) + 1
    assert sum(batch.rows(p).input_ids.numel() for p in parts) < batch.input_ids.numel()


class _NoStep:
    """An optimizer that keeps the accumulated gradients for the test to read."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def _module(tmp_path: Path) -> GRPOModule:
    cli = main(["--config", str(TINY), f"--trainer.default_root_dir={tmp_path}"], run=False)
    module = cli.model
    module.trainer = cli.trainer
    module.configure_model()
    module.hparams.max_grad_norm = None
    module.optimizers = _NoStep
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    return module


@pytest.mark.parametrize("size", [1, 3, 5])
def test_sorted_micro_batches_give_the_full_batch_gradient_and_log_probs(
    tmp_path: Path, size: int
) -> None:
    module = _module(tmp_path)
    policy = module.policy
    batch = _random_batch(rows=10, vocab=policy.config.vocab_size, seed=size)
    advantages = torch.randn(10, generator=torch.Generator().manual_seed(1))
    counts = (10.0, float(batch.mask.sum()))

    def run(micro: int) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
        module.hparams.micro_batch_size = micro
        for p in policy.parameters():
            p.grad = None
        totals = module._optimizer_step(batch, advantages, None, None, None, counts)
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return grads, totals, module._frozen_logps(policy, batch)

    full_grads, full_totals, full_logps = run(10)
    grads, totals, logps = run(size)
    assert full_grads.keys() == grads.keys() and full_grads
    for name, g in full_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(totals["loss"], full_totals["loss"], rtol=1e-4, atol=1e-6)
    mask = batch.mask.bool()  # positions past a micro-batch's width are not computed
    torch.testing.assert_close(logps[mask], full_logps[mask], rtol=1e-5, atol=1e-5)
    assert full_logps[mask].abs().min() > 0  # every completion token's log-prob is there
