"""Build, measure and locate the embedded starting policy.

RLVR only learns from prompts whose sampled answers disagree (GRPO advantages vanish when all
samples score the same), so curriculum selection only matters if the starting policy solves some
prompts always, some never and many sometimes. A tiny character-level Llama warm-started by a
short SFT on worked arithmetic solutions gives exactly that spread on a CPU: the SFT budget is
chosen so easy cells are mostly solved and hard ones rarely, and the build records the measured
spread next to the weights.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from cropi_pl.policy.embedded import EMBEDDED_GGUF, embedded_model_path
from cropi_pl.policy.tokenizer import build_tokenizer
from cropi_pl.tasks.arithmetic import SyntheticTasks
from cropi_pl.tasks.generated import GeneratedTasks
from cropi_pl.tasks.stepwise import StepwiseTasks

EMBEDDED_PREFIX = "embedded:"
# What the hub accepts as a repo id ("gpt2", "org/name"); any other missing path is a local one.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
METADATA_FILE = "cropi_policy.json"
# The task suites an embedded policy can be warm-started on (``tools/build_policy.py --tasks``).
TASK_SUITES: dict[str, type[GeneratedTasks]] = {
    "arithmetic": SyntheticTasks,
    "stepwise": StepwiseTasks,
}
ANSWER_PATTERN = re.compile(r"####\s*(-?\d+)")
PASS_RATE_BUCKETS = ("0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "1")


@dataclass(frozen=True)
class PolicySpec:
    """Architecture of the embedded policy; the defaults give ~0.8M parameters (fast CPU GRPO)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 160
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"PolicySpec: hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}), and num_heads by num_kv_heads ({self.num_kv_heads})"
            )

    def config(self, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=self.tie_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


def extract_answer(completion: str) -> str | None:
    """The integer after the first ``####``, or None when the completion never commits to one."""
    match = ANSWER_PATTERN.search(completion)
    return match.group(1) if match else None


def with_guesses(
    tasks: datasets.Dataset,
    fraction: float,
    seed: int,
    by_family: Mapping[str, float] | None = None,
) -> datasets.Dataset:
    """``tasks`` with the worked solution of a seeded ``fraction`` of rows replaced by the bare
    answer (``#### 282``); ``by_family`` sets another fraction for the families it names.

    A policy warm-started on this mix sometimes works the steps and sometimes guesses in one go,
    as pretrained models sometimes reason and sometimes answer outright; guesses fail on all
    but the easiest problems, so RL has a transferable skill to learn (work the steps), which
    a policy that always works them, and only slips, does not offer. Per-family fractions give
    some families a deficit of their own, which only their data teaches RL to remove.
    """
    rates = dict(by_family or {})
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"guess fraction must be in [0, 1), got {fraction}")
    for family, value in rates.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"guess fraction of family {family!r} must be in [0, 1), got {value}")
    unknown = sorted(set(rates) - set(tasks["family"]))
    if unknown:
        raise ValueError(
            f"guess fractions name families {unknown} that the tasks do not have "
            f"(families: {sorted(set(tasks['family']))})"
        )
    if fraction == 0.0 and not any(rates.values()):
        return tasks
    rng = random.Random(f"guesses-{seed}")
    guessed = [rng.random() < rates.get(family, fraction) for family in tasks["family"]]
    solutions = [
        f"#### {answer}" if guess else solution
        for guess, answer, solution in zip(guessed, tasks["answer"], tasks["solution"], strict=True)
    ]
    return tasks.remove_columns("solution").add_column("solution", solutions)


def _encode_sft(
    tokenizer: PreTrainedTokenizerBase, tasks: datasets.Dataset
) -> list[tuple[list[int], int]]:
    """(prompt + solution + eos ids, prompt length) per row, so the loss can skip the prompt."""
    examples = []
    for prompt, solution in zip(tasks["prompt"], tasks["solution"], strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(solution)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt_ids + target_ids, len(prompt_ids)))
    return examples


def _collate(examples: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch whose labels are -100 on prompt and padding tokens."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def supervised_finetune(
    model: PreTrainedModel,
    examples: Sequence[tuple[list[int], int]],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    min_lr_rate: float = 0.0,
) -> list[float]:
    """AdamW + warmup/cosine SFT (down to ``min_lr_rate * lr``) over seeded epoch permutations;
    returns the per-step losses.

    Batches are random, not grouped by length: that would halve the padding but make each
    batch one task family (lengths differ by family), which ruined SFT here (loss 0.66 vs 0.17).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, max(1, steps // 20), steps, min_lr_rate=min_lr_rate
    )
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="SFT", disable=not progress):
        while len(order) < batch_size:
            order.extend(torch.randperm(len(examples), generator=generator).tolist())
        batch = _collate([examples[i] for i in order[:batch_size]], pad_id)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: datasets.Dataset,
    num_samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = 64,
    prompts_per_batch: int = 64,
) -> list[list[str]]:
    """``num_samples`` completions per prompt, left-padded batches of ``prompts_per_batch``.

    ``temperature=None`` decodes greedily (then ``num_samples`` must be 1); otherwise samples
    from the torch global RNG, so seed it first for reproducible numbers.
    """
    if temperature is None and num_samples != 1:
        raise ValueError(f"greedy decoding gives one answer per prompt, got {num_samples=}")
    sampling = (
        {"do_sample": False}
        if temperature is None
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    out: list[list[str]] = []
    for start in range(0, len(tasks), prompts_per_batch):
        prompts = tasks[start : start + prompts_per_batch]["prompt"]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        texts = tokenizer.batch_decode(
            output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        out.extend(texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts)))
    return out


def pass_rates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: datasets.Dataset,
    num_samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = 64,
    prompts_per_batch: int = 64,
) -> list[float]:
    """Fraction of ``num_samples`` completions per prompt (see :func:`completions`) whose
    answer matches exactly."""
    samples = completions(
        model, tokenizer, tasks, num_samples, temperature, max_new_tokens, prompts_per_batch
    )
    return [
        sum(extract_answer(t) == answer for t in texts) / num_samples
        for texts, answer in zip(samples, tasks["answer"], strict=True)
    ]


def per_cell_mean(tasks: datasets.Dataset, values: Sequence[float]) -> dict[str, dict[str, float]]:
    """``{family: {difficulty: mean value}}`` over the rows of each cell."""
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for family, difficulty, value in zip(tasks["family"], tasks["difficulty"], values, strict=True):
        cells[family][str(difficulty)].append(value)
    return {f: {d: sum(v) / len(v) for d, v in ds.items()} for f, ds in cells.items()}


def pass_rate_histogram(rates: Sequence[float]) -> dict[str, int]:
    """Counts in :data:`PASS_RATE_BUCKETS`; the middle four are prompts GRPO can learn from."""
    counts = dict.fromkeys(PASS_RATE_BUCKETS, 0)
    for rate in rates:
        if rate == 0:
            counts["0"] += 1
        elif rate == 1:
            counts["1"] += 1
        else:
            counts[PASS_RATE_BUCKETS[min(4, math.ceil(rate * 4))]] += 1
    return counts


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_per_cell: int,
    num_samples: int,
    seed: int,
    suite: type[GeneratedTasks] = SyntheticTasks,
    max_new_tokens: int = 64,
) -> dict:
    """Greedy accuracy per cell and the sampled (T=1) pass-rate spread on the validation split."""
    tasks = suite(split="validation", num_per_cell=eval_per_cell, seed=seed).load()
    greedy = pass_rates(model, tokenizer, tasks, max_new_tokens=max_new_tokens)
    torch.manual_seed(seed)
    sampled = pass_rates(
        model, tokenizer, tasks, num_samples, temperature=1.0, max_new_tokens=max_new_tokens
    )
    histogram = pass_rate_histogram(sampled)
    return {
        "validation_prompts": len(tasks),
        "greedy_accuracy": sum(greedy) / len(greedy),
        "greedy_accuracy_per_cell": per_cell_mean(tasks, greedy),
        "sampled_pass_rate": sum(sampled) / len(sampled),
        "sampled_pass_rate_per_cell": per_cell_mean(tasks, sampled),
        "sampled_num_samples": num_samples,
        "pass_rate_histogram": histogram,
        "fraction_mixed": 1 - (histogram["0"] + histogram["1"]) / len(tasks),
    }


def build_policy(
    out_dir: str | Path,
    spec: PolicySpec = PolicySpec(),
    seed: int = 0,
    sft_steps: int = 1200,
    batch_size: int = 64,
    lr: float = 3e-3,
    train_per_cell: int = 1000,
    eval_per_cell: int = 10,
    num_samples: int = 8,
    progress: bool = True,
    tasks: str = "arithmetic",
    max_new_tokens: int = 64,
    guess_fraction: float = 0.0,
    final_lr_fraction: float = 0.0,
    family_guess_fractions: Mapping[str, float] | None = None,
) -> Path:
    """Initialise a Llama from ``spec`` and ``seed``, SFT it on the worked solutions of the
    ``tasks`` suite (:data:`TASK_SUITES`), ``guess_fraction`` of them replaced by the bare
    answer (:func:`with_guesses`; ``family_guess_fractions`` per family), with a cosine
    schedule ending at ``final_lr_fraction * lr``, measure it and save it to ``out_dir``.

    Deterministic on CPU for a given seed (fixed thread count, seeded init and data order).
    ``eval_per_cell=0`` skips the validation measurement (``stats`` is then null).
    """
    if sft_steps < 1 or batch_size < 1:
        raise ValueError(f"sft_steps and batch_size must be >= 1, got {sft_steps=}, {batch_size=}")
    if tasks not in TASK_SUITES:
        raise ValueError(f"tasks must be one of {sorted(TASK_SUITES)}, got {tasks!r}")
    suite = TASK_SUITES[tasks]
    start = time.perf_counter()
    torch.set_num_threads(2)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(tokenizer))
    train = suite(split="train", num_per_cell=train_per_cell, seed=seed).load()
    train = with_guesses(train, guess_fraction, seed, family_guess_fractions)
    losses = supervised_finetune(
        model,
        _encode_sft(tokenizer, train),
        tokenizer.pad_token_id,
        sft_steps,
        batch_size,
        lr,
        seed,
        progress,
        final_lr_fraction,
    )
    sft_seconds = time.perf_counter() - start
    stats = (
        measure(model, tokenizer, eval_per_cell, num_samples, seed, suite, max_new_tokens)
        if eval_per_cell
        else None
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # float32 safetensors
    tokenizer.save_pretrained(out)
    metadata = {
        "spec": asdict(spec),
        "tasks": tasks,
        "guess_fraction": guess_fraction,
        "family_guess_fractions": dict(family_guess_fractions or {}),
        "final_lr_fraction": final_lr_fraction,
        "seed": seed,
        "sft_steps": sft_steps,
        "batch_size": batch_size,
        "lr": lr,
        "train_examples": len(train),
        "num_parameters": model.num_parameters(),
        "final_sft_loss": sum(losses[-20:]) / len(losses[-20:]),
        "sft_seconds": sft_seconds,  # task generation included
        "wall_seconds": time.perf_counter() - start,
        "stats": stats,
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return out


def embedded_policy_path(name: str = "tiny-policy") -> Path:
    """The checkpoint folder shipped inside the package (it may not exist in a fresh checkout)."""
    return Path(str(resources.files("cropi_pl") / "assets" / name))


def check_model_name(name_or_path: str) -> None:
    """Raise for a local model path that does not exist; cheap, so modules call it when built.

    A path that cannot be a hub name (``runs/x/hf_model``, ``./model``) is refused here, before
    transformers tries it as a repo id and fails with an unrelated message.
    """
    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(EMBEDDED_PREFIX) or local.exists():
        return
    if not HUB_NAME.fullmatch(name_or_path):
        raise FileNotFoundError(
            f"model {name_or_path!r}: the local path {local.absolute()} does not exist (and it "
            "is not a hub name such as 'org/name')"
        )


def resolve_model_path(name_or_path: str) -> str:
    """An HF folder for ``name_or_path``; hub names and local folders pass through unchanged.

    A missing local path is refused (:func:`check_model_name`).

    ``embedded:tiny`` and ``embedded:stepwise`` are the shipped ``tiny-policy`` and
    ``stepwise-policy`` folders; ``embedded:<name>`` for a name in
    :data:`~cropi_pl.policy.embedded.EMBEDDED_GGUF` (``smollm2-135m-instruct``) is converted from
    its GGUF package into the user cache on first use.
    """
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        check_model_name(name_or_path)
        return name_or_path
    name = name_or_path[len(EMBEDDED_PREFIX) :]
    if name in EMBEDDED_GGUF:
        return str(embedded_model_path(name))
    path = embedded_policy_path(f"{name}-policy")
    if not (path / "config.json").is_file():
        known = ", ".join(f"{EMBEDDED_PREFIX}{n}" for n in ["tiny", "stepwise", *EMBEDDED_GGUF])
        raise FileNotFoundError(
            f"embedded policy {name_or_path!r} not found at {path} (known: {known}); build the "
            f"shipped one with `python tools/build_policy.py --out {path}`"
        )
    return str(path)
