"""Benchmark the influence pass: fidelity against exact POPI scores, cost, and the selection pass.

Workloads (sampled once through the product's trajectory cache; ``--cache-dir`` reuses them):

* embedded: the embedded policy (``embedded:tiny``) on a pool of ``--pool-size`` arithmetic
  training prompts (K = 8 responses, T = 0.5) and a mul+mod validation target set (K = 16).
* smollm2: SmolLM2-135M-Instruct (``embedded:smollm2-135m-instruct``, a real pretrained model) on
  GSM8K-style word problems in its chat format: pool of ``--smol-pool`` easy
  train prompts, word-problem validation targets. K and the completion budget are small so that
  a whole run fits about 30 minutes of a shared 2-core CPU (see ``BenchConfig``).

Exact scores: the cosine of each eligible pool prompt's full, unprojected float32 POPI gradient
with the mean full gradient of the eligible target prompts (float64 reductions). Gradients are
streamed parameter by parameter: the target mean is one d-vector, and each pool gradient is
reduced to its dot product with it and its norm, so no (prompts x d) matrix is ever held.

Embedded section. Every cost option of ``InfluenceScorer`` runs end to end over the pool and the
targets (timed, peak RSS) and is compared with the exact scores by precision at 5/10/20%
(overlap of the top sets) and Spearman, with bootstrap 95% intervals over pool prompts:
CountSketch and Gaussian projections at several k, a parameter subset (the last layer, the final
norm and the head), fewer responses per prompt, bf16 autocast, the "hooks" method and the
factorised (LoGra-style) path, and the default under ``torch.compile`` (its first pass compiles; the
second shows the fused steady state). The default is the fastest option that keeps
precision@10% >= 0.9, compilation included.
Roofline: the machine's fp32 matmul throughput (square GEMMs, same thread count, best of 10)
against the achieved FLOP/s of the influence pass, counting 6 FLOPs per token and linear weight
(forward 2, backward 4; the head included, attention scores left out). Like the peak, the pass's
rate is a best of ``--roofline-repeats`` back-to-back passes of one scorer (its steady state: shapes
and memory warm), for the float32 loop and for the config's engine in float32 (``hooks``, the
headline ``gemm_fraction_of_peak``); each row's single timed pass gives a cold fraction beside them.

Selection section. ``fit`` runs ``--selection-config`` (``configs/cropi_tiny.yaml``, the README's
main command: the step-by-step testbed and its warm-started policy), its whole schedule unless
``--train-steps`` n cuts it to n + 1 steps; each stage's selection pass (as the run logs it) is
priced in the run's mean training step (every step: the ratio of total pass time to total step
time, as wall-clock accounting charges them; the median step is reported beside it). Cheaper
variants of the config's scorer then score the same cached trajectories with the same policy,
each timed and compared with exact scores (agreement = precision@10% per target). Last, the main
command runs again in a fresh process with ``--lean-micro-batch-size`` GRPO micro-batches (no
padding from one long row) and its passes are priced in its own, leaner steps.

SmolLM2 section. One forward/backward per eligible prompt through hooks (``hooked_backward``)
yields, from the same captured layer inputs and output gradients, the exact full gradient
(exact scores), our default CountSketch projection of it, and the factorised projection, so the
precision of each is measured on every eligible prompt at the cost of one pass. Seconds per
prompt are timed separately, end to end through ``InfluenceScorer.project`` on
``--smol-timed`` prompts for our default and the factorised path. Reference (the authors' / TRAK
style): the same per-prompt full gradient plus a dense Gaussian projection to the same k, run in
fp32 on the CPU (fp16 GEMM on a CPU is emulated and far slower); its projection cost is linear in
d, so it is timed on a ``--reference-slice`` of the gradient and extrapolated to d (reported as
such); its gradient time is our loop's. Its matrix (d x k) cannot be held on this machine
(bytes reported); its precision is not measured.

    python tools/bench_influence.py --out results/bench_influence.json --cache-dir /tmp/bench_cache
"""

# ruff: noqa: E402 (huge pages are requested before torch is imported, as ``python -m cropi_pl`` does)
from __future__ import annotations

from cropi_pl.host_memory import huge_pages_for_large_tensors

HUGE_PAGES = huge_pages_for_large_tensors()  # PyTorch reads the setting once: before torch loads

import argparse
import ctypes
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from benchlib import machine_info
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.atomic import atomic_file
from cropi_pl.generation.hf import HFGenerateEngine
from cropi_pl.host_memory import keep_freed_memory
from cropi_pl.influence.cache import TrajectoryCache
from cropi_pl.influence.collector import Collector, SamplingSettings
from cropi_pl.influence.factorised import FactorisedProjection
from cropi_pl.influence.fingerprints import fingerprint_model, fingerprint_rows
from cropi_pl.influence.gradients import POPIGradients, hooked_backward
from cropi_pl.influence.popi import POPIConfig, collate, distinct_responses, gradient_mode
from cropi_pl.influence.projection import ProjectionConfig, SparseProjector
from cropi_pl.influence.scorer import InfluenceScorer
from cropi_pl.influence.selection import selection_size
from cropi_pl.influence.trajectories import PromptTrajectories, zero_mask
from cropi_pl.policy.build import resolve_model_path
from cropi_pl.policy.prompting import PromptEncoder
from cropi_pl.rewards.numeric import ExactNumberReward
from cropi_pl.tasks.arithmetic import generate_tasks

PRECISION_TARGET = 0.90
SPEEDUP_TARGET = 5.0
GEMM_TARGET = 0.60
STEP_TARGET = 3.0
FRACTIONS = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class BenchConfig:
    """The workload; every field is a command-line flag."""

    model: str = "embedded:tiny"
    pool_size: int = 1200
    target_size: int = 60
    pool_samples: int = 8
    target_samples: int = 16
    temperature: float = 0.5
    max_new_tokens: int = 48
    dims: tuple[int, ...] = (512, 2048, 8192)
    default_dim: int = 8192  # configs/cropi_tiny.yaml's projection
    subset_filter: str = r"layers\.(\d+)\.mlp|norm\.weight|lm_head"  # overwritten per model
    fewer_responses: int = 4
    smol_model: str = "embedded:smollm2-135m-instruct"
    smol_pool: int = 260
    smol_pool_families: tuple[str, ...] = ("word",)
    smol_pool_difficulties: tuple[int, ...] = (1,)
    smol_targets: int = 24
    smol_target_families: tuple[str, ...] = ("word",)
    smol_target_difficulties: tuple[int, ...] = (1, 2)
    smol_samples: int = 4
    smol_target_samples: int = 8
    smol_temperature: float = 0.7
    smol_max_new_tokens: int = 32
    smol_dim: int = 8192
    smol_timed: int = 6
    reference_slice: int = 1 << 15  # a (slice, k) fp32 matrix: 1 GiB at k = 8192
    bootstrap: int = 1000
    roofline_repeats: int = 3  # back-to-back passes per engine; the roofline takes the best
    train_steps: int = 0  # selection fit: 0 runs the config's schedule, n runs n + 1 steps
    selection_config: str = "configs/cropi_tiny.yaml"
    selection_overrides: tuple[str, ...] = ()  # --key=value CLI arguments, comma-separated
    lean_micro_batch_size: int = 32  # a second fit's GRPO micro-batch rows; 0 skips that fit
    threads: int = 2
    seed: int = 0
    smol_max_eligible: int = 120
    smol_prompts_per_batch: int = 4  # the bf16 hooks row: 4 full gradients of SmolLM2 at a time
    skip_options: tuple[str, ...] = ()  # embedded options whose name contains one of these
    sections: tuple[str, ...] = ("embedded", "selection", "smollm2")
    update: bool = False
    cache_dir: str | None = None


# ---------------------------------------------------------------------------------- metrics
def top_set(scores: Tensor, n: int) -> set[int]:
    """Indices of the ``n`` highest scores, ties broken by the lower index (as the selectors do)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return set(order[:n].tolist())


def precision_at(scores: Tensor, exact: Tensor, fraction: float = 0.1) -> float:
    """|top(scores) & top(exact)| / |top(exact)|, top = ``selection_size(n, fraction)`` prompts."""
    if scores.shape != exact.shape or scores.dim() != 1:
        raise ValueError(f"precision_at: shapes {tuple(scores.shape)} and {tuple(exact.shape)}")
    n = selection_size(exact.numel(), fraction)
    return len(top_set(scores, n) & top_set(exact, n)) / n


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks in float64, tied values sharing the mean of their ranks."""
    order = torch.argsort(values.double(), stable=True)
    _, inverse, counts = torch.unique_consecutive(
        values.double()[order], return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rho: Pearson correlation of average ranks (no scipy dependency)."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"spearman: need two equal 1-D tensors of >= 2, got {a.shape}, {b.shape}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denominator if denominator > 0 else float("nan")


def bootstrap_interval(
    metric: Callable[[Tensor, Tensor], float],
    scores: Tensor,
    exact: Tensor,
    draws: int,
    seed: int,
) -> tuple[float, float]:
    """Percentile 95% interval of ``metric`` over pool prompts resampled with replacement (the
    top sets are recomputed on each resample, so ties from repeated prompts count as in a pool)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        index = torch.randint(0, exact.numel(), (exact.numel(),), generator=gen)
        values.append(metric(scores[index], exact[index]))
    values.sort()
    return values[int(0.025 * (draws - 1))], values[math.ceil(0.975 * (draws - 1))]


def fidelity(scores: Tensor, exact: Tensor, draws: int, seed: int) -> dict[str, Any]:
    """Precision at 5/10/20% and Spearman against exact scores, each with its 95% interval."""
    out: dict[str, Any] = {}
    for fraction in FRACTIONS:
        key = f"precision_at_{round(100 * fraction)}pct"

        def metric(a: Tensor, b: Tensor, fraction: float = fraction) -> float:
            return precision_at(a, b, fraction)

        out[key] = precision_at(scores, exact, fraction)
        out[f"{key}_ci95"] = bootstrap_interval(metric, scores, exact, draws, seed)
    out["spearman"] = spearman(scores, exact)
    out["spearman_ci95"] = bootstrap_interval(spearman, scores, exact, draws, seed)
    return out


# ---------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _trim() -> None:
    """Hand freed heap pages back to the OS so they do not hide the next section's growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Section:
    """Wall time and peak RSS growth (bytes, None if unmeasurable) of a ``measured`` block."""

    seconds: float = 0.0
    peak_bytes: int | None = None


@contextmanager
def measured() -> Iterator[Section]:
    section = Section()
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        start_kb: int | None = _status_kb("VmRSS")
    except OSError:
        start_kb = None
    start = time.perf_counter()
    yield section
    section.seconds = time.perf_counter() - start
    if start_kb is not None:
        section.peak_bytes = (_status_kb("VmHWM") - start_kb) * 1024


# ---------------------------------------------------------------------------------- workload
@dataclass
class Workload:
    pool: list[PromptTrajectories]
    targets: list[PromptTrajectories]


def load_model(name: str) -> tuple[nn.Module, Any]:
    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _rows(
    families: Sequence[str], difficulties: Sequence[int], split: str, size: int, seed: int
) -> Any:
    """``size`` seeded-random distinct prompts spread evenly over the generator's cells."""
    per_cell = math.ceil(size / (len(difficulties) * len(families)))
    tasks = generate_tasks(families, difficulties, num_per_cell=per_cell, split=split, seed=seed)
    if len(tasks) < size:
        raise ValueError(f"only {len(tasks)} distinct {split} prompts exist, asked for {size}")
    return tasks.select(sorted(random.Random(seed).sample(range(len(tasks)), size)))


def collect(
    model: nn.Module,
    tokenizer: Any,
    splits: dict[str, tuple[Any, int]],
    temperature: float,
    max_new_tokens: int,
    seed: int,
    cache_dir: str | None,
) -> dict[str, list[PromptTrajectories]]:
    """Sample each split's rows (K responses each) through the product's cache."""
    encoder = PromptEncoder(tokenizer)  # the product's default prompt format (chat if any)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = TrajectoryCache(cache_dir or tmp)
        model_fp = fingerprint_model(model)
        for split, (rows, k) in splits.items():
            settings = SamplingSettings(
                k, temperature, 1.0, max_new_tokens, seed, encoder.fingerprint()
            )
            collector = Collector.for_model(
                model, encoder, HFGenerateEngine(), ExactNumberReward(), settings
            )
            data_fp = fingerprint_rows(rows)
            cache.collect(split, rows, collector, settings, model_fp, data_fp, rebuild=True)
            out[split] = cache.to_trajectories(split)[1]
    return out


def embedded_workload(model: nn.Module, tokenizer: Any, config: BenchConfig) -> Workload:
    families = ("add", "sub", "mul", "expr", "word", "cmp", "mod")
    got = collect(
        model,
        tokenizer,
        {
            "pool": (
                _rows(families, (1, 2, 3, 4), "train", config.pool_size, config.seed),
                config.pool_samples,
            ),
            "target": (
                _rows(("mul", "mod"), (1, 2, 3, 4), "validation", config.target_size, config.seed),
                config.target_samples,
            ),
        },
        config.temperature,
        config.max_new_tokens,
        config.seed,
        None if config.cache_dir is None else str(Path(config.cache_dir) / "embedded"),
    )
    return Workload(got["pool"], got["target"])


def smol_workload(model: nn.Module, tokenizer: Any, config: BenchConfig) -> Workload:
    """GSM8K-style questions SmolLM2-135M sometimes solves. Defaults: one-step word problems,
    whose answers need about 32 tokens of its chatter (at 16 tokens 30% of them had mixed
    rewards at K = 4, at 32 tokens 56%; two-digit sums and differences: 0-3%)."""
    got = collect(
        model,
        tokenizer,
        {
            "pool": (
                _rows(
                    config.smol_pool_families,
                    config.smol_pool_difficulties,
                    "train",
                    config.smol_pool,
                    config.seed,
                ),
                config.smol_samples,
            ),
            "target": (
                _rows(
                    config.smol_target_families,
                    config.smol_target_difficulties,
                    "validation",
                    config.smol_targets,
                    config.seed,
                ),
                config.smol_target_samples,
            ),
        },
        config.smol_temperature,
        config.smol_max_new_tokens,
        config.seed,
        None if config.cache_dir is None else str(Path(config.cache_dir) / "smollm2"),
    )
    return Workload(got["pool"], got["target"])


# ---------------------------------------------------------------------------------- exact pass
def eligible(trajs: Sequence[PromptTrajectories]) -> list[int]:
    """Indices of the prompts with mixed rewards (non-zero POPI gradient)."""
    return [i for i, z in enumerate(zero_mask(trajs)) if not z]


@dataclass
class Combined:
    """What one hooked forward/backward per eligible prompt gives (``combined_pass``)."""

    exact: Tensor  # (n,) float64 cosine of each eligible pool prompt's gradient with the target's
    vectors: dict[str, Tensor]  # name -> (n, dim) projections of the same pool gradients
    target_means: dict[str, Tensor]  # name -> (dim,) mean projection of the target gradients
    seconds_per_prompt: float  # the hooked forward/backward and gradient assembly alone


def combined_pass(
    model: nn.Module,
    pool: Sequence[PromptTrajectories],
    targets: Sequence[PromptTrajectories],
    projectors: dict[str, tuple[SparseProjector, int]],
    factorised: FactorisedProjection | None = None,
) -> Combined:
    """Exact cosines of the eligible pool prompts and, from the very same per-prompt gradients,
    each projector's vectors (a projector covers the flat layout from its offset on, e.g. a
    parameter subset at the end) and the factorised projection, one prompt at a time.
    Memory: the target mean gradient (one d-vector) plus one prompt's gradient."""
    grads = POPIGradients(model, POPIConfig(), 1, "hooks")
    modules = {**grads.hooked_modules, **(factorised.layers if factorised else {})}
    device = next(model.parameters()).device
    seconds, count = 0.0, 0

    def passes(
        trajs: Sequence[PromptTrajectories],
    ) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        nonlocal seconds, count
        with gradient_mode(model, grads.config):
            for i in eligible(trajs):
                start = time.perf_counter()
                calls = hooked_backward(model, modules, collate([trajs[i]], device), grads.config)
                flat = {k: v[0].reshape(-1) for k, v in grads.grads_from_calls(calls).items()}
                seconds += time.perf_counter() - start
                count += 1
                if count % 10 == 0:
                    print(f"exact pass: {count} prompts, {seconds / count:.1f} s each", flush=True)
                vectors = {}
                for name, (projector, offset) in projectors.items():
                    state = projector.begin(1)
                    for param in grads.param_names:
                        at = grads.offsets[param]
                        if at >= offset:
                            projector.add(state, at - offset, flat[param][None])
                    vectors[name] = projector.finish(state)[0]
                if factorised is not None:
                    vectors["factorised"] = factorised.project_calls(calls)[0]
                yield flat, vectors

    mean: dict[str, Tensor] = {}
    target_sums: dict[str, Tensor] = {}
    n_targets = 0
    for flat, vectors in passes(targets):
        for k, v in flat.items():
            mean[k] = mean[k] + v if k in mean else v.clone()
        for k, v in vectors.items():
            target_sums[k] = target_sums[k] + v.double() if k in target_sums else v.double()
        n_targets += 1
    if n_targets == 0:
        raise ValueError("no target prompt has mixed rewards: the target gradient is zero")
    for k in mean:
        mean[k] /= n_targets
    mean_norm = math.sqrt(sum(v.double().square().sum().item() for v in mean.values()))
    exact, pool_vectors = [], {}
    for flat, vectors in passes(pool):
        dot = sum((flat[k].double() @ mean[k].double()).item() for k in mean)
        norm = math.sqrt(sum(v.double().square().sum().item() for v in flat.values()))
        exact.append(dot / (norm * mean_norm))
        for k, v in vectors.items():
            pool_vectors.setdefault(k, []).append(v)
    return Combined(
        torch.tensor(exact, dtype=torch.float64),
        {k: torch.stack(v) for k, v in pool_vectors.items()},
        {k: (v / n_targets).float() for k, v in target_sums.items()},
        seconds / max(count, 1),
    )


def cosines(vectors: Tensor, target: Tensor) -> Tensor:
    """Cosine of each row with ``target`` in float64 (the product's ``cosine_scores``)."""
    vectors, target = vectors.double(), target.double()
    return (vectors @ target) / (vectors.norm(dim=1) * target.norm()).clamp_min(1e-300)


# ---------------------------------------------------------------------------------- options
@dataclass
class Row:
    """One way of scoring: cost and fidelity against exact scores."""

    name: str
    seconds_per_prompt: float
    peak_bytes: int | None
    bytes_per_prompt: int
    fidelity: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def scorer_row(
    name: str,
    scorer: InfluenceScorer,
    model: nn.Module,
    work: Workload,
    exact: Tensor,
    config: BenchConfig,
) -> Row:
    """``scorer`` end to end over the pool and the targets, timed, against exact scores."""
    with measured() as section:
        result = scorer.score(model, work.pool, {"target": work.targets}, progress=False)
    rows = eligible(work.pool)
    scores = result.scores["target"][rows].double()
    prompts = len(rows) + len(eligible(work.targets))
    return Row(
        name,
        section.seconds / prompts,
        section.peak_bytes,
        4 * result.pool_vectors.shape[1],
        fidelity(scores, exact, config.bootstrap, config.seed),
        {"seconds": section.seconds, "dim": result.pool_vectors.shape[1]},
    )


def linear_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def last_layer_filter(model: nn.Module) -> str:
    """Parameters of the last decoder layer, the final norm and the head: the backward of a
    parameter subset stops at the last layer."""
    layers = [name for name, _ in model.named_parameters() if ".layers." in name]
    last = max(int(name.split(".layers.")[1].split(".")[0]) for name in layers)
    return rf"\.layers\.{last}\.|\.norm\.weight$|lm_head"


def factorised_side(model: nn.Module, dim: int, pattern: str | None = None) -> int:
    """k_in = k_out such that the factorised dimension is about ``dim``."""
    count = sum(1 for name in linear_layers(model) if pattern is None or re.search(pattern, name))
    return max(1, round(math.sqrt(dim / count)))


def countsketch(config: BenchConfig, dim: int) -> ProjectionConfig:
    """The CountSketch every section scores with, at ``dim``, drawn from ``config.seed``."""
    return ProjectionConfig(dim=dim, kind="countsketch", seed=config.seed)


COMPILED_FIRST = "countsketch, torch.compile, first pass (compiles)"
COMPILED_AFTER = "countsketch, torch.compile, second pass"
BF16_HOOKS = "countsketch k={k}, bf16 autocast, eager attention, hooks"  # the config's pass
HOOKS = "countsketch k={k}, hooks (8 prompts/backward)"  # the config's engine in float32
BF16_POPI = POPIConfig(  # as configs/cropi_tiny.yaml
    autocast_bf16=True, attn_implementation="eager", share_prompt_cache=True
)
CONFIG_PROMPTS_PER_BATCH = 24  # as configs/cropi_tiny.yaml


def embedded_rows(
    model: nn.Module, work: Workload, exact: Tensor, config: BenchConfig
) -> list[Row]:
    """Every cost option of the scorer on the embedded policy."""
    k = config.default_dim
    sketch = countsketch(config, k)
    side = factorised_side(model, k)
    options: dict[str, InfluenceScorer] = {}
    for dim in config.dims:
        options[f"countsketch k={dim}"] = InfluenceScorer(
            projection=countsketch(config, dim), method="loop"
        )
    options[f"gaussian k={k} kept=0.1 (previous default)"] = InfluenceScorer(
        projection=ProjectionConfig(dim=k, kind="gaussian", kept_fraction=0.1, seed=config.seed),
        method="loop",
    )
    options[f"countsketch k={k}, last layer + head"] = InfluenceScorer(
        POPIConfig(param_filter=last_layer_filter(model)), sketch, method="loop"
    )
    options[f"countsketch k={k}, K'={config.fewer_responses}"] = InfluenceScorer(
        projection=sketch, method="loop", responses_per_prompt=config.fewer_responses
    )
    options[f"countsketch k={k}, bf16 autocast"] = InfluenceScorer(
        POPIConfig(autocast_bf16=True), sketch, method="loop"
    )
    options[HOOKS.format(k=k)] = InfluenceScorer(projection=sketch, method="hooks")
    options[BF16_HOOKS.format(k=k)] = InfluenceScorer(
        BF16_POPI, sketch, CONFIG_PROMPTS_PER_BATCH, method="hooks"
    )
    options[f"factorised {side}x{side} per linear layer"] = InfluenceScorer(
        projection=sketch, factorised=(side, side)
    )
    # torch.compile (inductor, dynamic shapes): the first pass pays the compilation; the second
    # reuses the compiled graphs, so it shows what fusing the small element-wise ops buys
    compiled = torch.compile(model, dynamic=True)  # lazy: compiles on the first call
    models = {}
    for name in (COMPILED_FIRST, COMPILED_AFTER):
        options[name] = InfluenceScorer(projection=sketch, method="loop")
        models[name] = compiled
    rows = []
    for name, scorer in options.items():
        if any(word in name for word in config.skip_options):
            continue
        rows.append(scorer_row(name, scorer, models.get(name, model), work, exact, config))
        print(
            f"  {name}: {rows[-1].seconds_per_prompt:.4f} s/prompt, "
            f"p@10 {rows[-1].fidelity['precision_at_10pct']:.3f}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------- roofline
def gemm_peak(
    threads: int, size: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32
) -> float:
    """Best FLOP/s of square ``dtype`` matmuls (the machine's attainable GEMM throughput)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def steady_pass_seconds(
    scorer: InfluenceScorer, model: nn.Module, work: Workload, repeats: int
) -> list[float]:
    """Seconds of ``repeats`` back-to-back passes of one scorer over the pool and the targets:
    after the first its map is drawn and its shapes and memory are warm, so the best of them is
    the pass's steady rate, the counterpart of the best-of GEMM peak."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer.score(model, work.pool, {"target": work.targets}, progress=False)
        seconds.append(time.perf_counter() - start)
    return seconds


def model_gemm_rate(model: nn.Module, tokens: int, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of the matmuls one forward/backward of ``tokens`` rows through the
    model's linear layers runs (input @ W^T, grad @ W, grad^T @ input): the ceiling that the
    layer shapes, not the machine, set for the per-prompt loop."""
    flops, seconds = 0.0, 0.0
    for shape in sorted({m.weight.shape for m in model.modules() if isinstance(m, nn.Linear)}):
        out_features, in_features = shape
        x, w = torch.randn(tokens, in_features), torch.randn(out_features, in_features)
        g = torch.randn(tokens, out_features)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, w.t()), torch.mm(g, w), torch.mm(g.t(), x)
            best = min(best, time.perf_counter() - start)
        flops += 3 * 2 * tokens * in_features * out_features
        seconds += best
    return flops / seconds


def block_tokens(traj: PromptTrajectories) -> int:
    """U x T rows of a prompt's padded block of distinct responses, as one loop backward
    computes it."""
    length = len(traj.prompt_ids) + max(map(len, traj.completion_ids))
    return len(distinct_responses(traj)) * length


def mean_block_tokens(trajs: Sequence[PromptTrajectories]) -> int:
    """Mean block rows (:func:`block_tokens`) of the eligible prompts."""
    sizes = [block_tokens(trajs[i]) for i in eligible(trajs)]
    return round(sum(sizes) / len(sizes))


def pass_flops(model: nn.Module, trajs: Sequence[PromptTrajectories]) -> float:
    """Forward (2) + backward (4) FLOPs per token and linear weight, over the eligible prompts'
    padded (U, T) blocks as the loop computes them (attention scores are left out)."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    tokens = sum(block_tokens(trajs[i]) for i in eligible(trajs))
    return 6.0 * weights * tokens


# ---------------------------------------------------------------------------------- sections
def embedded_section(config: BenchConfig) -> dict[str, Any]:
    """Fidelity of every option on a large pool, the roofline and the selection pass."""
    model, tokenizer = load_model(config.model)
    work = embedded_workload(model, tokenizer, config)
    with measured() as exact_section:
        combined = combined_pass(model, work.pool, work.targets, {})
    rows = embedded_rows(model, work, combined.exact, config)
    fast = [  # the second compiled pass leaves its compilation out: not a whole-cost option
        r
        for r in rows
        if r.fidelity["precision_at_10pct"] >= PRECISION_TARGET and r.name != COMPILED_AFTER
    ]
    default = (
        min(fast, key=lambda r: r.seconds_per_prompt)
        if fast
        else max(rows, key=lambda r: r.fidelity["precision_at_10pct"])
    )
    named = {r.name: r for r in rows}
    sketch_row = named[f"countsketch k={config.default_dim}"]
    peak = gemm_peak(config.threads)
    block = mean_block_tokens(work.pool)
    shape_rate = model_gemm_rate(model, block)
    flops = pass_flops(model, work.pool) + pass_flops(model, work.targets)
    achieved = flops / sketch_row.extra["seconds"]
    bf16_peak = gemm_peak(config.threads, dtype=torch.bfloat16)

    def fraction(name: str, of_peak: float) -> float | None:
        """The pass's counted FLOPs over row ``name``'s seconds, against ``of_peak`` (None if the
        row was skipped); a row that pads its rows runs more FLOPs than counted."""
        row = named.get(name)
        return None if row is None else flops / row.extra["seconds"] / of_peak

    sketch = countsketch(config, config.default_dim)
    steady = {
        method: steady_pass_seconds(
            InfluenceScorer(projection=sketch, method=method), model, work, config.roofline_repeats
        )
        for method in ("loop", "hooks")
    }
    steady_fraction = {method: flops / min(s) / peak for method, s in steady.items()}
    for method, seconds in steady.items():
        print(
            f"  roofline, {method}: passes {', '.join(f'{s:.2f}' for s in seconds)} s, best "
            f"{steady_fraction[method]:.2f} of the fp32 GEMM peak ({peak / 1e9:.1f} GFLOP/s)",
            flush=True,
        )

    return {
        "model": config.model,
        "num_params": sum(p.numel() for p in model.parameters()),
        "pool_prompts": len(work.pool),
        "eligible_prompts": len(eligible(work.pool)),
        "target_prompts": len(work.targets),
        "eligible_targets": len(eligible(work.targets)),
        "exact_seconds": exact_section.seconds,
        "rows": [asdict(r) for r in rows],
        "fastest_at_precision_target": default.name if fast else None,
        "most_precise": max(rows, key=lambda r: r.fidelity["precision_at_10pct"]).name,
        "roofline": {
            "gemm_peak_flops": peak,
            "influence_pass_flops": flops,
            "influence_pass_seconds": sketch_row.extra["seconds"],
            "achieved_flops": achieved,
            "fraction_of_peak": achieved / peak,
            "mean_block_tokens": block,
            "model_shape_gemm_flops": shape_rate,
            "model_shape_gemm_fraction_of_peak": shape_rate / peak,
            "fraction_of_model_shape_gemm": achieved / shape_rate,
            "hooks_fraction_of_peak": fraction(HOOKS.format(k=config.default_dim), peak),
            "compiled_second_pass_fraction_of_peak": fraction(COMPILED_AFTER, peak),
            "steady_seconds": steady,
            "steady_fraction_of_peak": steady_fraction,
            "bf16_gemm_peak_flops": bf16_peak,
            "bf16_hooks_fraction_of_bf16_peak": fraction(
                BF16_HOOKS.format(k=config.default_dim), bf16_peak
            ),
            "counted": "6 FLOPs per token and linear weight (forward 2, backward 4), padded "
            "(U, T) blocks of distinct responses of the eligible pool and target prompts, "
            "countsketch k=default row (loop method), attention scores not counted; "
            "steady_*: best of roofline_repeats back-to-back passes per engine",
        },
    }


def selection_section(config: BenchConfig) -> dict[str, Any]:
    """The influence passes of ``--selection-config`` (``configs/cropi_tiny.yaml``) in that run's
    own training steps, and each cost option's agreement with exact scores.

    A ``fit`` runs the config as the README's main command does (``train_steps`` > 0 cuts it to
    that many steps + 1). Its ``selections/stage-*.metrics.json`` give each pass's seconds
    (``influence_seconds``: stage 0's selection seconds also hold the first trajectory
    collection) and its TensorBoard step times the step: the mean of every step, as the pass's
    mean includes its first, so the ratio is total pass time over total step time per step. Step
    times are bimodal (a long prompt with a long completion pads the whole batch to about twice
    its usual width), so the median sits in one mode; it is reported beside the mean, as is
    the first pass, which pays the process's one-time costs. The options then score the same
    cached trajectories with the initial policy (what stage 0 scored), timed, and are compared
    per target with exact cosines by precision@10% (``agreement``). The FLOP
    floor is the pass's forward and backward FLOPs (:func:`pass_flops`) at the machine's GEMM
    peak, in steps: what no implementation of the full-model exact pass gets much below (it
    counts each prompt's padded block of distinct responses and leaves attention out). Last, the
    main command with GRPO micro-batches of ``lean_micro_batch_size`` rows (length-sorted, each
    trimmed to its own longest row, so one long row no longer pads them all) runs in a fresh
    process, and its passes are priced in its own, leaner steps
    (``step_equivalents_vs_lean_step``)."""
    from reproduce_acceleration import scalars, step_seconds

    from cropi_pl.cli import main as cli_main
    from cropi_pl.curriculum.callback import CurriculumCallback

    base = ["--config", config.selection_config, *config.selection_overrides]
    if config.train_steps:
        base += ["--trainer.max_steps", str(config.train_steps + 1)]

    def timings(root: Path) -> tuple[list[dict[str, float]], list[float], dict[int, float]]:
        """Each stage's metrics, each pass's seconds and each step's seconds of the fit under
        ``root``."""
        metrics = [
            json.loads(path.read_text())
            for path in sorted((root / "selections").glob("stage-*.metrics.json"))
        ]
        passes = [m["curriculum/influence_seconds"] for m in metrics]
        return metrics, passes, step_seconds(scalars(root))

    with tempfile.TemporaryDirectory() as tmp:
        args = [*base, "--trainer.default_root_dir", tmp]
        cli_main(["fit", *args])
        metrics, passes, per_step = timings(Path(tmp))
        step_s = statistics.mean(per_step.values())
        median_step_s = statistics.median(per_step.values())
        cli = cli_main(args, run=False)
        module, data = cli.model, cli.datamodule
        data.trainer = cli.trainer  # for default_root_dir: the fit's cache is reused
        model = module.initial_policy()
        cache, _ = data.trajectories(model, module)
        pool = cache.to_trajectories("pool")[1]
        targets = {n: cache.to_trajectories(f"target/{n}")[1] for n in data.target_names()}
        curriculum = next(c for c in cli.trainer.callbacks if isinstance(c, CurriculumCallback))
        scorer = curriculum.scorer
    rows = eligible(pool)
    chosen = {name: scorer.target_subset(trajs) for name, trajs in targets.items()}
    exact = {name: combined_pass(model, pool, trajs, {}).exact for name, trajs in chosen.items()}
    flops = pass_flops(model, pool) + sum(pass_flops(model, trajs) for trajs in chosen.values())
    dtype = torch.bfloat16 if scorer.popi.autocast_bf16 else torch.float32
    peak = gemm_peak(config.threads, dtype=dtype)
    options = {"config": scorer, **selection_options(model, scorer)}
    measured_options = {}
    for name, option in options.items():
        with measured() as section:
            result = option.score(model, pool, targets, progress=False)
        measured_options[name] = {
            "pass_seconds": section.seconds,
            "step_equivalents": section.seconds / step_s,
            "agreement_precision_at_10pct": {
                t: precision_at(result.scores[t][rows].double(), exact[t]) for t in targets
            },
        }
    lean: dict[str, Any] = {}
    if config.lean_micro_batch_size:  # a fresh process: it pays its own first pass
        with tempfile.TemporaryDirectory() as tmp:
            command = [
                sys.executable, "-m", "cropi_pl", "fit", *base, "--trainer.default_root_dir", tmp,
                "--model.init_args.micro_batch_size", str(config.lean_micro_batch_size),
            ]  # fmt: skip
            subprocess.run(command, check=True)
            _, lean_passes, lean_steps = timings(Path(tmp))
        lean_step_s = statistics.mean(lean_steps.values())
        lean = {
            "lean_micro_batch_size": config.lean_micro_batch_size,
            "lean_fit_pass_seconds": lean_passes,
            "lean_train_step_seconds": lean_step_s,
            "lean_median_train_step_seconds": statistics.median(lean_steps.values()),
            "step_equivalents_vs_lean_step": statistics.mean(lean_passes) / lean_step_s,
        }
    return {
        "config_file": config.selection_config,
        "pool_prompts": len(pool),
        "eligible_prompts": len(rows),
        "eligible_targets": {t: len(eligible(trajs)) for t, trajs in targets.items()},
        "fit_pass_seconds": passes,  # stage by stage
        "fit_selection_seconds_with_collection": metrics[0]["curriculum/selection_seconds"],
        "train_step_seconds": step_s,  # mean of every step
        "train_steps_timed": len(per_step),
        "median_train_step_seconds": median_step_s,
        "each_train_step_seconds": [per_step[s] for s in sorted(per_step)],
        "step_equivalents": statistics.mean(passes) / step_s,
        "step_equivalents_vs_median_step": statistics.mean(passes) / median_step_s,
        "first_pass_step_equivalents": passes[0] / step_s,
        "agreement_precision_at_10pct": measured_options["config"]["agreement_precision_at_10pct"],
        "pass_flops": flops,
        "gemm_peak_flops": peak,
        "gemm_peak_dtype": str(dtype).removeprefix("torch."),  # the config's pass runs in it
        "flop_floor_step_equivalents": flops / peak / step_s,
        **lean,
        "options": measured_options,
    }


def selection_options(model: nn.Module, scorer: InfluenceScorer) -> dict[str, InfluenceScorer]:
    """Variants of the config's scorer: other CountSketch seeds at its k and at 4k (CountSketch's
    cost does not depend on k), other numbers of prompts per backward, fewer responses, the last
    layer + head only, float32 instead of bf16 autocast, one backward per prompt, each response
    with its own copy of the prompt (``share_prompt_cache`` off), that and every stored response
    at 8 prompts per backward (the default before deduplication) and the default before bf16
    (the float32 per-prompt loop through the model's own attention kernel)."""

    def variant(**changes: Any) -> InfluenceScorer:
        settings = {
            "popi": scorer.popi,
            "projection": scorer.projection,
            "prompts_per_batch": scorer.prompts_per_batch,
            "max_target_prompts": scorer.max_target_prompts,
            "seed": scorer.seed,
            "method": scorer.method,
            "responses_per_prompt": scorer.responses_per_prompt,
            **changes,
        }
        return InfluenceScorer(**settings)

    sketches = {
        f"k={dim}, sketch seed {seed}": variant(
            projection=replace(scorer.projection, dim=dim, seed=seed)
        )
        for dim in (scorer.projection.dim, 4 * scorer.projection.dim)
        for seed in (1, 2, 3)
    }
    batches = {
        f"{n} prompts per backward": variant(prompts_per_batch=n)
        for n in (8, 16, 24, 32)
        if n != scorer.prompts_per_batch
    }
    return {
        **sketches,
        **batches,
        "K'=4": variant(responses_per_prompt=4),
        "last layer + head": variant(
            popi=replace(scorer.popi, param_filter=last_layer_filter(model))
        ),
        "float32 (no autocast)": variant(popi=replace(scorer.popi, autocast_bf16=False)),
        "loop (one backward per prompt)": variant(
            method="loop", popi=replace(scorer.popi, share_prompt_cache=False)
        ),
        "prompt once per response (share_prompt_cache off)": variant(
            popi=replace(scorer.popi, share_prompt_cache=False)
        ),
        "every response, prompt once per response, 8 prompts per backward": variant(
            prompts_per_batch=8,
            popi=replace(scorer.popi, deduplicate=False, share_prompt_cache=False),
        ),
        "float32 loop, sdpa (the default before bf16)": variant(
            method="loop",
            popi=replace(
                scorer.popi, autocast_bf16=False, attn_implementation=None, share_prompt_cache=False
            ),
        ),
    }


def smollm2_section(config: BenchConfig) -> dict[str, Any]:
    """Reference vs our default vs the factorised path (and a parameter subset, and the default
    in bf16 autocast with eager attention and hooks) at one k."""
    model, tokenizer = load_model(config.smol_model)
    work = smol_workload(model, tokenizer, config)
    k = config.smol_dim
    sketch = countsketch(config, k)
    full = POPIGradients(model, POPIConfig(), 1, "loop")
    layers = sorted(
        {int(n.split(".layers.")[1].split(".")[0]) for n in full.param_names if ".layers." in n}
    )
    subset_filter = rf"\.layers\.({'|'.join(map(str, layers[-4:]))})\.|\.norm\.weight$"
    subset = POPIGradients(model, POPIConfig(param_filter=subset_filter), 1, "loop")
    offset = full.offsets[subset.param_names[0]]
    if full.param_names[-len(subset.param_names) :] != subset.param_names:
        raise ValueError(f"{subset_filter} is not a tail of the parameter layout")
    side = factorised_side(model, k)
    factorised = FactorisedProjection(model, POPIConfig(), side, side, seed=config.seed)
    projectors = {
        "default": (SparseProjector(full.num_params, sketch), 0),
        "subset": (SparseProjector(subset.num_params, sketch), offset),
    }
    print(
        f"smollm2: {len(eligible(work.pool))} eligible of {len(work.pool)} pool prompts, "
        f"{len(eligible(work.targets))} of {len(work.targets)} targets",
        flush=True,
    )
    with measured() as exact_section:
        pool = [work.pool[i] for i in eligible(work.pool)[: config.smol_max_eligible]]
        combined = combined_pass(model, pool, work.targets, projectors, factorised)
    precision = {
        name: fidelity(
            cosines(v, combined.target_means[name]), combined.exact, config.bootstrap, config.seed
        )
        for name, v in combined.vectors.items()
    }
    timed = pool[: config.smol_timed]
    engines = {
        "default": InfluenceScorer(projection=sketch, method="loop"),
        "subset": InfluenceScorer(POPIConfig(param_filter=subset_filter), sketch, method="loop"),
        "factorised": InfluenceScorer(projection=sketch, factorised=(side, side)),
        "bf16 hooks": InfluenceScorer(
            BF16_POPI,
            sketch,
            prompts_per_batch=config.smol_prompts_per_batch,
            method="hooks",
        ),
    }
    # the bf16 pass's vectors differ from the float32 ones, so it scores the pool on its own
    scored = engines["bf16 hooks"].score(model, pool, {"t": work.targets}, progress=False)
    precision["bf16 hooks"] = fidelity(
        scored.scores["t"].double(), combined.exact, config.bootstrap, config.seed
    )
    timing = {}
    for name, scorer in engines.items():
        with measured() as section:
            vectors, _ = scorer.project(model, timed, progress=False)
        expected = combined.vectors["default" if name == "bf16 hooks" else name][: len(timed)]
        timing[name] = {
            "seconds_per_prompt": section.seconds / len(timed),
            "peak_bytes": section.peak_bytes,
            "bytes_per_prompt": 4 * vectors.shape[1],
            "dim": vectors.shape[1],
            "max_rel_diff_vs_combined_pass": (
                (vectors.double() - expected.double()).norm(dim=1) / expected.double().norm(dim=1)
            )
            .max()
            .item(),
        }
    with measured() as grad_section:
        for _ in full.compute_pieces(timed):
            pass
    reference = reference_projection(full.num_params, k, config)
    t_ref = grad_section.seconds / len(timed) + reference["projection_seconds_per_prompt"]
    rows = {
        "reference": {
            "seconds_per_prompt": t_ref,
            "gradient_seconds_per_prompt": grad_section.seconds / len(timed),
            "peak_bytes": grad_section.peak_bytes,
            "matrix_bytes_fp16": 2 * full.num_params * k,
            "bytes_per_prompt": 2 * k,
            "precision_at_10pct": None,
            **reference,
        },
        **{
            name: {**timing[name], **precision[name]}
            for name in ("default", "subset", "factorised", "bf16 hooks")
        },
    }
    default = rows["default"]
    return {
        "model": config.smol_model,
        "num_params": full.num_params,
        "k": k,
        "factorised_side": side,
        "subset_filter": subset_filter,
        "pool_prompts": len(work.pool),
        "eligible_prompts": len(eligible(work.pool)),
        "scored_eligible_prompts": len(pool),
        "target_prompts": len(work.targets),
        "eligible_targets": len(eligible(work.targets)),
        "timed_prompts": len(timed),
        "combined_pass_seconds": exact_section.seconds,
        "combined_pass_seconds_per_prompt": combined.seconds_per_prompt,
        "rows": rows,
        "precision_at_10pct": default["precision_at_10pct"],
        "precision_at_10pct_ci95": default["precision_at_10pct_ci95"],
        "speedup_vs_reference": t_ref / default["seconds_per_prompt"],
        "factorised_speedup_vs_reference": t_ref / rows["factorised"]["seconds_per_prompt"],
        "subset_speedup_vs_reference": t_ref / rows["subset"]["seconds_per_prompt"],
        "bf16_hooks_speedup_vs_reference": t_ref / rows["bf16 hooks"]["seconds_per_prompt"],
    }


def reference_projection(d: int, k: int, config: BenchConfig) -> dict[str, Any]:
    """Dense Gaussian projection of full gradients to k in fp32, 16 gradients per GEMM (TRAK's
    batching), timed on ``reference_slice`` coordinates and extrapolated linearly to d."""
    width = min(config.reference_slice, d)
    gen = torch.Generator().manual_seed(config.seed)
    matrix = torch.randn(width, k, generator=gen)  # stored, as TRAK's; generation not timed
    grads = torch.randn(16, width, generator=gen)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(grads, matrix)
        best = min(best, time.perf_counter() - start)
    return {
        "projection_seconds_per_prompt": best / 16 * d / width,
        "projection_timed_on_coordinates": width,
        "projection_extrapolated_to": d,
    }


# ---------------------------------------------------------------------------------- report
def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| setting | s/prompt | peak MB | bytes/prompt | p@5% | p@10% [95% CI] | p@20% | "
        "Spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def line(name: str, r: dict[str, Any]) -> str:
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.0f}"
        f = r.get("fidelity", r)
        if f.get("precision_at_10pct") is None:
            return (
                f"| {name} | {r['seconds_per_prompt']:.3f} | {peak} | {r['bytes_per_prompt']} "
                "| - | - | - | - |"
            )
        lo, hi = f["precision_at_10pct_ci95"]
        return (
            f"| {name} | {r['seconds_per_prompt']:.3f} | {peak} | {r['bytes_per_prompt']} | "
            f"{f['precision_at_5pct']:.2f} | {f['precision_at_10pct']:.2f} [{lo:.2f}, {hi:.2f}] | "
            f"{f['precision_at_20pct']:.2f} | {f['spearman']:.3f} |"
        )

    if "embedded" in result:
        for r in result["embedded"]["rows"]:
            lines.append(line(f"embedded: {r['name']}", r))
    if "smollm2" in result:
        for name, r in result["smollm2"]["rows"].items():
            lines.append(line(f"SmolLM2-135M: {name}", r))
    return "\n".join(lines)


def run(config: BenchConfig, previous: dict[str, Any]) -> dict[str, Any]:
    """The chosen sections; sections not run are kept from ``previous`` (``--update``)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    kept = keep_freed_memory()  # as the CLI does: every section measures what a fit runs
    start = time.perf_counter()
    result = {k: v for k, v in previous.items() if k in SECTIONS}
    result.update(config=asdict(config), machine=machine_info(config.threads))
    unknown = set(config.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    for name in config.sections:
        print(f"section {name}", flush=True)
        if name == "embedded":
            result[name] = embedded_section(config)
        elif name == "selection":
            result[name] = selection_section(config)
        else:
            result[name] = smollm2_section(config)
        result[name]["config"] = asdict(config)
        result[name]["host_memory_kept"] = kept
        result[name]["huge_pages"] = HUGE_PAGES
        result[name]["wall_seconds"] = time.perf_counter() - start
        result[name]["load_average_at_end"] = os.getloadavg()
    return summarize(result, config)


SECTIONS = ("embedded", "selection", "smollm2")


def summarize(result: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    """The headline keys from whichever sections are present."""
    if "embedded" in result:
        embedded = result["embedded"]
        sketch = next(
            r for r in embedded["rows"] if r["name"] == f"countsketch k={config.default_dim}"
        )
        result["eligible_prompts"] = embedded["eligible_prompts"]
        result["precision_at_10pct"] = sketch["fidelity"]["precision_at_10pct"]
        result["precision_at_10pct_ci95"] = sketch["fidelity"]["precision_at_10pct_ci95"]
        # the config's engine (hooks) in float32, steady state: the peak is a best-of too
        result["gemm_fraction_of_peak"] = embedded["roofline"]["steady_fraction_of_peak"]["hooks"]
        result["fastest_at_precision_target"] = embedded["fastest_at_precision_target"]
    if "selection" in result:
        result["selection_pass_step_equivalents"] = result["selection"].get("step_equivalents")
        result["selection_pass_step_equivalents_vs_lean_step"] = result["selection"].get(
            "step_equivalents_vs_lean_step"
        )
    if "smollm2" in result:
        result["smollm2"]["precision_at_10pct"] = result["smollm2"]["rows"]["default"][
            "precision_at_10pct"
        ]
    result["table"] = format_table(result)
    return result


def _tuple(kind: type) -> Callable[[str], tuple]:
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_influence.json"))
    for f in BenchConfig.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        default = getattr(BenchConfig, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, type=_tuple(kind), default=default)
        elif default is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return BenchConfig(**args), out


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    previous = json.loads(out.read_text()) if config.update and out.is_file() else {}
    result = run(config, previous)
    print(result["table"])
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
