"""Generation throughput: HF ``generate`` against vLLM (eager and compiled) on the same work.

Every engine samples the same prompts, ``--samples`` completions each, at most ``--max-new-tokens``
new tokens, temperature 1, per-completion seeds, through cropi_pl's engine interface (the code
path training uses). Rounds alternate the engine order; before each round the policy's weights are
nudged and marked as stepped, so each vLLM engine pays one weight push per round, timed apart from
its generation (``push_s``). Reported per engine: start-up (model load for HF; ``LLM()`` plus the
first push for vLLM; the first call, compilation included, apart), generated tokens per second
(median over rounds and the min-max range), and for vLLM the largest |log-prob difference|
between the engine's sampled-token log-probs and the policy's teacher-forced ones after the push.
``vllm_speedup_vs_hf`` is the compiled vLLM engine's tokens/s over HF's (the project's default,
per-row seeded) in the same rounds; ``speedup_vs_hf`` gives it for every engine. ``hf_unshared``
is ``hf`` prefilling every completion's copy of its prompt (``share_prompt_cache=False``), the
engine before each prompt was prefilled once for its completions; ``hf_generate`` is ``hf``
decoding with ``generate`` from the shared prompt cache (``drop_finished=False``: every row steps
until the longest is done), the engine before finished rows left the batch. Every seeded HF
engine must give ``hf``'s tokens; ``same_tokens_as_hf`` records it per engine. The HF engines
alone run in any environment (``--engines hf hf_generate hf_unshared``).

Runs where vLLM is installed (on CPU: the environment ``tools/vllm_venv.sh`` builds). Each model's
entry records its own workload and machine load, and a run replaces only the entries of the models
it ran, so a larger model can run with a smaller workload:

    venv=$(bash tools/vllm_venv.sh)
    $venv/bin/python tools/bench_generation.py --models embedded:tiny
    $venv/bin/python tools/bench_generation.py --models embedded:smollm2-135m-instruct \
        --prompts 8 --samples 4 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import machine_info  # noqa: E402

from cropi_pl.atomic import atomic_file  # noqa: E402
from cropi_pl.generation import HFGenerateEngine, VLLMEngine  # noqa: E402
from cropi_pl.generation.engine import GenerationEngine, mark_weights_updated  # noqa: E402
from cropi_pl.grpo.rollout import pack, token_logps  # noqa: E402
from cropi_pl.policy.build import resolve_model_path  # noqa: E402
from cropi_pl.tasks.arithmetic import generate_tasks  # noqa: E402

ENGINES = ("hf", "hf_generate", "hf_unshared", "hf_plain", "vllm_eager", "vllm_compiled")
SEEDED_HF = {"hf", "hf_generate", "hf_unshared"}  # engines that must sample the same tokens
MODELS = ("embedded:tiny", "embedded:smollm2-135m-instruct")
PARITY_ROWS = 16  # completions teacher-forced per round for the log-prob check


@dataclass(frozen=True)
class BenchConfig:
    prompts: int = 16
    samples: int = 8
    max_new_tokens: int = 48
    rounds: int = 3
    threads: int = 2
    cpu_kv_cache_gib: float = 1.0
    seed: int = 0


def encode_prompts(tokenizer: Any, count: int, seed: int) -> list[list[int]]:
    """``count`` arithmetic questions; through the chat template when the model has one."""
    rows = generate_tasks(split="test", num_per_cell=2, seed=seed).shuffle(seed=seed)
    texts = rows["prompt"][:count]
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
            )
            for t in texts
        ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def make_engine(name: str, config: BenchConfig, max_model_len: int) -> GenerationEngine:
    if name.startswith("hf"):
        return HFGenerateEngine(
            reproducible=name != "hf_plain",
            share_prompt_cache=name != "hf_unshared",
            drop_finished=name != "hf_generate",
        )
    return VLLMEngine(
        enforce_eager=name == "vllm_eager",
        max_model_len=max_model_len,
        cpu_kv_cache_gib=config.cpu_kv_cache_gib,
        seed=config.seed,
    )


def logprob_gap(policy: torch.nn.Module, prompts: list[list[int]], completions: list) -> float:
    """Max |engine - teacher-forced| log-prob over the first ``PARITY_ROWS`` completions."""
    rows = [(p, c) for p, c in zip(prompts, completions, strict=True) if c.ids][:PARITY_ROWS]
    batch = pack([p for p, _ in rows], [c.ids for _, c in rows], 0)
    with torch.no_grad():
        logp, _ = token_logps(policy, batch)
    engine = torch.zeros_like(logp)
    for i, (p, c) in enumerate(rows):
        engine[i, len(p) - 1 : len(p) - 1 + len(c.ids)] = torch.tensor(c.logprobs)
    return float(((engine - logp) * batch.mask).abs().max())


def nudge(policy: torch.nn.Module, generator: torch.Generator) -> None:
    """A tiny change to every weight, marked like an optimizer step (forces one push)."""
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-4)
    mark_weights_updated(policy)


def bench_model(model: str, config: BenchConfig, engines: tuple[str, ...]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = encode_prompts(tokenizer, config.prompts, config.seed)
    rows = [p for p in prompts for _ in range(config.samples)]
    seeds = list(range(len(rows)))
    max_model_len = max(map(len, prompts)) + config.max_new_tokens + 8

    def run(engine: GenerationEngine) -> tuple[list, float]:
        begin = time.perf_counter()
        out = engine.generate(
            policy,
            prompts,
            num_samples=config.samples,
            max_new_tokens=config.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            seeds=seeds,
        )
        return out, time.perf_counter() - begin

    built = {name: make_engine(name, config, max_model_len) for name in engines}
    stats: dict[str, dict[str, Any]] = {}
    for name, engine in built.items():  # warm-up call: builds vLLM, compiles, first push
        print(f"[bench] {model}: first call of {name}", flush=True)
        _, first_s = run(engine)
        stats[name] = {"first_call_s": first_s, "rounds": []}
        if isinstance(engine, VLLMEngine):
            stats[name]["startup_s"] = engine.startup_seconds + engine.push_seconds
        else:
            stats[name]["startup_s"] = load_s
    generator = torch.Generator().manual_seed(config.seed)
    for index in range(config.rounds):
        nudge(policy, generator)
        order = engines if index % 2 == 0 else engines[::-1]
        tokens_of: dict[str, list[list[int]]] = {}
        for name in order:
            engine = built[name]
            record: dict[str, float] = {}
            if isinstance(engine, VLLMEngine):
                begin = time.perf_counter()
                engine.sync_weights(policy)
                record["push_s"] = time.perf_counter() - begin
            out, seconds = run(engine)
            tokens = sum(len(c.ids) for c in out)
            record |= {"generation_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
            if isinstance(engine, VLLMEngine):
                record["max_logprob_gap"] = logprob_gap(policy, rows, out)
            stats[name]["rounds"].append(record)
            tokens_of[name] = [c.ids for c in out]
            print(f"[bench] {model} round {index + 1}: {name} {record}", flush=True)
        if "hf" in tokens_of:
            for name in SEEDED_HF & set(tokens_of):
                stats[name]["rounds"][-1]["same_tokens_as_hf"] = tokens_of[name] == tokens_of["hf"]
    for name, entry in stats.items():
        speeds = [r["tokens_per_s"] for r in entry["rounds"]]
        entry["tokens_per_s"] = statistics.median(speeds)
        entry["tokens_per_s_range"] = [min(speeds), max(speeds)]
        if name in SEEDED_HF and "hf" in stats:
            entry["same_tokens_as_hf"] = all(r["same_tokens_as_hf"] for r in entry["rounds"])
        if name.startswith("vllm"):
            entry["push_s"] = statistics.median(r["push_s"] for r in entry["rounds"])
            entry["max_logprob_gap"] = max(r["max_logprob_gap"] for r in entry["rounds"])
    speedup = {}
    if "hf" in stats:
        for name, entry in stats.items():
            ratios = [
                r["tokens_per_s"] / h["tokens_per_s"]
                for r, h in zip(entry["rounds"], stats["hf"]["rounds"], strict=True)
            ]
            speedup[name] = {
                "median": entry["tokens_per_s"] / stats["hf"]["tokens_per_s"],
                "per_round_range": [min(ratios), max(ratios)],
            }
    return {
        "config": asdict(config),
        "model_path": path,
        "num_parameters": sum(p.numel() for p in policy.parameters()),
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "engines": stats,
        "speedup_vs_hf": speedup,
        "vllm_speedup_vs_hf": speedup.get("vllm_compiled", {}).get("median"),
    }


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | engine | start-up s | first call s | tokens/s (median, range) "
        "| push s | max log-prob gap | same tokens as hf | speedup vs hf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, result in results.items():
        for name, e in result["engines"].items():
            low, high = e["tokens_per_s_range"]
            push = f"{e['push_s']:.3f}" if "push_s" in e else "-"
            gap = f"{e['max_logprob_gap']:.1e}" if "max_logprob_gap" in e else "-"
            ratio = result["speedup_vs_hf"].get(name, {}).get("median")
            same = {True: "yes", False: "NO"}.get(e.get("same_tokens_as_hf"), "-")
            lines.append(
                f"| {model} | {name} | {e['startup_s']:.1f} | {e['first_call_s']:.1f} "
                f"| {e['tokens_per_s']:.0f} ({low:.0f}-{high:.0f}) | {push} | {gap} | {same} "
                f"| {'-' if ratio is None else f'{ratio:.2f}'} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, BenchConfig]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--out", type=Path, default=Path("results/bench_generation.json"))
    parser.add_argument("--note", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    config = BenchConfig(**{key: getattr(args, key) for key in asdict(defaults)})
    for key in ("prompts", "samples", "max_new_tokens", "rounds", "threads"):
        if getattr(config, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(config, key)}")
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(config.threads)
    torch.set_num_threads(config.threads)  # before vLLM, which forbids changing it afterwards
    results = {}
    packages = ("transformers", "vllm")[
        : 2 if any(e.startswith("vllm") for e in args.engines) else 1
    ]
    for model in args.models:
        load_before = os.getloadavg()
        results[model] = bench_model(model, config, tuple(args.engines))
        results[model]["note"] = args.note
        results[model]["machine"] = machine_info(config.threads, *packages) | {
            "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]]
        }
    print(format_table(results))
    previous = json.loads(args.out.read_text())["models"] if args.out.is_file() else {}
    models = previous | results
    output = {
        "vllm_speedup_vs_hf": {m: r["vllm_speedup_vs_hf"] for m, r in models.items()},
        "models": models,
    }
    print("vllm_speedup_vs_hf:", json.dumps(output["vllm_speedup_vs_hf"]))
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(output, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
