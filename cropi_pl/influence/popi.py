"""POPI: the off-policy loss of one prompt from its stored trajectories (docs/method.md 3).

CROPI scores a prompt by the gradient of its GRPO objective at the current parameters theta, but it
never samples fresh responses: the K responses stored from the behaviour policy beta are reweighted
with per-token importance ratios rho = pi_theta / beta. The gradient of one prompt is that of

    L(theta) = -(1/K) sum_i (1/|o_i|) sum_t rho_it(theta) A_i,

which at theta = beta (rho = 1) is exactly the on-policy GRPO gradient (same log-probs and
advantages as :mod:`cropi_pl.grpo`). This module holds the loss, the tensor layout every gradient
engine shares and beta's teacher-forced log-probs; :mod:`~cropi_pl.influence.gradients` turns the
loss into per-prompt gradients and :mod:`~cropi_pl.influence.factorised` into projected ones.

HF attention-mask code does not survive vmap, so sequences are RIGHT-padded (prompt, completion,
pad) and the model gets no attention mask: causal attention keeps real tokens blind to later pads,
and the loss masks the pad positions (pads get exactly zero gradient).

Identical responses of a prompt (same completion, same reward) have identical terms in L, so the
layout holds each distinct response once with its number of copies: the loss, hence the gradient,
is unchanged, and the forward/backward skips the copies (a policy sampling at low temperature, or
one that has learnt a prompt, repeats itself: 54% of the stored responses of
``configs/cropi_tiny.yaml``'s first pass are copies). With ``POPIConfig.share_prompt_cache``
the distinct responses of a prompt also share one forward of the prompt (``split_prompts``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from cropi_pl.grpo.advantages import group_advantages
from cropi_pl.grpo.losses import selective_log_softmax
from cropi_pl.influence.trajectories import PromptTrajectories, zero_mask
from cropi_pl.kv_cache import cache_keyword, cache_rows

RatioMode = Literal["none", "clip", "truncate"]
_RATIO_MODES = ("none", "clip", "truncate")
_PAD_ID = 0  # any valid id: right pads are never attended to and never scored


@dataclass
class POPIConfig:
    r"""How the off-policy surrogate treats ratios and group statistics.

    ``ratio_mode``: "none" uses rho as is (the paper's default); "clip" clamps rho to
    [1 - ratio_bound, 1 + ratio_bound] (zero gradient outside, like ``torch.clamp``); "truncate"
    uses min(rho, 1 + ratio_bound) (truncated importance sampling).
    ``reweight_group_stats``: importance-weight the group mean/std of the rewards with detached
    sequence weights w_i proportional to exp(mean_t log rho_it), so the baseline estimates the
    current policy's group instead of beta's.
    ``param_filter``: regex (``re.search``) on parameter names; None = every trainable parameter.
    A subset that leaves out the early layers (e.g. ``r"layers\.(2[6-9])\.|norm|lm_head"``) also
    shortens the backward pass: autograd stops below the lowest selected parameter.
    ``autocast_bf16``: run the forward and backward under bfloat16 autocast (matmuls in bf16 with
    fp32 accumulation; log-probs, the loss and the returned gradients stay float32). Pays off where
    bf16 matmuls are fast: GPUs, and CPUs with bf16 units (``avx512_bf16`` or AMX in
    ``/proc/cpuinfo``; 2.4-3.8x fp32's rate at the embedded policy's shapes on this project's
    2-core VM). Elsewhere bf16 is emulated and slower than fp32, and the pass warns.
    ``deduplicate``: identical stored responses of a prompt (same completion and reward) run once,
    counted as often as they were stored (module doc); exact, so off only to measure what it saves.
    ``share_prompt_cache`` ("hooks" only): run each prompt once and its distinct completions
    against the prompt's cached keys and values (``split_prompts``), instead of one row per
    response repeating the prompt. Exact (the same logits); the cache keeps its graph, so the
    prompt's gradient arrives summed over its completions. Needs an HF causal LM (a KV cache, a
    4D additive ``attention_mask`` and ``position_ids``).
    ``attn_implementation``: the HF attention kernel during the pass (e.g. "eager", "sdpa"),
    restored afterwards; None keeps the model's. On CPU, for short sequences and small heads,
    "eager" beats "sdpa", whose fused backward is slow there, in bf16 about 4x slower than in
    fp32 (``tools/bench_influence.py``).
    """

    ratio_mode: RatioMode = "none"
    ratio_bound: float = 0.2
    reweight_group_stats: bool = False
    adv_eps: float = 1e-4
    param_filter: str | None = None
    autocast_bf16: bool = False
    deduplicate: bool = True
    share_prompt_cache: bool = False
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.ratio_mode not in _RATIO_MODES:
            raise ValueError(f"ratio_mode must be one of {_RATIO_MODES}, got {self.ratio_mode!r}")
        if self.ratio_bound <= 0:
            raise ValueError(f"ratio_bound must be > 0, got {self.ratio_bound}")
        if self.ratio_mode == "clip" and self.ratio_bound >= 1:
            raise ValueError(
                f"ratio_bound must be < 1 for ratio_mode='clip' (lower clip 1 - bound), "
                f"got {self.ratio_bound}"
            )
        if self.adv_eps <= 0:
            raise ValueError(f"adv_eps must be > 0, got {self.adv_eps}")


class Block(NamedTuple):
    """Right-padded tensors of prompts' distinct responses (U rows of the K stored ones); the
    leading dim is dropped inside vmap."""

    input_ids: Tensor  # (..., U, T) long
    target_mask: Tensor  # (..., U, T - 1) bool: position j predicts completion token j + 1
    behaviour: Tensor  # (..., U, T - 1) float32, 0 where not a target
    rewards: Tensor  # (..., K) float32: every stored reward, NaN after the prompt's own K
    first: Tensor  # (..., U) long: index into rewards of the row's first copy (0 for padding)
    copies: Tensor  # (..., U) float32: stored responses the row stands for (0 for padding)


class SharedPrompts(NamedTuple):
    """A ``Block`` as two forwards: each prompt once, then the real rows' completions attending
    to their prompt's cached keys and values."""

    prompt_ids: Tensor  # (p, N) long, right-padded
    completion_ids: Tensor  # (R, C) long, right-padded
    position_ids: Tensor  # (R, C) long: a completion's positions continue its prompt's
    attention_mask: Tensor  # (R, 1, C, N + C) float32: 0 where attended, float32 min elsewhere
    owner: Tensor  # (R,) long: the prompt of each row
    source: Tensor  # (R, T) long: row of cat(prompt logits (p*N), completion logits (R*C))
    #                 holding the logits of each position of the block's real rows


def split_prompts(block: Block) -> SharedPrompts:
    """Split the block's real rows into prompts and completions such that, gathered through
    ``source``, the two forwards give exactly the rows' own logits: a completion token sees its
    prompt (and not the prompt's pads) and the earlier tokens of its own completion."""
    p, _, t = block.input_ids.shape
    owner, row = (block.copies > 0).nonzero(as_tuple=True)
    n_prompt = block.target_mask[:, 0].int().argmax(-1) + 1  # first target + 1
    lengths = block.target_mask[owner, row].sum(-1)  # (R,) completion lengths
    width, span = int(n_prompt.max()), int(lengths.max())
    positions = torch.arange(t, device=block.input_ids.device)
    prompt_ids = torch.where(
        positions[:width] < n_prompt[:, None], block.input_ids[:, 0, :width], _PAD_ID
    )
    start = n_prompt[owner][:, None]  # (R, 1)
    offsets = positions[:span]
    completion_ids = block.input_ids[owner, row].gather(1, (start + offsets).clamp(max=t - 1))
    completion_ids = torch.where(offsets < lengths[:, None], completion_ids, _PAD_ID)
    keys = torch.arange(width + span, device=positions.device)
    allowed = torch.where(  # (R, C, N + C)
        keys < width,
        keys < start[:, :, None],
        (keys - width)[None, None] <= offsets[None, :, None],
    )
    mask = torch.zeros(allowed.shape, device=positions.device)
    mask = mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]
    # position j of a row: prompt logits up to its last prompt token, then completion logits
    in_prompt = owner[:, None] * width + positions.clamp(max=width - 1)
    in_completion = p * width + torch.arange(len(owner), device=positions.device)[:, None] * span
    in_completion = in_completion + (positions - start).clamp(0, span - 1)
    source = torch.where(positions < start, in_prompt, in_completion)
    return SharedPrompts(prompt_ids, completion_ids, start + offsets, mask, owner, source)


def distinct_responses(traj: PromptTrajectories) -> list[list[int]]:
    """Indices of the stored responses grouped by (completion, reward), in order of first
    appearance: each group contributes identical terms to the POPI loss."""
    groups: dict[tuple[tuple[int, ...], float], list[int]] = {}
    for i, (completion, reward) in enumerate(zip(traj.completion_ids, traj.rewards, strict=True)):
        groups.setdefault((tuple(completion), reward), []).append(i)
    return list(groups.values())


def layout(
    prompt_ids: Sequence[int], completion_ids: Sequence[Sequence[int]], length: int
) -> tuple[Tensor, Tensor]:
    """(K, length) right-padded ids of prompt+completion and the (K, length-1) target mask."""
    ids = torch.full((len(completion_ids), length), _PAD_ID, dtype=torch.long)
    target = torch.zeros(len(completion_ids), length - 1, dtype=torch.bool)
    n_prompt = len(prompt_ids)
    for i, completion in enumerate(completion_ids):
        end = n_prompt + len(completion)
        ids[i, :end] = torch.tensor([*prompt_ids, *completion], dtype=torch.long)
        target[i, n_prompt - 1 : end - 1] = True
    return ids, target


def collate(
    trajs: Sequence[PromptTrajectories], device: torch.device, deduplicate: bool = True
) -> Block:
    """Pad prompts' distinct responses (every response unless ``deduplicate``) to a common
    (U, T) so vmap sees equal shapes. A row takes its first copy's behaviour log-probs (the
    copies' agree up to float rounding)."""
    groups = [
        distinct_responses(t) if deduplicate else [[i] for i in range(len(t.rewards))]
        for t in trajs
    ]
    u = max(map(len, groups))
    k = max(len(t.completion_ids) for t in trajs)
    length = max(len(t.prompt_ids) + max(map(len, t.completion_ids)) for t in trajs)
    ids = torch.full((len(trajs), u, length), _PAD_ID, dtype=torch.long)
    target = torch.zeros(len(trajs), u, length - 1, dtype=torch.bool)
    behaviour = torch.zeros(len(trajs), u, length - 1, dtype=torch.float32)
    rewards = torch.full((len(trajs), k), torch.nan, dtype=torch.float32)
    first = torch.zeros(len(trajs), u, dtype=torch.long)
    copies = torch.zeros(len(trajs), u, dtype=torch.float32)
    for j, (traj, group) in enumerate(zip(trajs, groups, strict=True)):
        n, rows = len(group), [members[0] for members in group]
        completions = [traj.completion_ids[i] for i in rows]
        ids[j, :n], target[j, :n] = layout(traj.prompt_ids, completions, length)
        behaviour[j, :n][target[j, :n]] = torch.tensor(
            [lp for i in rows for lp in traj.behaviour_logps[i]], dtype=torch.float32
        )
        rewards[j, : len(traj.rewards)] = torch.tensor(traj.rewards, dtype=torch.float32)
        first[j, :n] = torch.tensor(rows)
        copies[j, :n] = torch.tensor([len(members) for members in group], dtype=torch.float32)
    return Block(*(x.to(device) for x in (ids, target, behaviour, rewards, first, copies)))


def _check(traj: PromptTrajectories, row: int, vocab_size: int | None) -> None:
    """Fail early, naming the prompt (and response) that is malformed."""
    k = len(traj.completion_ids)
    if k == 0:
        raise ValueError(f"trajs[{row}]: no completions")
    if not traj.prompt_ids:
        raise ValueError(f"trajs[{row}]: empty prompt_ids")
    if len(traj.behaviour_logps) != k or len(traj.rewards) != k:
        raise ValueError(
            f"trajs[{row}]: {k} completions but {len(traj.behaviour_logps)} behaviour_logps rows "
            f"and {len(traj.rewards)} rewards"
        )
    for i, (completion, logps) in enumerate(
        zip(traj.completion_ids, traj.behaviour_logps, strict=True)
    ):
        if not completion:
            raise ValueError(f"trajs[{row}].completion_ids[{i}] is empty (1/|o_i| undefined)")
        if len(logps) != len(completion):
            raise ValueError(
                f"trajs[{row}].behaviour_logps[{i}] has {len(logps)} entries for "
                f"{len(completion)} completion tokens"
            )
    values = [*traj.rewards, *(lp for row in traj.behaviour_logps for lp in row)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"trajs[{row}]: non-finite reward or behaviour log-prob")
    if vocab_size is not None:
        tokens = [*traj.prompt_ids, *(t for c in traj.completion_ids for t in c)]
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"trajs[{row}]: token ids {bad[:5]} outside vocab [0, {vocab_size})")


def plan_batches(
    trajs: Sequence[PromptTrajectories], vocab_size: int | None, prompts_per_batch: int
) -> list[list[int]]:
    """Validate, drop zero-gradient prompts and batch the rest in length order to limit padding,
    the longest batch first: the shorter ones reuse the memory it freed (a process's first pass
    of ``configs/cropi_tiny.yaml`` faulted in 89-94k fresh pages instead of 118-120k, 0.2 s
    less). Within a batch, prompts with as many distinct responses are adjacent (``hooks`` sums
    their gradients with one batched matmul)."""
    for row, traj in enumerate(trajs):
        _check(traj, row, vocab_size)
    zero = zero_mask(trajs)
    order = sorted(
        (i for i in range(len(trajs)) if not zero[i]),
        key=lambda i: len(trajs[i].prompt_ids) + max(map(len, trajs[i].completion_ids)),
    )
    batches = [order[s : s + prompts_per_batch] for s in range(0, len(order), prompts_per_batch)]
    return [sorted(b, key=lambda i: len(distinct_responses(trajs[i]))) for b in batches[::-1]]


def vocab_size_of(model: nn.Module) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "num_embeddings", None)


def logits_of(output: object) -> Tensor:
    return output.logits if hasattr(output, "logits") else output  # HF output or a plain tensor


def next_token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(n, T-1) float32 log p(x_{j+1} | x_{<=j}) from (n, T, V) logits (grpo's helper)."""
    return selective_log_softmax(logits[:, :-1], input_ids[:, 1:])


def _weighted_advantages(rewards: Tensor, weights: Tensor, copies: Tensor, eps: float) -> Tensor:
    """(r - mean_w r) / (std_w r + eps) of distinct responses whose weights sum to 1, a row
    standing for ``copies`` stored responses that share its weight equally.

    The variance uses the reliability-weights correction 1/(1 - sum w^2) over the stored
    responses (a row's copies add w^2 / copies), which is the unbiased std of GRPO's
    ``group_advantages`` for uniform weights w = 1/K and stays consistent under reweighting.
    """
    mean = (weights * rewards).sum()
    spread = (weights * (rewards - mean) ** 2).sum()
    squares = (weights**2 / copies.clamp_min(1)).sum()  # padding rows: weight 0
    # weights collapsed on one response leave 0/0: clamp, the advantages then just grow large
    var = spread / (1 - squares).clamp_min(torch.finfo(weights.dtype).tiny)
    return (rewards - mean) / (var.sqrt() + eps)


def prompt_loss(logits: Tensor, block: Block, config: POPIConfig) -> Tensor:
    """The per-prompt POPI surrogate from the model's (U, T, V) logits (shared by every path),
    each distinct response counted ``copies`` times."""
    mask = block.target_mask
    logp = next_token_logps(logits, block.input_ids)
    log_rho = torch.where(mask, logp - block.behaviour, torch.zeros_like(logp))
    rho = log_rho.exp()
    if config.ratio_mode == "clip":
        rho = rho.clamp(1 - config.ratio_bound, 1 + config.ratio_bound)
    elif config.ratio_mode == "truncate":
        rho = rho.clamp(max=1 + config.ratio_bound)
    lengths = mask.sum(-1).clamp_min(1)
    copies = block.copies
    if config.reweight_group_stats:  # a row's weight: its copies' (log 0 = -inf for padding)
        seq_log_w = log_rho.detach().sum(-1) / lengths
        weights = (seq_log_w + copies.log()).softmax(-1)
        rewards = block.rewards.gather(-1, block.first)
        advantages = _weighted_advantages(rewards, weights, copies, config.adv_eps)
    else:  # the NaN padding is unscorable to grpo: outside the group statistics
        stored = group_advantages(block.rewards[None], "group", config.adv_eps)[0]
        advantages = stored.gather(-1, block.first)
    per_response = torch.where(mask, rho, torch.zeros_like(rho)).sum(-1) / lengths
    return -(per_response * advantages * copies).sum() / copies.sum()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the gradient pass; every submodule's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


@contextmanager
def attention_kernel(model: nn.Module, name: str | None) -> Iterator[None]:
    """``model`` runs HF attention ``name`` inside the block and its own kernel again after it."""
    if name is None:
        yield
        return
    switch = getattr(model, "set_attn_implementation", None)
    if not callable(switch):
        raise ValueError(
            f"popi.attn_implementation={name!r} needs a transformers model; "
            f"{type(model).__name__} has no set_attn_implementation"
        )
    previous = model.config._attn_implementation
    switch(name)
    try:
        yield
    finally:
        switch(previous)


_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has bf16 matmul units (``avx512_bf16`` or AMX); None where the flags
    cannot be read (not Linux). Read once per process: every pass asks."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return None
    return any(flag in flags for flag in _BF16_FLAGS)


@contextmanager
def gradient_mode(model: nn.Module, config: POPIConfig) -> Iterator[None]:
    """Eval mode and ``config.attn_implementation``, under bfloat16 autocast when
    ``config.autocast_bf16`` (with a warning on a CPU that emulates bf16: slower than fp32)."""
    device = next(model.parameters()).device
    if config.autocast_bf16 and device.type == "cpu" and cpu_bf16_units() is False:
        warnings.warn(
            "popi.autocast_bf16 on a CPU without bf16 units (no avx512_bf16 or amx_bf16 in "
            "/proc/cpuinfo): the influence pass runs slower than in float32; set "
            "autocast_bf16: false",
            stacklevel=3,
        )
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=config.autocast_bf16)
    with eval_mode(model), attention_kernel(model, config.attn_implementation), autocast:
        yield


def prompt_rows(block: Block) -> list[int]:
    """Distinct responses (real rows) of each prompt of ``block``."""
    return (block.copies > 0).sum(-1).tolist()


def real_rows(block: Block) -> Tensor:
    """(R, T) ids of every prompt's real rows, prompt after prompt: the padding rows of a
    (p, U, T) block are left out, so a batch of prompts costs its distinct responses only."""
    return block.input_ids[block.copies > 0]


def shared_prompt_logits(model: nn.Module, shared: SharedPrompts) -> Tensor:
    """(R, T, V) logits of the block's real rows from ``split_prompts``' two forwards; the
    cached keys and values keep their graph, so gradients reach the prompt's tokens once per
    prompt, summed over its rows."""
    keyword = cache_keyword(model)
    prompts = model(shared.prompt_ids, use_cache=True)
    cache = cache_rows(getattr(prompts, keyword), shared.owner)
    completions = model(
        shared.completion_ids,
        attention_mask=shared.attention_mask,
        position_ids=shared.position_ids,
        **{keyword: cache},
    )
    flat = torch.cat([logits_of(prompts).flatten(0, 1), logits_of(completions).flatten(0, 1)])
    return flat[shared.source]


def block_logits(
    model: nn.Module, block: Block, config: POPIConfig
) -> tuple[Tensor, SharedPrompts | None]:
    """(R, T, V) logits of ``real_rows(block)``: one forward or, with
    ``config.share_prompt_cache``, ``shared_prompt_logits``' two (whose layout comes back too)."""
    if config.share_prompt_cache:
        shared = split_prompts(block)
        return shared_prompt_logits(model, shared), shared
    return logits_of(model(real_rows(block))), None


def batch_loss(logits: Tensor, block: Block, rows: list[int], config: POPIConfig) -> Tensor:
    """Sum over prompts of the per-prompt loss from the (R, T, V) logits of ``real_rows``, prompt
    j owning the next ``rows[j]`` (``prompt_rows``): a prompt's rows only reach its own term, so
    the gradient through each row is that prompt's own gradient."""
    terms = []
    for j, (chunk, u) in enumerate(zip(logits.split(rows), rows, strict=True)):
        ids, mask, behaviour = (x[j, :u] for x in block[:3])
        own = Block(ids, mask, behaviour, block.rewards[j], block.first[j, :u], block.copies[j, :u])
        terms.append(prompt_loss(chunk, own, config))
    return sum(terms)


@torch.no_grad()
def behaviour_logps(
    model: nn.Module,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[Sequence[int]],
    batch_size: int | None = None,
) -> list[list[float]]:
    """Teacher-forced per-token log-probs of each completion under ``model`` (beta's log-probs).

    Right-padded batches with no attention mask: the same layout the gradient pass uses, so
    rho is exactly 1 at theta = beta up to float rounding.
    """
    if not prompt_ids:
        raise ValueError("behaviour_logps: empty prompt_ids")
    for i, completion in enumerate(completion_ids):
        if not completion:
            raise ValueError(f"behaviour_logps: completion_ids[{i}] is empty")
    step = batch_size or max(len(completion_ids), 1)
    out: list[list[float]] = []
    with eval_mode(model):
        device = next(model.parameters()).device
        for start in range(0, len(completion_ids), step):
            chunk = completion_ids[start : start + step]
            length = len(prompt_ids) + max(map(len, chunk))
            ids, target = layout(prompt_ids, chunk, length)
            logp = next_token_logps(logits_of(model(ids.to(device))), ids.to(device)).cpu()
            out.extend(logp[i][target[i]].tolist() for i in range(len(chunk)))
    return out
