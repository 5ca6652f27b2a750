"""GRPO with verifiable rewards as a LightningModule."""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric, SumMetric
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.generation import Completion, GenerationEngine, HFGenerateEngine
from cropi_pl.generation.engine import mark_weights_updated
from cropi_pl.grpo.advantages import group_advantages, zero_std_fraction
from cropi_pl.grpo.losses import (
    ImportanceSamplingMode,
    LossType,
    engine_importance_weights,
    policy_loss,
)
from cropi_pl.grpo.rollout import PackedBatch, pack, pack_token_values, token_logps
from cropi_pl.influence.collector import Collector, SamplingSettings
from cropi_pl.policy.build import check_model_name, resolve_model_path
from cropi_pl.policy.prompting import PromptEncoder, PromptFormat
from cropi_pl.policy.quantization import ReferenceQuantization, load_quantized
from cropi_pl.rewards.base import (
    DEFAULT_REWARD_TIMEOUT_S,
    RewardCallable,
    RewardFunction,
    combine,
    reward_name,
    safe_rewards,
)
from cropi_pl.rewards.numeric import ExactNumberReward
from cropi_pl.seeding import derive_seed, run_seed
from cropi_pl.sharding import shard_per_layer

TABLE_PROMPTS = 4  # prompts (with all their completions) in the TensorBoard completions table


@dataclass
class ScoredBatch:
    """Rewards of ``N`` completions: ``total`` is the weighted combination (NaN where every
    reward returned None), ``per_reward`` (N, R) each function's values (NaN for None),
    ``correct`` the primary reward >= 0.5 (None counts as wrong), ``texts`` the decoded
    completions, and per-reward guard counts."""

    total: Tensor
    per_reward: Tensor
    correct: Tensor
    texts: list[str]
    failures: list[int]
    timeouts: list[int]


def _nan_mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std over the non-NaN entries (NaN mean if none, std 0 below two)."""
    kept = values[~values.isnan()]
    std = kept.std() if kept.numel() > 1 else values.new_zeros(())
    return (kept.mean() if kept.numel() else values.new_tensor(math.nan)), std


def _unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats suffixed ``_2``, ``_3``, ... so each reward's metrics stay apart."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def ci95_half_width(mean: Tensor, mean_square: Tensor, n: Tensor) -> Tensor:
    """Half-width of the normal 95% interval of a mean of ``n`` per-prompt accuracies, from their
    mean and mean square (prompts are the units: sampling noise and prompt mix both count)."""
    variance = (mean_square - mean**2).clamp(min=0.0)
    return 1.96 * torch.sqrt(variance / (n - 1).clamp(min=1.0))


class GRPOModule(L.LightningModule):
    """Group Relative Policy Optimization on a causal LM with verifiable rewards.

    It is the module side of the stage contract (``cropi_pl.curriculum.contract.
    CurriculumPolicy``): a curriculum asks it for unsharded copies of the initial and current
    policy and for trajectory collectors that sample and score as its rollouts do.

    Each training batch is a list of prompt rows. The module samples ``num_generations``
    completions per prompt, scores them, computes group advantages and takes ``num_iterations``
    optimizer steps on that rollout (old log-probs stored when reused), each accumulating
    gradients over micro-batches of ``micro_batch_size`` sequences.

    Args:
        model: HF model folder or hub name, ``embedded:tiny`` (the shipped CPU policy) or
            ``embedded:smollm2-135m-instruct`` (converted once from its GGUF package).
        num_generations: G, completions per prompt.
        max_completion_length: new-token budget per completion.
        temperature: sampling temperature for rollouts.
        top_p: nucleus sampling for rollouts.
        scale_rewards: divide advantages by the ``group`` std (GRPO), the ``batch`` std, or
            ``none`` (Dr. GRPO).
        advantage_eps: added to the std before dividing.
        loss_type: ``seq-mean-token-mean`` (GRPO, the paper's), ``token-mean`` (DAPO) or
            ``seq-mean-token-sum-norm`` (Dr. GRPO).
        clip_low: PPO lower clip, the ratio is kept above ``1 - clip_low``.
        clip_high: PPO upper clip, the ratio is kept below ``1 + clip_high`` (DAPO clip-higher).
        kl_coef: weight of the KL penalty to the frozen reference; 0 loads no reference model.
        kl_estimator: ``k1`` or ``k3`` (low-variance, the paper's) or ``k2``.
        reference_quantization: load the frozen KL reference in ``8bit`` or ``4bit`` (NF4) with
            bitsandbytes instead of the training dtype (replicated on every rank, not sharded,
            not checkpointed: it is rebuilt from ``model``).
        entropy_coef: entropy bonus weight.
        num_iterations: optimizer steps per rollout (mu in the GRPO paper).
        micro_batch_size: sequences per forward/backward (memory knob; does not change the math).
            With several micro-batches per rollout, rows go in order of length, so each is
            trimmed to its own longest row (less padding).
        mask_truncated_completions: drop completions that hit the length budget from the loss.
        max_grad_norm: gradient clipping by global norm; ``None`` disables.
        rewards: reward functions (default: exact numeric match): ``RewardFunction`` subclasses by
            ``class_path``, or plain functions by import path called TRL-style with keyword
            arguments (``cropi_pl.rewards.base``); the first one defines accuracy and fills the
            trajectory cache.
        reward_weights: weights of ``rewards`` (default all 1); a None reward adds nothing.
        reward_timeout_s: wall-clock bound on one reward function's scoring of one batch, 60 s
            by default (the failure guard's budget, :func:`~cropi_pl.rewards.base.safe_rewards`;
            completions it cuts off score 0 and are counted); ``None`` waits forever.
        prompt_format: ``auto`` (the tokenizer's chat template if it has one), ``chat`` or
            ``plain`` (``cropi_pl.policy.prompting``); used identically for rollouts,
            evaluation and the trajectory cache.
        system_prompt: system message of the chat format (a preamble in plain format).
        engine: generation engine (default: ``HFGenerateEngine``, per-row seeded sampling,
            each prompt prefilled once, finished rows dropped from the decode batch;
            ``cropi_pl.generation.VLLMEngine`` for vLLM, see ``configs/engine/vllm.yaml``).
        vllm_importance_sampling_correction: reweight each token's surrogate by
            ``pi_old / pi_engine`` (the trainer's over the engine's log-prob of the sampled token)
            to correct for the engine's numerical mismatch; needs an engine reporting log-probs
            (vLLM). Names and defaults follow TRL's ``vllm_importance_sampling_*`` options.
        vllm_importance_sampling_mode: ``token_truncate`` (TIS: per-token ratio clamped to
            ``[clip_min, clip_max]``), ``token_mask`` (zeroed outside), ``sequence_truncate``,
            ``sequence_mask`` (one ratio per sequence).
        vllm_importance_sampling_clip_max: C_max, the cap of the ratio (``None``: none).
        vllm_importance_sampling_clip_min: C_min (``None``: no lower bound).
        optimizer: optimizer factory, e.g. ``torch.optim.AdamW`` with ``lr`` in YAML.
        lr_scheduler: optional scheduler factory, stepped every optimizer step.
        eval_num_samples: k for validation; 1 is greedy accuracy, k > 1 samples at
            ``eval_temperature`` and also logs pass@k.
        eval_temperature: sampling temperature when ``eval_num_samples > 1``.
        log_completions_every_n_steps: write the ``completions`` text table (prompt, completion,
            each reward, the advantage) to TensorBoard; 0 disables it.
        gradient_checkpointing: trade compute for activation memory.
        max_nonfinite_steps: an optimizer step whose loss or gradient norm is not finite is
            skipped (no update) and counted (``train/nonfinite_steps``); this many in a row stop
            the run with an error naming the step and the last checkpoint (0: never stop).
        seed: base of the per-completion sampling seeds; default the run's ``seed_everything``
            (:func:`~cropi_pl.seeding.run_seed`).
    """

    def __init__(
        self,
        model: str = "embedded:tiny",
        num_generations: int = 8,
        max_completion_length: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        scale_rewards: Literal["group", "batch", "none"] = "group",
        advantage_eps: float = 1e-4,
        loss_type: LossType = "seq-mean-token-mean",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        kl_coef: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        reference_quantization: ReferenceQuantization | None = None,
        entropy_coef: float = 0.0,
        num_iterations: int = 1,
        micro_batch_size: int = 64,
        mask_truncated_completions: bool = False,
        max_grad_norm: float | None = 1.0,
        rewards: list[RewardFunction | RewardCallable] | None = None,
        reward_weights: list[float] | None = None,
        reward_timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S,
        prompt_format: PromptFormat = "auto",
        system_prompt: str | None = None,
        engine: GenerationEngine | None = None,
        vllm_importance_sampling_correction: bool = False,
        vllm_importance_sampling_mode: ImportanceSamplingMode = "token_truncate",
        vllm_importance_sampling_clip_max: float | None = 3.0,
        vllm_importance_sampling_clip_min: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_num_samples: int = 1,
        eval_temperature: float = 1.0,
        log_completions_every_n_steps: int = 50,
        gradient_checkpointing: bool = False,
        max_nonfinite_steps: int = 3,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["rewards", "engine", "optimizer", "lr_scheduler"])
        if num_generations < 2:
            raise ValueError("num_generations must be >= 2: group advantages need a group")
        if num_iterations < 1:
            raise ValueError("num_iterations must be >= 1")
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        check_model_name(model)
        self.sampling_seed = run_seed(seed)
        self.model_name = model
        self.rewards = list(rewards) if rewards else [ExactNumberReward()]
        self.reward_weights = list(reward_weights) if reward_weights else [1.0] * len(self.rewards)
        if len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries "
                f"for {len(self.rewards)} rewards"
            )
        self.reward_names = _unique_names([reward_name(fn) for fn in self.rewards])
        self.engine = engine or HFGenerateEngine()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.automatic_optimization = False
        self.policy: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.tokenizer: Any = None
        self.prompts: PromptEncoder | None = None
        self.val_metrics = nn.ModuleDict()
        self._eval_names: list[str] = []
        self._timer: dict[str, float] = defaultdict(float)
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or grad norm
        self._nonfinite_in_a_row = 0

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        path = resolve_model_path(self.model_name)
        self._load_tokenizer()
        dtype = torch.get_default_dtype()  # the precision plugin's init context sets it
        self.policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.policy.train()  # from_pretrained returns eval mode
        if self.hparams.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        quantization = self.hparams.reference_quantization
        if self.hparams.kl_coef > 0 and quantization is not None:
            reference = load_quantized(path, quantization, dtype, self.trainer.strategy.root_device)
            # Outside the module tree on purpose: the strategy neither moves nor shards it (it is
            # small and already on its device) and checkpoints leave it out (bitsandbytes 4-bit
            # weights cannot be loaded back through load_state_dict).
            object.__setattr__(self, "reference", reference.eval().requires_grad_(False))
        elif self.hparams.kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            self.reference.eval().requires_grad_(False)
        strategy = self._trainer.strategy if self._trainer is not None else None  # None: a tool
        if isinstance(strategy, ModelParallelStrategy):
            mesh = self.device_mesh["data_parallel"]
            shard_per_layer(self.policy, mesh)
            if self.reference is not None and quantization is None:
                shard_per_layer(self.reference, mesh)

    def _load_tokenizer(self) -> None:
        """The tokenizer (EOS pads when it has no pad token) and the prompt encoder over it."""
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.model_name))
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.prompts = self.prompt_encoder(self.tokenizer)

    def configure_optimizers(self) -> Any:
        assert self.policy is not None
        optimizer = self.optimizer_factory(self.policy.parameters())
        sharded = any(isinstance(p, DTensor) for p in self.policy.parameters())
        if sharded and type(optimizer).__module__.startswith("bitsandbytes"):
            raise ValueError(
                f"{type(optimizer).__name__} (bitsandbytes) cannot step FSDP2-sharded (DTensor) "
                "parameters; use it with one device or DDP (configs/strategy/ddp.yaml), or an "
                "optimizer that supports DTensor under FSDP2 (e.g. torchao.optim.AdamW8bit)"
            )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---------------------------------------------------------------- rollout
    def prompt_encoder(self, tokenizer: Any) -> PromptEncoder:
        """This module's prompt formatting over ``tokenizer`` (the trajectory cache uses it too)."""
        return PromptEncoder(tokenizer, self.hparams.prompt_format, self.hparams.system_prompt)

    def sample(
        self,
        rows: list[dict[str, Any]],
        num_samples: int,
        temperature: float,
        tag: str,
    ) -> tuple[list[list[int]], list[Completion]]:
        """Prompt ids (one per completion) and completions, seeded per (tag, step, prompt, j).

        Evaluation reuses the same seeds at every step (common random numbers), so sampled
        accuracy curves differ by what the policy learned, not by fresh sampling noise.
        """
        assert self.policy is not None and self.prompts is not None
        prompts = self.prompts.encode_rows(rows)
        step = self.global_step if tag == "train" else 0
        seeds = [
            derive_seed(self.sampling_seed, tag, step, r["id"], j)
            for r in rows
            for j in range(num_samples)
        ]
        completions = self.engine.generate(
            self.policy,
            prompts,
            num_samples=num_samples,
            max_new_tokens=self.hparams.max_completion_length,
            temperature=temperature,
            top_p=self.hparams.top_p,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            seeds=seeds,
        )
        return [p for p in prompts for _ in range(num_samples)], completions

    def score(
        self,
        rows: list[dict[str, Any]],
        completions: list[Completion],
        num_samples: int,
        primary_only: bool = False,
    ) -> ScoredBatch:
        """Every reward function (only the first, which defines accuracy, with
        ``primary_only``) on every completion, through the failure guard."""
        functions = self.rewards[:1] if primary_only else self.rewards
        texts = self.tokenizer.batch_decode([c.ids for c in completions], skip_special_tokens=True)
        flat_rows = [r for r in rows for _ in range(num_samples)]
        prompts = [r["prompt"] for r in flat_rows]
        answers = [str(r["answer"]) for r in flat_rows]
        outcomes = [
            safe_rewards(fn, prompts, texts, answers, flat_rows, self.hparams.reward_timeout_s)
            for fn in functions
        ]
        per_reward = torch.tensor(
            [[math.nan if v is None else v for v in o.rewards] for o in outcomes],
            dtype=torch.float32,
        ).T
        return ScoredBatch(
            total=torch.tensor(
                combine(outcomes, self.reward_weights[: len(outcomes)]), dtype=torch.float32
            ),
            per_reward=per_reward,
            correct=(torch.tensor(outcomes[0].filled(), dtype=torch.float32) >= 0.5).float(),
            texts=texts,
            failures=[o.failures for o in outcomes],
            timeouts=[o.timeouts for o in outcomes],
        )

    # --------------------------------------------------------------- training
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        assert self.policy is not None
        hp = self.hparams
        g = hp.num_generations
        t0 = time.perf_counter()
        prompt_ids, completions = self.sample(batch, g, hp.temperature, "train")
        t1 = time.perf_counter()
        scored = self.score(batch, completions, g)
        advantages = group_advantages(scored.total.view(-1, g), hp.scale_rewards, hp.advantage_eps)
        packed = pack(prompt_ids, [c.ids for c in completions], self.tokenizer.pad_token_id)
        truncated = torch.tensor([c.truncated for c in completions], dtype=torch.float32)
        if hp.mask_truncated_completions:
            packed.mask *= (1.0 - truncated)[:, None]
        counts = self._global_counts(packed.mask)
        engine_logps = self._engine_logps(prompt_ids, completions, packed)
        old_logps = self._frozen_logps(self.policy, packed) if hp.num_iterations > 1 else None
        ref_logps = (
            self._frozen_logps(self.reference, packed) if self.reference is not None else None
        )
        t2 = time.perf_counter()
        steps = [
            self._optimizer_step(
                packed, advantages.flatten(), old_logps, ref_logps, engine_logps, counts
            )
            for _ in range(hp.num_iterations)
        ]
        t3 = time.perf_counter()
        gen_tokens = sum(len(c.ids) for c in completions)
        self._log_rollout(batch, scored, truncated, completions)
        self.log_dict(
            {k: torch.stack([step[k] for step in steps]).mean() for k in steps[0]},
            sync_dist=True,
        )
        self.log_dict(
            {
                "time/generation_s": t1 - t0,
                "time/training_s": t3 - t2,
                "time/reward_and_prep_s": t2 - t1,
                "throughput/generated_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
                "throughput/train_tokens_per_s": hp.num_iterations
                * float(packed.mask.sum())
                / max(t3 - t2, 1e-9),
                "train/nonfinite_steps": float(self.nonfinite_steps),
            }
        )
        self._maybe_log_completions(batch, scored, advantages.flatten())

    def _global_counts(self, mask: Tensor) -> tuple[float, float]:
        """Sequence and token counts over all ranks, divided by the world size.

        Ranks average their gradients, so normalising each rank's sum by ``global / world`` makes
        the averaged gradient equal to the aggregate over the whole global batch.
        """
        counts = torch.tensor([mask.shape[0], mask.sum().item()], dtype=torch.float64)
        world = self.trainer.world_size
        if world > 1:
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
            counts = counts / world
        return float(counts[0]), max(float(counts[1]), 1.0)

    def _engine_logps(
        self, prompt_ids: list[list[int]], completions: list[Completion], packed: PackedBatch
    ) -> Tensor | None:
        """The engine's log-probs of the sampled tokens laid out like ``packed.mask``, if any."""
        reported = [c.logprobs is not None for c in completions]
        if self.hparams.vllm_importance_sampling_correction and not all(reported):
            raise ValueError(
                "vllm_importance_sampling_correction needs an engine that reports the sampled "
                f"tokens' log-probs (VLLMEngine); {type(self.engine).__name__} does not"
            )
        if not all(reported):
            return None
        return pack_token_values(prompt_ids, [c.logprobs for c in completions], packed.mask.shape)

    @torch.no_grad()
    def _frozen_logps(self, model: nn.Module | None, packed: PackedBatch) -> Tensor:
        assert model is not None
        out = torch.zeros_like(packed.mask)
        for rows in packed.micro_batches(self.hparams.micro_batch_size):
            logp, _ = token_logps(model, packed.rows(rows))
            out[rows, : logp.shape[1]] = logp.float().cpu()
        return out

    def _optimizer_step(
        self,
        packed: PackedBatch,
        advantages: Tensor,
        old_logps: Tensor | None,
        ref_logps: Tensor | None,
        engine_logps: Tensor | None,
        counts: tuple[float, float],
    ) -> dict[str, Tensor]:
        """One optimizer step over the rollout; returns this rank's share of the step's stats.

        Losses are globally normalised, so micro-batch losses add up, and token statistics are
        weighted by each micro-batch's share of the global token count.
        """
        hp = self.hparams
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        num_sequences, num_tokens = counts
        totals: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for rows in packed.micro_batches(hp.micro_batch_size):
            part = packed.rows(rows)
            width = part.mask.shape[1]
            entropy_mode = "grad" if hp.entropy_coef else "detached"
            logp, entropy = token_logps(self.policy, part, entropy=entropy_mode)
            device = logp.device
            old = logp.detach() if old_logps is None else old_logps[rows, :width].to(device)
            ref = None if ref_logps is None else ref_logps[rows, :width].to(device)
            mask = part.mask.to(device)
            weights = None
            if engine_logps is not None:
                engine = engine_logps[rows, :width].to(device)
                keep = mask.bool()
                gap = (old - engine).abs().nan_to_num(0.0).masked_fill(~keep, 0.0)
                totals["sampling/sampling_logp_difference/mean"] += gap.sum() / num_tokens
                worst = totals["sampling/sampling_logp_difference/max"]
                totals["sampling/sampling_logp_difference/max"] = torch.maximum(worst, gap.max())
                if hp.vllm_importance_sampling_correction:
                    weights = engine_importance_weights(
                        old,
                        engine,
                        mask,
                        hp.vllm_importance_sampling_mode,
                        hp.vllm_importance_sampling_clip_min,
                        hp.vllm_importance_sampling_clip_max,
                    )
                    totals["sampling/importance_sampling_ratio/mean"] += weights.sum() / num_tokens
            out = policy_loss(
                logp,
                old,
                advantages[rows].to(device),
                mask,
                loss_type=hp.loss_type,
                num_sequences=num_sequences,
                num_tokens=num_tokens,
                max_completion_length=hp.max_completion_length,
                clip_low=hp.clip_low,
                clip_high=hp.clip_high,
                ref_logp=ref,
                kl_coef=hp.kl_coef,
                kl_estimator=hp.kl_estimator,
                entropy=entropy,
                entropy_coef=hp.entropy_coef,
                importance_weights=weights,
            )
            self.manual_backward(out.loss)
            weight = mask.sum() / num_tokens
            totals["loss"] += out.loss.detach()
            totals["clip_ratio/low_mean"] += out.clip_fraction_low * weight
            totals["clip_ratio/high_mean"] += out.clip_fraction_high * weight
            # low and high clipping exclude each other (opposite advantage signs): the region
            # where either clips is their sum
            totals["clip_ratio/region_mean"] += (
                out.clip_fraction_low + out.clip_fraction_high
            ) * weight
            totals["importance_ratio/mean"] += out.ratio_mean * weight
            totals["entropy"] += out.entropy * weight
            if out.kl is not None:
                totals["kl"] += out.kl * weight
        totals["grad_norm"] = self._grad_norm()
        if not self._finite_step(totals["loss"], totals["grad_norm"]):
            optimizer.zero_grad(set_to_none=True)  # skipped: no update, no scheduler step
            return dict(totals)
        if hp.max_grad_norm:
            self.clip_gradients(
                optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        mark_weights_updated(self.policy)  # engines holding a weight copy push it again
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return dict(totals)

    def _grad_norm(self) -> Tensor:
        """The global L2 norm of the policy's gradients, before clipping (gathered under FSDP2)."""
        assert self.policy is not None
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return norm.detach().to(self.device)

    def _finite_step(self, loss: Tensor, grad_norm: Tensor) -> bool:
        """Whether this optimizer step may update the weights: its loss (every rank's) and its
        gradient norm are finite.

        A non-finite step is skipped and counted in ``train/nonfinite_steps``; after
        ``max_nonfinite_steps`` in a row the run stops, naming the step and the last checkpoint,
        instead of training on (an update with NaN makes every later step NaN).
        """
        bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()
        if self.trainer.world_size > 1:  # ranks must agree, or their replicas drift apart
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bad.item():
            self._nonfinite_in_a_row = 0
            return True
        self._nonfinite_in_a_row += 1
        self.nonfinite_steps += 1
        limit = self.hparams.max_nonfinite_steps
        if limit and self._nonfinite_in_a_row >= limit:
            callback = self.trainer.checkpoint_callback
            last = getattr(callback, "last_model_path", "") or "none written yet"
            raise FloatingPointError(
                f"stopped at step {self.global_step}: {self._nonfinite_in_a_row} optimizer steps "
                f"in a row had a non-finite loss ({loss.item()}) or gradient norm "
                f"({grad_norm.item()}), so they were skipped; the last checkpoint is {last}. "
                "Lower the learning rate or check the rewards and data, then resume from it "
                "(--ckpt_path last)"
            )
        rank_zero_warn(
            f"step {self.global_step}: non-finite loss ({loss.item()}) or gradient norm "
            f"({grad_norm.item()}); skipped without an update "
            f"({self._nonfinite_in_a_row} in a row, the run stops at {limit})"
        )
        return False

    def _log_rollout(
        self,
        rows: list[dict[str, Any]],
        scored: ScoredBatch,
        truncated: Tensor,
        completions: list[Completion],
    ) -> None:
        """TRL's rollout metrics (same names where the concept is the same) plus accuracy."""
        g = self.hparams.num_generations
        lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float32)
        terminated = lengths[truncated == 0]
        if terminated.numel() == 0:
            terminated = torch.zeros(1)  # TRL logs 0 when every completion hit the budget
        reward_mean, reward_std = _nan_mean_std(scored.total)
        metrics = {
            "reward_std": reward_std,
            "frac_reward_zero_std": torch.tensor(zero_std_fraction(scored.total.view(-1, g))),
            "accuracy": scored.correct.mean(),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": truncated.mean(),
            "completions/mean_terminated_length": terminated.mean(),
            "completions/min_terminated_length": terminated.min(),
            "completions/max_terminated_length": terminated.max(),
        }
        for i, name in enumerate(self.reward_names):
            mean, std = _nan_mean_std(scored.per_reward[:, i])
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = std
            metrics[f"rewards/{name}/failures"] = torch.tensor(float(scored.failures[i]))
            metrics[f"rewards/{name}/timeouts"] = torch.tensor(float(scored.timeouts[i]))
        self.log_dict(metrics, sync_dist=True)
        self.log("reward", reward_mean, prog_bar=True, sync_dist=True)
        by_family: dict[str, list[float]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_family[r["family"]].extend(scored.correct[i * g : (i + 1) * g].tolist())
        for family, values in by_family.items():
            self.log(f"accuracy/{family}", sum(values) / len(values))

    def _maybe_log_completions(
        self, rows: list[dict[str, Any]], scored: ScoredBatch, advantages: Tensor
    ) -> None:
        """A TensorBoard text table ``completions``: prompt, completion, each reward, the
        combined reward and the advantage, for every completion of the first prompts."""
        every = self.hparams.log_completions_every_n_steps
        experiment = getattr(self.logger, "experiment", None)
        if not every or self.global_step % every or not hasattr(experiment, "add_text"):
            return
        g = self.hparams.num_generations
        header = ["prompt", "completion", *self.reward_names, "reward", "advantage"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, row in enumerate(rows[:TABLE_PROMPTS]):
            for j in range(i * g, (i + 1) * g):
                values = [*scored.per_reward[j].tolist(), scored.total[j].item()]
                numbers = ["-" if math.isnan(v) else f"{v:.3g}" for v in values]
                cells = [_cell(row["prompt"]), _cell(scored.texts[j]), *numbers]
                lines.append("| " + " | ".join([*cells, f"{advantages[j].item():+.3f}"]) + " |")
        experiment.add_text("completions", "\n".join(lines), self.global_step)

    # ------------------------------------------------------------- curriculum
    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.num_iterations

    def initial_policy(self) -> nn.Module:
        """An unsharded copy of the initial policy in the training dtype on this rank's device,
        in eval mode (the curriculum's behaviour policy beta)."""
        dtype = (
            next(self.policy.parameters()).dtype
            if self.policy is not None
            else torch.get_default_dtype()
        )
        path = resolve_model_path(self.model_name)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()

    def current_policy(self, into: nn.Module) -> nn.Module:
        """``into`` holding the policy's current parameters (under FSDP gathered on every rank,
        a collective), for the curriculum's influence pass."""
        assert self.policy is not None
        options = StateDictOptions(full_state_dict=True)
        into.load_state_dict(get_model_state_dict(self.policy, options=options))
        return into

    def trajectory_collector(
        self,
        model: nn.Module,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int | None,
        seed: int,
    ) -> tuple[Collector, SamplingSettings]:
        """A collector sampling ``model`` through this module's engine, prompt format and
        reward timeout, scored by the first reward, and its settings (``max_new_tokens=None``:
        ``max_completion_length``)."""
        self._load_tokenizer()
        assert self.prompts is not None
        settings = SamplingSettings(
            num_samples,
            temperature,
            top_p,
            max_new_tokens or self.hparams.max_completion_length,
            seed,
            self.prompts.fingerprint(),
        )
        collector = Collector.for_model(
            model,
            self.prompts,
            self.engine,
            self.rewards[0],
            settings,
            self.hparams.reward_timeout_s,
        )
        return collector, settings

    # ------------------------------------------------------------- validation
    def setup(self, stage: str) -> None:
        """Validation metrics for every eval set and family, created before the first batch so
        every rank holds the same ones (the data module's ``setup`` has run: Lightning calls it
        first)."""
        dm = self.trainer.datamodule if self.trainer else None
        if dm is None or len(self.val_metrics):
            return
        families = dm.eval_families()
        self._eval_names = list(families)
        for name, names in families.items():
            # Per-prompt second moment and count: the accuracy's 95% interval, prompts as units.
            self.val_metrics[f"{name}__all__sq"] = MeanMetric()
            self.val_metrics[f"{name}__all__n"] = SumMetric()
            for key in ["all", *names]:
                self.val_metrics[f"{name}__{key}__acc"] = MeanMetric()
                if self.hparams.eval_num_samples > 1:
                    self.val_metrics[f"{name}__{key}__pass"] = MeanMetric()

    def validation_step(
        self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        k = self.hparams.eval_num_samples
        temperature = 0.0 if k == 1 else self.hparams.eval_temperature
        _, completions = self.sample(batch, k, temperature, "eval")
        correct = self.score(batch, completions, k, primary_only=True).correct
        name = self._eval_names[dataloader_idx]
        per_prompt = correct.view(-1, k)
        for i, row in enumerate(batch):
            accuracy = per_prompt[i].mean()
            self.val_metrics[f"{name}__all__sq"].update(accuracy**2)
            self.val_metrics[f"{name}__all__n"].update(1.0)
            for key in ("all", row["family"]):
                self.val_metrics[f"{name}__{key}__acc"].update(accuracy)
                if k > 1:
                    self.val_metrics[f"{name}__{key}__pass"].update(per_prompt[i].max())

    def on_validation_epoch_end(self) -> None:
        values = {}
        for key, metric in self.val_metrics.items():
            values[key] = metric.compute()  # collective under DDP/FSDP: every rank computes all
            metric.reset()
        for key, value in values.items():
            name, family, kind = key.split("__")
            if torch.isnan(value) or kind == "n":
                continue
            if kind == "sq":
                mean, n = values[f"{name}__all__acc"], values[f"{name}__all__n"]
                self.log(f"val/{name}/accuracy_ci95", ci95_half_width(mean, value, n))
                continue
            suffix = "accuracy" if kind == "acc" else f"pass@{self.hparams.eval_num_samples}"
            tag = f"val/{name}/{suffix}" if family == "all" else f"val/{name}/{family}/{suffix}"
            self.log(tag, value, prog_bar=family == "all")

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """RNG states as tensors and tuples, so ``torch.load(weights_only=True)`` accepts them."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
