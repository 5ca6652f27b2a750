"""Benchmark our GRPO module against TRL's ``GRPOTrainer`` on identical work.

Both frameworks train the same HF model on the same prompts in the same order (the rows our
``CurriculumDataModule`` serves are handed to TRL unshuffled), with the same G, prompts per step,
completion budget, temperature, learning rate, GRPO loss (per-sequence token mean) and HF
``generate`` on the CPU. Each run is a fresh subprocess, so one framework's imports, patches and
allocator state cannot slow the other; ``--rounds`` repeats the runs in alternating order to
average out machine noise. Steps are timed by the same boundaries in both:

* ``step``: callback at step start to callback at step end (after the optimizer step);
* ``rollout``: step start until the loss computation begins (generate, decode, reward, advantages);
* ``generation``: time inside the model's ``generate`` (one wrapper, identical for both);
* ``training``: ``step - rollout`` (forward, backward, clipping, optimizer, logging);
* ``cpu``: process CPU time of the step, all threads (less sensitive than wall time to other
  processes sharing the machine, more to idle-spinning worker threads).

TRL is a benchmark-only extra (``pip install trl``), never a dependency of the package.

    python tools/bench_grpo.py --steps 10 --warmup 2 --out results/bench_grpo.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from benchlib import machine_info

RUNNERS = ("ours", "ours_plain_sampling", "trl")
METRICS = ("step_s", "rollout_s", "generation_s", "training_s", "cpu_s")


@dataclass(frozen=True)
class BenchConfig:
    """The workload both frameworks run; every field is passed to both."""

    model: str = "embedded:tiny"
    steps: int = 10
    warmup: int = 2
    prompts_per_step: int = 8
    num_generations: int = 8
    max_completion_length: int = 48
    temperature: float = 1.0
    lr: float = 1e-5
    threads: int = 2
    seed: int = 0
    num_per_cell: int = 20

    @property
    def total_steps(self) -> int:
        return self.steps + self.warmup


@dataclass
class StepRecord:
    step_s: float
    rollout_s: float
    generation_s: float
    training_s: float
    cpu_s: float
    completion_tokens: int
    prompts: list[str] = field(default_factory=list)


def completion_tokens(sequences: torch.Tensor, prompt_width: int, eos_id: int) -> int:
    """Generated tokens up to and including each row's first eos (the rest is padding)."""
    new = sequences[:, prompt_width:]
    if new.shape[1] == 0:
        return 0
    is_eos = new == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
    return int(first.sum())


class StepRecorder:
    """Marks step boundaries and accumulates time and tokens inside generation (TRL's
    ``model.generate``, our engine's ``generate``)."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id
        self.records: list[StepRecord] = []
        self._start: float | None = None

    def begin(self) -> None:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        self._rollout_end: float | None = None
        self._generation_s = 0.0
        self._tokens = 0
        self._prompts: list[str] = []

    def set_prompts(self, prompts: list[str]) -> None:
        self._prompts = list(prompts)

    def rollout_done(self) -> None:
        if self._rollout_end is None:
            self._rollout_end = time.perf_counter()

    def end(self) -> None:
        if self._start is None or self._rollout_end is None or not self._generation_s:
            raise RuntimeError("step ended without a rollout and a generate call being timed")
        now = time.perf_counter()
        self.records.append(
            StepRecord(
                step_s=now - self._start,
                rollout_s=self._rollout_end - self._start,
                generation_s=self._generation_s,
                training_s=now - self._rollout_end,
                cpu_s=time.process_time() - self._cpu_start,
                completion_tokens=self._tokens,
                prompts=self._prompts,
            )
        )
        self._start = None

    def wrap_generate(self, model: torch.nn.Module) -> None:
        """Time ``model.generate`` on this instance (TRL calls it by attribute)."""

        def tokens(out: Any, kwargs: dict[str, Any]) -> int:
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            return completion_tokens(sequences, kwargs["input_ids"].shape[1], self.eos_id)

        self._time_generate(model, tokens)

    def wrap_engine(self, engine: Any) -> None:
        """Time our engine's ``generate`` (its default decodes in its own loop, not through
        ``model.generate``); completions end at their first eos, as counted for TRL."""
        self._time_generate(engine, lambda out, _: sum(len(c.ids) for c in out))

    def _time_generate(self, owner: Any, tokens: Callable[[Any, dict[str, Any]], int]) -> None:
        """Replace ``owner.generate`` by a call that adds its seconds and ``tokens(out, kwargs)``
        to this step's generation time and token count."""
        original = owner.generate

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self._generation_s += time.perf_counter() - start
            self._tokens += tokens(out, kwargs)
            return out

        owner.generate = timed

    def after(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` followed by :meth:`rollout_done` (where the rollout ends, training begins)."""

        def marked(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.rollout_done()
            return out

        return marked

    def before(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """:meth:`rollout_done` followed by ``fn``."""

        def marked(*args: Any, **kwargs: Any) -> Any:
            self.rollout_done()
            return fn(*args, **kwargs)

        return marked


def make_datamodule(config: BenchConfig) -> Any:
    """Our datamodule over the embedded tasks, one epoch of exactly ``total_steps`` batches."""
    from cropi_pl.data.datamodule import CurriculumDataModule
    from cropi_pl.tasks.arithmetic import SyntheticTasks

    return CurriculumDataModule(
        SyntheticTasks(num_per_cell=config.num_per_cell),
        batch_size=config.prompts_per_step,
        batches_per_epoch=config.total_steps,
        seed=config.seed,
    )


def step_batches(config: BenchConfig) -> list[list[dict[str, Any]]]:
    """The prompt batches our datamodule serves, in order; TRL gets the same rows unshuffled."""
    dm = make_datamodule(config)
    dm.setup("fit")
    return list(dm.train_dataloader())


def run_ours(config: BenchConfig, reproducible: bool) -> list[StepRecord]:
    """Our ``GRPOModule`` under a plain ``lightning.Trainer`` on the CPU."""
    import lightning as L

    from cropi_pl.generation import HFGenerateEngine
    from cropi_pl.grpo.module import GRPOModule

    torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, verbose=False)
    module = GRPOModule(
        model=config.model,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        loss_type="seq-mean-token-mean",
        micro_batch_size=config.prompts_per_step * config.num_generations,
        engine=HFGenerateEngine(reproducible=reproducible),
        optimizer=partial(torch.optim.AdamW, lr=config.lr, weight_decay=0.0),
        seed=config.seed,
    )
    holder: dict[str, StepRecorder] = {}

    class Timing(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: GRPOModule) -> None:
            recorder = StepRecorder(pl_module.tokenizer.eos_token_id)
            recorder.wrap_engine(pl_module.engine)
            pl_module._optimizer_step = recorder.before(pl_module._optimizer_step)
            holder["recorder"] = recorder

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, i: int):
            holder["recorder"].begin()
            holder["recorder"].set_prompts([row["prompt"] for row in batch])

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
            holder["recorder"].end()

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=config.total_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timing()],
    )
    trainer.fit(module, datamodule=make_datamodule(config))
    return holder["recorder"].records


def run_trl(config: BenchConfig) -> list[StepRecord]:
    """TRL's ``GRPOTrainer`` with the same workload: HF generate, no reference model, fp32."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cropi_pl.policy.build import resolve_model_path
    from cropi_pl.rewards.numeric import ExactNumberReward

    torch.set_num_threads(config.threads)
    path = resolve_model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [row for batch in step_batches(config) for row in batch]
    recorder = StepRecorder(tokenizer.eos_token_id)
    reward = ExactNumberReward()
    g = config.num_generations

    def exact_number(prompts: list[str], completions: list[str], answer: list[str], **kw: Any):
        recorder.set_prompts(prompts[::g])
        return reward(prompts, completions, [str(a) for a in answer], [{}] * len(prompts))

    class Timing(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            recorder.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            recorder.end()

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            activation_checkpointing=False,
            per_device_train_batch_size=config.prompts_per_step * g,
            gradient_accumulation_steps=1,
            num_generations=g,
            max_completion_length=config.max_completion_length,
            temperature=config.temperature,
            top_p=1.0,
            top_k=0,
            learning_rate=config.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=0.0,
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            num_iterations=1,
            use_vllm=False,
            shuffle_dataset=False,
            max_steps=config.total_steps,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=config.seed,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=exact_number,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Timing()],
        )
        recorder.wrap_generate(trainer.model)
        trainer._prepare_inputs = recorder.after(trainer._prepare_inputs)
        trainer.train()
    return recorder.records


def summarize(runs: list[list[StepRecord]], warmup: int) -> dict[str, float]:
    """Medians over every run's steps after its first ``warmup``, plus tokens per second."""
    measured = [record for run in runs for record in run[warmup:]]
    if not measured:
        raise ValueError(f"no measured steps in {len(runs)} runs with warmup {warmup}")
    out = {name: statistics.median(getattr(r, name) for r in measured) for name in METRICS}
    tokens = statistics.median(r.completion_tokens for r in measured)
    out["completion_tokens_per_step"] = tokens
    out["generated_tokens_per_s"] = statistics.median(
        r.completion_tokens / r.generation_s for r in measured
    )
    out["end_to_end_tokens_per_s"] = statistics.median(
        r.completion_tokens / r.step_s for r in measured
    )
    out["measured_steps"] = len(measured)
    return out


def run_one(name: str, config: BenchConfig) -> list[StepRecord]:
    if name == "trl":
        return run_trl(config)
    return run_ours(config, reproducible=name == "ours")


def _config_args(config: BenchConfig) -> list[str]:
    return [
        arg
        for key, value in asdict(config).items()
        for arg in (f"--{key.replace('_', '-')}", str(value))
    ]


def run_subprocess(name: str, config: BenchConfig) -> list[StepRecord]:
    """One framework in a fresh interpreter, so runs cannot share imports or allocator state."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "records.json"
        cmd = [sys.executable, __file__, "--runner", name, "--record", str(record)]
        subprocess.run([*cmd, *_config_args(config)], check=True)
        return [StepRecord(**r) for r in json.loads(record.read_text())]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    header = (
        f"{'framework':<22}{'step s':>9}{'gen s':>9}{'rollout s':>11}{'train s':>9}{'cpu s':>8}"
        f"{'gen tok/s':>11}{'e2e tok/s':>11}{'tok/step':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, s in rows.items():
        lines.append(
            f"{name:<22}{s['step_s']:>9.3f}{s['generation_s']:>9.3f}{s['rollout_s']:>11.3f}"
            f"{s['training_s']:>9.3f}{s['cpu_s']:>8.3f}{s['generated_tokens_per_s']:>11.0f}"
            f"{s['end_to_end_tokens_per_s']:>11.0f}{s['completion_tokens_per_step']:>10.0f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, BenchConfig]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--rounds", type=int, default=1, help="alternating repetitions per run")
    parser.add_argument("--out", type=Path, default=Path("results/bench_grpo.json"))
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--runner", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = BenchConfig(**{key: getattr(args, key) for key in asdict(defaults)})
    for key in ("steps", "prompts_per_step", "threads", "num_per_cell", "max_completion_length"):
        if getattr(config, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(config, key)}")
    if config.num_generations < 2 or config.warmup < 0 or args.rounds < 1:
        parser.error("need --num-generations >= 2, --warmup >= 0 and --rounds >= 1")
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    if args.runner:
        records = run_one(args.runner, config)
        args.record.write_text(json.dumps([asdict(r) for r in records]))
        return 0
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: `pip install trl` (a benchmark-only extra)")
    from cropi_pl.policy.build import resolve_model_path

    model_path = resolve_model_path(config.model)  # fail before any run if it is missing
    if not (Path(model_path) / "config.json").is_file():
        raise SystemExit(
            f"--model {config.model}: no HF model folder (config.json) at {model_path}"
        )
    load_before = os.getloadavg()
    runs: dict[str, list[list[StepRecord]]] = {name: [] for name in RUNNERS}
    for round_index in range(args.rounds):
        order = RUNNERS if round_index % 2 == 0 else RUNNERS[::-1]
        for name in order:
            print(f"[bench] round {round_index + 1}/{args.rounds}: {name}", flush=True)
            run = run_subprocess(name, config)
            if len(run) != config.total_steps:
                raise RuntimeError(f"{name} recorded {len(run)} of {config.total_steps} steps")
            runs[name].append(run)
    prompt_lists = {
        json.dumps([r.prompts for r in run]) for by_round in runs.values() for run in by_round
    }
    if len(prompt_lists) != 1:
        raise RuntimeError("the frameworks trained on different prompts; the comparison is void")
    summaries = {name: summarize(by_round, config.warmup) for name, by_round in runs.items()}
    ours, plain, trl = (summaries[name] for name in RUNNERS)
    result = {
        "speedup_vs_trl": trl["step_s"] / ours["step_s"],
        "speedup_vs_trl_plain_sampling": trl["step_s"] / plain["step_s"],
        "speedup_vs_trl_cpu_time": trl["cpu_s"] / ours["cpu_s"],
        "config": asdict(config)
        | {
            "model_path": model_path,
            "rounds": args.rounds,
            "note": args.note,
            "loss": "GRPO per-sequence token mean (ours seq-mean-token-mean, TRL grpo)",
            "generation": "HF generate, fp32, CPU, no reference model (beta=0)",
            "prompts_sha1": hashlib.sha1(prompt_lists.pop().encode()).hexdigest(),
        },
        "ours": ours,
        "ours_plain_sampling": plain,
        "trl": trl,
        "machine": machine_info(config.threads, "transformers", "lightning", "trl")
        | {"load_average_1m_before_after": [load_before[0], os.getloadavg()[0]]},
        "per_step": {
            name: [
                [{k: v for k, v in asdict(r).items() if k != "prompts"} for r in run]
                for run in by_round
            ]
            for name, by_round in runs.items()
        },
    }
    print(format_table(summaries))
    print(
        f"speedup_vs_trl = {result['speedup_vs_trl']:.2f}  "
        f"(plain sampling: {result['speedup_vs_trl_plain_sampling']:.2f})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
