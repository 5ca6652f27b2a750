"""Benchmark the influence pass: exact vs projected POPI scores, and a reference-style loop.

Setup (not timed): a pool of arithmetic training prompts and a target set (mul + mod validation
prompts) are sampled from the policy through the product's trajectory cache (K = 8 pool / 16 target
responses at temperature 0.5, exact-number rewards). Prompts whose K rewards are all equal have a
zero POPI gradient and are excluded from every ranking. Then, on the same prompts:

* exact: the cosine of each pool prompt's full, unprojected POPI gradient with the mean full
  gradient of the target prompts (float32 gradients, float64 reductions, the product's
  ``target_mean``/``cosine_scores``);
* ours: the product path, ``POPIGradients`` (its default method on this device, batches of
  ``--prompts-per-batch``) then ``SparseProjector`` (``--projection-batch`` gradients per call),
  over a sweep of JL dims k and kept fractions; and ``FactorisedProjection`` (LoGra-style, the
  gradient is never formed) for a few (k_in, k_out);
* reference: what the authors' code does: one ``torch.autograd.grad`` per prompt through the same
  POPI loss, the full flat gradient, a uniformly random coordinate subset, a dense Gaussian matrix
  generated once and stored in fp16, and an fp16 projection to the same k as ours.
* gradient methods: the per-prompt gradient time of each ``POPIGradients`` method ("loop", and
  "hooks" and "vmap" at each of ``--method-batches`` prompts per backward) over the same prompts,
  with each one's largest relative difference from the product path's gradients.

Scores are compared by precision@10% (overlap of the projected top 10% with the exact top 10%, the
paper's metric) and Spearman correlation over the eligible pool prompts.

Timing. Reference: wall time of its per-prompt loop over every eligible pool and target prompt. Ours
(sparse rows): ``t_grad + t_proj`` per prompt, where ``t_grad`` is the wall time of the product's
gradient pass over the same prompts (it alternates with the reference loop batch by batch, so drifts
in machine load hit both alike) and ``t_proj`` that of projecting them with the calls the product
makes (``InfluenceScorer`` buffers ``--projection-batch`` gradients per call because each call
regenerates the random matrix). The default setting also runs end to end through
``InfluenceScorer.project`` over the pool (``scorer_check``), which must give the same vectors in
about the same time. Factorised rows are timed end to end over every eligible prompt. On a shared
machine pass ``--threads 1``: with more threads than free cores, OpenMP barriers make the many small
ops of a tiny model several times slower (8x measured for sampling), which swamps what is being
compared.

fp16 on the CPU. A CPU has no fp16 arithmetic: torch's half GEMM converts to fp32, accumulates in
fp32 and rounds the result to fp16, tens of times slower than fp32 GEMM. The reference is therefore
run as fp32 GEMM on fp16-rounded operands with the output rounded to fp16, which is the same
arithmetic at fp32 GEMM speed (the matrix holds fp16 values in an fp32 buffer); this favours the
reference. The literal half kernel is timed on two prompts and reported in the reference row as
``half_kernel_seconds_per_prompt`` (with its deviation from the emulation).

Memory. Peak resident memory of each timed section above its starting RSS, from Linux's VmHWM after
resetting it through /proc/self/clear_refs (torch allocations are invisible to tracemalloc); freed
memory is returned with ``malloc_trim`` first. Approximate (allocator caching), and null where /proc
cannot be used. Sparse rows report the larger of the gradient pass's and the batch projection's
peak; the reference adds its resident fp16 matrix. Bytes stored per prompt: k * 4 (float32) for
ours, k * 2 (fp16, as TRAK stores) for the reference.

    python tools/bench_influence.py --out results/bench_influence.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from benchlib import machine_info
from torch import Tensor, nn

from cropi_pl.influence.factorised import FactorisedProjection
from cropi_pl.influence.gradients import POPIGradients
from cropi_pl.influence.popi import POPIConfig
from cropi_pl.influence.projection import ProjectionConfig, SparseProjector
from cropi_pl.influence.scorer import InfluenceScorer
from cropi_pl.influence.selection import cosine_scores, selection_size, target_mean
from cropi_pl.influence.trajectories import PromptTrajectories, zero_mask

PRECISION_TARGET = 0.90
SPEEDUP_TARGET = 5.0
TOP_FRACTION = 0.1


@dataclass(frozen=True)
class BenchConfig:
    """The workload; every field is a command-line flag."""

    model: str = "embedded:tiny"
    pool_size: int = 300
    target_size: int = 60
    pool_samples: int = 8
    target_samples: int = 16
    temperature: float = 0.5
    max_new_tokens: int = 48
    dims: tuple[int, ...] = (512, 2048, 8192)
    fractions: tuple[float, ...] = (1.0, 0.1, 0.01)
    default_dim: int = 2048  # configs/cropi_tiny.yaml
    default_fraction: float = 0.1  # configs/cropi_tiny.yaml
    factorised: tuple[str, ...] = ("8x8", "16x16", "32x32")
    reference_fraction: float = 0.1
    prompts_per_batch: int = 8  # CurriculumCallback's defaults
    method_batches: tuple[int, ...] = (8, 16, 32)
    projection_batch: int = 128
    max_target_prompts: int = 100
    threads: int = 2
    seed: int = 0
    fake_rewards: bool = False
    cache_dir: str | None = None


# ---------------------------------------------------------------------------------- metrics
def top_set(scores: Tensor, n: int) -> set[int]:
    """Indices of the ``n`` highest scores, ties broken by the lower index (as the selectors do)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return set(order[:n].tolist())


def precision_at(scores: Tensor, exact: Tensor, fraction: float = TOP_FRACTION) -> float:
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


def influence_scores(pool: Tensor, targets: Tensor, max_targets: int, seed: int) -> Tensor:
    """The product's scoring of vectors (gradients or projections): cosine with the target mean."""
    mean = target_mean(targets, torch.ones(targets.shape[0], dtype=torch.bool), max_targets, seed)
    return cosine_scores(pool, mean).double()


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
    pass_rates: dict[str, float]  # pool prompt id -> fraction of its K samples rewarded


def _rows(config: BenchConfig, split: str, size: int, families: Sequence[str] | None) -> Any:
    """``size`` seeded-random distinct prompts spread evenly over the generator's cells."""
    from cropi_pl.tasks.arithmetic import FAMILIES, generate_tasks

    families = tuple(families or FAMILIES)
    per_cell = math.ceil(size / (4 * len(families)))
    tasks = generate_tasks(families, num_per_cell=per_cell, split=split, seed=config.seed)
    if len(tasks) < size:
        raise ValueError(f"only {len(tasks)} distinct {split} prompts exist, asked for {size}")
    chosen = sorted(random.Random(config.seed).sample(range(len(tasks)), size))
    return tasks.select(chosen)


def _fake(trajs: list[PromptTrajectories], seed: int) -> list[PromptTrajectories]:
    """Debug only: seeded random 0/1 rewards, so a random policy still has non-zero gradients."""
    rng = random.Random(seed)
    return [replace(t, rewards=[float(rng.random() < 0.5) for _ in t.rewards]) for t in trajs]


def make_workload(model: nn.Module, tokenizer: Any, config: BenchConfig) -> Workload:
    """Sample pool and target trajectories through the product's cache (reused if it matches)."""
    from cropi_pl.generation.hf import HFGenerateEngine
    from cropi_pl.influence.cache import TrajectoryCache
    from cropi_pl.influence.collector import Collector, SamplingSettings
    from cropi_pl.influence.fingerprints import fingerprint_model, fingerprint_rows
    from cropi_pl.policy.prompting import PromptEncoder
    from cropi_pl.rewards.numeric import ExactNumberReward

    encoder = PromptEncoder(tokenizer)  # the product's default prompt format ("auto")
    splits = {
        "pool": (_rows(config, "train", config.pool_size, None), config.pool_samples),
        "target": (
            _rows(config, "validation", config.target_size, ("mul", "mod")),
            config.target_samples,
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = TrajectoryCache(config.cache_dir or tmp)
        model_fp = fingerprint_model(model)
        loaded: dict[str, tuple[list[str], list[PromptTrajectories]]] = {}
        for split, (rows, k) in splits.items():
            settings = SamplingSettings(
                k,
                config.temperature,
                1.0,
                config.max_new_tokens,
                config.seed,
                encoder.fingerprint(),
            )
            collector = Collector.for_model(
                model, encoder, HFGenerateEngine(), ExactNumberReward(), settings
            )
            cache.collect(
                split, rows, collector, settings, model_fp, fingerprint_rows(rows), rebuild=True
            )
            loaded[split] = cache.to_trajectories(split)
        rates = cache.pass_rates("pool")
    pool, targets = loaded["pool"][1], loaded["target"][1]
    if config.fake_rewards:
        pool, targets = _fake(pool, config.seed), _fake(targets, config.seed + 1)
    return Workload(pool, targets, rates)


# ---------------------------------------------------------------------------------- passes
class ReferenceProjector:
    """The authors' TRAK-style projection: a uniformly random coordinate subset and a dense
    Gaussian matrix generated once and stored in fp16; fp16 inputs and output (module doc)."""

    def __init__(self, num_params: int, kept_fraction: float, dim: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        kept = max(1, round(kept_fraction * num_params))
        self.index = torch.randperm(num_params, generator=gen)[:kept].sort().values
        self.matrix = torch.randn(kept, dim, generator=gen).div_(math.sqrt(dim))
        self.matrix.copy_(self.matrix.half())  # fp16 values, fp32 buffer for the CPU GEMM
        self.matrix_bytes_fp16 = self.matrix.numel() * 2

    def project(self, flat: Tensor) -> Tensor:
        """(P, d) -> (P, k) fp16: fp16-rounded inputs, fp32 accumulation, fp16 output."""
        return (flat[:, self.index].half().float() @ self.matrix).half()

    def project_half_kernel(self, flat: Tensor) -> Tensor:
        """The same through torch's literal half GEMM (slow on CPUs)."""
        return flat[:, self.index].half() @ self.matrix.half()


@dataclass
class Passes:
    """Full gradients (ours) and reference projections of the eligible prompts: rows are the
    eligible pool prompts, then the eligible target prompts."""

    pool_rows: list[int]  # indices into the pool
    target_rows: list[int]  # indices into the target set
    grads: Tensor  # (P + T, d) float32
    reference: Tensor  # (P + T, k) fp16
    batches: tuple[list[list[int]], ...]  # per set (pool, targets): product batches as rows
    ours: Section
    reference_section: Section

    @property
    def prompts(self) -> int:
        return self.grads.shape[0]

    def projection_groups(self, projection_batch: int) -> list[list[int]]:
        """The rows of each projection call ``InfluenceScorer`` makes: per set, its gradient
        batches in order are buffered until ``projection_batch`` rows, and the rest at the end."""
        groups = []
        for batches in self.batches:
            pending: list[int] = []
            for batch in batches:
                pending += batch
                if len(pending) >= projection_batch:
                    groups.append(pending)
                    pending = []
            if pending:
                groups.append(pending)
        return groups

    def split(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """(pool rows, target rows) of a per-prompt tensor."""
        return values[: len(self.pool_rows)], values[len(self.pool_rows) :]


def _length(traj: PromptTrajectories) -> int:
    return len(traj.prompt_ids) + max(map(len, traj.completion_ids))


def _max_known(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _eligible(trajs: list[PromptTrajectories], name: str) -> list[int]:
    rows = [i for i, zero in enumerate(zero_mask(trajs)) if not zero]
    if not rows:
        raise ValueError(
            f"every {name} prompt has all-equal rewards (zero POPI gradient); the policy solves "
            "too few or too many prompts: use a larger --pool-size/--target-size or another --model"
        )
    return rows


def gradient_passes(
    model: nn.Module, work: Workload, projector: ReferenceProjector, config: BenchConfig
) -> Passes:
    """Full gradients the product's way (vmapped batches of B prompts of similar length, one set
    at a time) and the reference (one ``autograd.grad`` per prompt, then its projection).

    The two alternate batch by batch, so drifts in machine load affect both alike; one batch of
    each runs first, untimed, to exclude one-time costs."""
    pool_rows, target_rows = _eligible(work.pool, "pool"), _eligible(work.targets, "target")
    prompts = [work.pool[i] for i in pool_rows] + [work.targets[i] for i in target_rows]
    ours = POPIGradients(model, POPIConfig(), config.prompts_per_batch)  # the product default
    loop = POPIGradients(model, POPIConfig(), prompts_per_batch=1, method="loop")
    grads = torch.zeros(len(prompts), ours.num_params)  # pages touched now, not while timed
    reference = torch.zeros(len(prompts), projector.matrix.shape[1], dtype=torch.float16)
    step = config.prompts_per_batch
    batches = tuple(
        [order[s : s + step] for s in range(0, len(order), step)]
        for order in (
            sorted(rows, key=lambda j: _length(prompts[j]))  # as POPIGradients batches them
            for rows in (range(len(pool_rows)), range(len(pool_rows), len(prompts)))
        )
    )

    def run_ours(batch: list[int]) -> None:
        for inner, flat in ours.compute([prompts[j] for j in batch]):
            grads[[batch[i] for i in inner]] = flat

    def run_reference(batch: list[int]) -> None:
        for j in batch:
            for _, flat in loop.compute([prompts[j]]):
                reference[j] = projector.project(flat)[0]

    run_ours(batches[0][0])
    run_reference(batches[0][0])
    sections = (Section(peak_bytes=None), Section(peak_bytes=None))
    steps = list(zip((run_ours, run_reference), sections, strict=True))
    for b, batch in enumerate(batches[0] + batches[1]):
        for run_step, total in steps if b % 2 == 0 else steps[::-1]:
            with measured() as part:
                run_step(batch)
            total.seconds += part.seconds
            total.peak_bytes = _max_known(total.peak_bytes, part.peak_bytes)
    return Passes(pool_rows, target_rows, grads, reference, batches, *sections)


def reference_checks(projector: ReferenceProjector, grads: Tensor) -> dict[str, float]:
    """fp16 underflow of the kept gradient coordinates, and the literal half GEMM on 2 prompts."""
    kept = grads[:, projector.index]
    nonzero = kept != 0
    underflow = (nonzero & (kept.half() == 0)).sum().item() / max(1, nonzero.sum().item())
    sample = grads[:2]
    start = time.perf_counter()
    literal = projector.project_half_kernel(sample)
    seconds = (time.perf_counter() - start) / sample.shape[0]
    emulated = projector.project(sample).double()
    return {
        "kept_gradient_underflow_fraction_fp16": underflow,
        "half_kernel_seconds_per_prompt": seconds,
        "half_kernel_relative_difference": (
            (literal.double() - emulated).norm() / emulated.norm()
        ).item(),
    }


def gradient_methods(
    model: nn.Module, work: Workload, passes: Passes, config: BenchConfig
) -> dict[str, dict[str, float]]:
    """Seconds per prompt of each ``POPIGradients`` method over the eligible prompts (one warm-up
    batch untimed), and its largest relative difference from the product path's gradients."""
    pool, targets = passes.pool_rows, passes.target_rows
    prompts = [work.pool[i] for i in pool] + [work.targets[i] for i in targets]
    runs = [("loop", config.prompts_per_batch)] + [
        (method, b) for method in ("hooks", "vmap") for b in config.method_batches
    ]
    out = {}
    for method, batch in runs:
        grads = POPIGradients(model, POPIConfig(), batch, method)
        list(grads.compute(prompts[:batch]))
        worst = 0.0
        with measured() as section:
            for rows, flat in grads.compute(prompts):
                expected = passes.grads[rows]
                diff = (flat - expected).norm(dim=1) / expected.norm(dim=1)
                worst = max(worst, diff.max().item())
        out[method if method == "loop" else f"{method} x{batch}"] = {
            "seconds_per_prompt": section.seconds / len(prompts),
            "max_relative_difference": worst,
            "peak_bytes": section.peak_bytes,
        }
    return out


# ---------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of the table."""

    method: str
    setting: str
    dim: int
    precision_at_10pct: float
    spearman: float
    seconds_per_prompt: float
    peak_bytes: int | None
    bytes_per_prompt: int
    extra: dict[str, Any] = field(default_factory=dict)

    def speedup(self, reference_seconds: float) -> float:
        return reference_seconds / self.seconds_per_prompt


def sparse_row(
    passes: Passes, exact: Tensor, dim: int, fraction: float, config: BenchConfig
) -> tuple[Row, Tensor]:
    """The product's SparseProjector at (dim, fraction), called on the same row groups as
    ``InfluenceScorer`` (gather of the buffered gradients included), every call timed."""
    projector = SparseProjector(
        passes.grads.shape[1],
        ProjectionConfig(dim=dim, kept_fraction=fraction, seed=config.seed),
    )
    vectors = torch.zeros(passes.prompts, dim)
    projection = Section(peak_bytes=None)
    groups = passes.projection_groups(config.projection_batch)
    for group in groups:
        with measured() as part:
            vectors[group] = projector.project(passes.grads[group])
        projection.seconds += part.seconds
        projection.peak_bytes = _max_known(projection.peak_bytes, part.peak_bytes)
    scores = influence_scores(*passes.split(vectors), config.max_target_prompts, config.seed)
    t_grad = passes.ours.seconds / passes.prompts
    row = Row(
        method="ours: POPIGradients + SparseProjector",
        setting=f"k={dim} kept={fraction:g}",
        dim=dim,
        precision_at_10pct=precision_at(scores, exact),
        spearman=spearman(scores, exact),
        seconds_per_prompt=t_grad + projection.seconds / passes.prompts,
        peak_bytes=_max_known(passes.ours.peak_bytes, projection.peak_bytes),
        bytes_per_prompt=dim * 4,
        extra={
            "kept_fraction": fraction,
            "kept_coordinates": projector.num_kept,
            "gradient_seconds_per_prompt": t_grad,
            "projection_seconds_per_prompt": projection.seconds / passes.prompts,
            "projection_calls": len(groups),
            "projection_peak_bytes": projection.peak_bytes,
        },
    )
    return row, vectors


def scorer_check(
    model: nn.Module, work: Workload, passes: Passes, vectors: Tensor, config: BenchConfig
) -> dict[str, Any]:
    """The default setting end to end through ``InfluenceScorer.project`` over the whole pool:
    its vectors must equal the sweep's, and its time per prompt must be close to the sweep's."""
    scorer = InfluenceScorer(
        POPIConfig(),
        ProjectionConfig(
            dim=config.default_dim, kept_fraction=config.default_fraction, seed=config.seed
        ),
        config.prompts_per_batch,
        config.max_target_prompts,
        config.seed,
    )
    with measured() as section:
        got, nonzero = scorer.project(model, work.pool, progress=False)
    expected = passes.split(vectors)[0].double()
    rel = ((got[passes.pool_rows].double() - expected).norm() / expected.norm()).item()
    if nonzero.nonzero().flatten().tolist() != passes.pool_rows or rel > 1e-4:
        raise RuntimeError(f"InfluenceScorer disagrees with the sweep vectors (rel diff {rel:.2e})")
    return {
        "prompts": len(passes.pool_rows),
        "seconds_per_prompt": section.seconds / len(passes.pool_rows),
        "peak_bytes": section.peak_bytes,
        "relative_difference": rel,
    }


def factorised_row(
    model: nn.Module,
    work: Workload,
    passes: Passes,
    exact: Tensor,
    shape: str,
    config: BenchConfig,
) -> Row:
    """LoGra-style projection of every nn.Linear weight gradient, timed end to end."""
    k_in, k_out = (int(x) for x in shape.split("x"))
    projection = FactorisedProjection(
        model, POPIConfig(), k_in, k_out, config.seed, prompts_per_batch=config.prompts_per_batch
    )
    sets = [
        [trajs[i] for i in rows]
        for trajs, rows in ((work.pool, passes.pool_rows), (work.targets, passes.target_rows))
    ]
    list(projection.project(sets[0][: config.prompts_per_batch]))  # warm-up, untimed
    outputs = [torch.zeros(len(trajs), projection.dim) for trajs in sets]
    with measured() as section:
        for trajs, out in zip(sets, outputs, strict=True):
            for batch, vectors in projection.project(trajs):
                out[batch] = vectors
    scores = influence_scores(outputs[0], outputs[1], config.max_target_prompts, config.seed)
    return Row(
        method="ours: FactorisedProjection",
        setting=f"{shape} x {len(projection.layer_names)} linears",
        dim=projection.dim,
        precision_at_10pct=precision_at(scores, exact),
        spearman=spearman(scores, exact),
        seconds_per_prompt=section.seconds / passes.prompts,
        peak_bytes=section.peak_bytes,
        bytes_per_prompt=projection.dim * 4,
        extra={"k_in": k_in, "k_out": k_out, "layers": len(projection.layer_names)},
    )


def reference_row(
    passes: Passes, projector: ReferenceProjector, exact: Tensor, config: BenchConfig
) -> Row:
    """The reference loop's scores; its peak memory includes its resident fp16 matrix."""
    scores = influence_scores(
        *passes.split(passes.reference.float()), config.max_target_prompts, config.seed
    )
    peak = passes.reference_section.peak_bytes
    return Row(
        method="reference: loop + dense fp16",
        setting=f"k={config.default_dim} kept={config.reference_fraction:g}",
        dim=config.default_dim,
        precision_at_10pct=precision_at(scores, exact),
        spearman=spearman(scores, exact),
        seconds_per_prompt=passes.reference_section.seconds / passes.prompts,
        peak_bytes=None if peak is None else peak + projector.matrix_bytes_fp16,
        bytes_per_prompt=config.default_dim * 2,
        extra={
            "kept_coordinates": projector.index.numel(),
            "matrix_bytes_fp16": projector.matrix_bytes_fp16,
            **reference_checks(projector, passes.grads),
        },
    )


# ---------------------------------------------------------------------------------- report
def format_table(rows: list[Row], reference_seconds: float) -> str:
    header = (
        f"{'method':<40}{'setting':<30}{'P@10%':>7}{'spearman':>10}{'s/prompt':>10}"
        f"{'speedup':>9}{'peak MB':>9}{'bytes':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        lines.append(
            f"{r.method:<40}{r.setting:<30}{r.precision_at_10pct:>7.3f}{r.spearman:>10.3f}"
            f"{r.seconds_per_prompt:>10.4f}{r.speedup(reference_seconds):>9.2f}{peak:>9}"
            f"{r.bytes_per_prompt:>8}"
        )
    return "\n".join(lines)


@contextmanager
def phase(phases: dict[str, float], name: str) -> Iterator[None]:
    """Announce a phase and record its wall time (the whole-run budget is 10 minutes)."""
    print(f"[bench] {name}", flush=True)
    start = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - start


def run(config: BenchConfig) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cropi_pl.policy.build import resolve_model_path

    torch.set_num_threads(config.threads)
    wall = time.perf_counter()
    machine = machine_info(config.threads, "transformers")
    path = resolve_model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    phases: dict[str, float] = {}
    with phase(phases, "sampling trajectories"):
        work = make_workload(model, tokenizer, config)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    projector = ReferenceProjector(
        num_params, config.reference_fraction, config.default_dim, config.seed
    )
    matrix_seconds = time.perf_counter() - start
    with phase(phases, "full POPI gradients (ours) and the reference loop, interleaved"):
        passes = gradient_passes(model, work, projector, config)
    exact = influence_scores(*passes.split(passes.grads), config.max_target_prompts, config.seed)
    with phase(phases, "gradient methods"):
        methods = gradient_methods(model, work, passes, config)
    for name, timing in methods.items():
        print(f"{name:<12}{timing['seconds_per_prompt']:.4f} s/prompt", flush=True)
    rows: list[Row] = []
    default_vectors = None
    settings = [(d, f) for d in config.dims for f in config.fractions]
    if (config.default_dim, config.default_fraction) not in settings:
        settings.append((config.default_dim, config.default_fraction))
    for dim, fraction in settings:
        with phase(phases, f"sparse projection k={dim} kept={fraction:g}"):
            row, vectors = sparse_row(passes, exact, dim, fraction, config)
        rows.append(row)
        if (dim, fraction) == (config.default_dim, config.default_fraction):
            default, default_vectors = row, vectors
    with phase(phases, "InfluenceScorer end to end over the pool"):
        check = scorer_check(model, work, passes, default_vectors, config)
    for shape in config.factorised:
        with phase(phases, f"factorised projection {shape}"):
            rows.append(factorised_row(model, work, passes, exact, shape, config))
    reference = reference_row(passes, projector, exact, config)
    reference.extra["matrix_setup_seconds"] = matrix_seconds
    rows.append(reference)
    ref_s = reference.seconds_per_prompt
    meeting = [
        r.setting
        for r in rows
        if r is not reference
        and r.precision_at_10pct >= PRECISION_TARGET
        and r.speedup(ref_s) >= SPEEDUP_TARGET
    ]
    precise = [r for r in rows if r is not reference and r.precision_at_10pct >= PRECISION_TARGET]
    fastest = min(precise, key=lambda r: r.seconds_per_prompt) if precise else None
    table = format_table(rows, ref_s)
    print(table)
    eligible = len(passes.pool_rows)
    rates = list(work.pass_rates.values())
    return {
        "precision_at_10pct": default.precision_at_10pct,
        "reference_precision_at_10pct": reference.precision_at_10pct,
        "speedup_vs_reference": default.speedup(ref_s),
        "seconds_per_prompt": default.seconds_per_prompt,
        "reference_seconds_per_prompt": ref_s,
        "default_setting": {"dim": config.default_dim, "kept_fraction": config.default_fraction},
        "targets": {"precision_at_10pct": PRECISION_TARGET, "speedup_vs_reference": SPEEDUP_TARGET},
        "default_meets_targets": default.setting in meeting,
        "settings_meeting_targets": meeting,
        "fastest_meeting_precision_target": None
        if fastest is None
        else {
            "method": fastest.method,
            "setting": fastest.setting,
            "seconds_per_prompt": fastest.seconds_per_prompt,
            "speedup_vs_reference": fastest.speedup(ref_s),
            "precision_at_10pct": fastest.precision_at_10pct,
        },
        "scorer_check": check,
        "gradient_method": POPIGradients(model, POPIConfig()).method,
        "gradient_methods": methods,
        "rows": [asdict(r) | {"speedup_vs_reference": r.speedup(ref_s)} for r in rows],
        "table": table.splitlines(),
        "workload": {
            "model_path": path,
            "num_params": num_params,
            "pool_prompts": len(work.pool),
            "eligible_pool_prompts": eligible,
            "top_10pct_size": selection_size(eligible, TOP_FRACTION),
            "target_prompts": len(work.targets),
            "eligible_target_prompts": len(passes.target_rows),
            "pool_mean_pass_rate": sum(rates) / len(rates),
            "fake_rewards": config.fake_rewards,
            "timed_prompts": passes.prompts,
            "gradient_pass_seconds": passes.ours.seconds,
            "reference_loop_seconds": passes.reference_section.seconds,
        },
        "config": asdict(config),
        "machine": machine | {"load_average_at_end": os.getloadavg()},
        "phase_seconds": phases,
        "wall_seconds": time.perf_counter() - wall,
    }


def _csv(kind: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err

    return parse


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    lists = {
        "dims": _csv(int),
        "fractions": _csv(float),
        "factorised": _csv(str),
        "method_batches": _csv(int),
    }
    for key, value in asdict(defaults).items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help="debug: seeded random 0/1 rewards")
        elif key in lists:
            parser.add_argument(flag, type=lists[key], default=value, help="comma-separated")
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, default=value)
    parser.add_argument("--out", type=Path, default=Path("results/bench_influence.json"))
    args = parser.parse_args(argv)
    config = BenchConfig(**{key: getattr(args, key) for key in asdict(defaults)})
    positive = ("pool_size", "target_size", "prompts_per_batch", "projection_batch", "threads")
    for key in (*positive, "default_dim"):
        if getattr(config, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(config, key)}")
    if min(config.pool_samples, config.target_samples) < 2:
        parser.error("--pool-samples and --target-samples must be >= 2 (GRPO groups)")
    for key in ("dims", "method_batches"):
        if not getattr(config, key) or min(getattr(config, key)) < 1:
            flag = f"--{key.replace('_', '-')}"
            parser.error(f"{flag} must be positive integers, got {getattr(config, key)}")
    for fraction in (*config.fractions, config.default_fraction, config.reference_fraction):
        if not 0 < fraction <= 1:
            parser.error(f"kept fractions must be in (0, 1], got {fraction}")
    for shape in config.factorised:
        parts = shape.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--factorised entries look like 16x16, got {shape!r}")
    return config, args.out


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    result = run(config)
    print(
        f"precision@10% = {result['precision_at_10pct']:.3f} (reference "
        f"{result['reference_precision_at_10pct']:.3f}), seconds/prompt = "
        f"{result['seconds_per_prompt']:.4f}, speedup_vs_reference = "
        f"{result['speedup_vs_reference']:.2f}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
