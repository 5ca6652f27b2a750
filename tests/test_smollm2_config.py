"""configs/smollm2_gsm.yaml through the real CLI, shortened by tests/configs/smollm2_gsm_short.yaml:
on a tiny random Llama with a chat template (default suite: the generated problems and the same
problems from JSONL files give the same run, and the HF export reloads), and on the real
SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli_utils import ROOT, event_tags, policy_state, run_cli
from tests.models import save_tiny_chat_policy
from tests.test_loading import export

CONFIG = ROOT / "configs" / "smollm2_gsm.yaml"
SHORT = ROOT / "tests" / "configs" / "smollm2_gsm_short.yaml"
JSONL = ROOT / "configs" / "smollm2_gsm_jsonl.yaml"
REWARD = {
    "class_path": "cropi_pl.rewards.math_answer.MathVerifyReward",
    "init_args": {"boxed_first": True},
}
# The JSONL files of the short config: (split, families, num_per_cell) as in SHORT.
FILES = {
    "pool": ("train", ["add", "sub", "cmp", "mul", "div"], 2),
    "muldiv": ("validation", ["mul", "div"], 2),
    "targeted": ("test", ["mul", "div"], 2),
    "untargeted": ("test", ["add", "sub", "cmp"], 1),
}


def _fit(run_dir: Path, *args: str, cwd: Path = ROOT) -> None:
    run_cli(
        "fit",
        "--config",
        str(SHORT),
        *args,
        f"--trainer.default_root_dir={run_dir}",  # after any overlay that sets its own
        run_dir=run_dir,
        config=CONFIG,
        cwd=cwd,
    )


def _selections(run_dir: Path) -> list[list[str]]:
    files = sorted((run_dir / "selections").glob("stage-*[0-9].json"))
    return [json.loads(path.read_text())["ids"] for path in files]


def _check_export(run_dir: Path) -> AutoModelForCausalLM:
    """The end-of-fit HF folder loads with transformers, keeps the chat template and holds the
    final checkpoint's weights exactly."""
    folder = run_dir / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert "2 + 3?" in text
    state = policy_state(run_dir / "checkpoints" / "last.ckpt")
    for name, param in model.named_parameters():
        assert torch.equal(param, state[f"policy.{name}"]), name
    return model


def test_short_config_on_a_tiny_chat_llama_generated_and_from_jsonl(tmp_path: Path) -> None:
    policy = save_tiny_chat_policy(tmp_path / "policy")
    # A random policy never answers right, so the first reward (accuracy, trajectory cache)
    # is one that gives mixed rewards anyway; the config's math-verify reward still scores.
    rewards = ["tests.plugins.even_length", REWARD]
    tiny = [
        f"--model.init_args.model={policy}",
        f"--model.init_args.rewards={json.dumps(rewards)}",
        "--curriculum.init_args.popi.param_filter=model\\.layers\\.0\\.",  # it has 1 layer
    ]
    _fit(tmp_path / "generated", *tiny)
    data = tmp_path / "cwd" / "data" / "smollm2_gsm"
    for name, (split, families, per_cell) in FILES.items():
        args = ["--tasks", "words", "--gsm8k", "--difficulties", "1", "--split", split]
        args += ["--families", *families, "--num-per-cell", str(per_cell)]
        code, err = export(*args, "--out", str(data / f"{name}.jsonl"))
        assert code == 0, err
    _fit(tmp_path / "jsonl", "--config", str(JSONL), *tiny, cwd=tmp_path / "cwd")

    generated, from_files = (event_tags(tmp_path / d) for d in ("generated", "jsonl"))
    assert len(generated["reward"]) == 2 and len(generated["val/targeted/accuracy"]) == 2
    assert "rewards/math_verify/mean" in generated
    for tag in ("reward", "rewards/math_verify/mean", "val/targeted/accuracy", "loss"):
        assert from_files[tag] == generated[tag], tag
    stages = _selections(tmp_path / "generated")
    assert len(stages) == 2 and all(len(ids) == 2 for ids in stages)
    assert _selections(tmp_path / "jsonl") == stages
    _check_export(tmp_path / "generated")


@pytest.mark.slow
def test_short_config_on_smollm2(tmp_path: Path) -> None:
    _fit(tmp_path / "run")
    tags = event_tags(tmp_path / "run")
    assert len(tags["reward"]) == 2 and len(tags["val/targeted/accuracy"]) == 2
    assert len(_selections(tmp_path / "run")) == 2
    model = _check_export(tmp_path / "run")
    assert model.num_parameters() == 134_515_008  # the dequantised SmolLM2-135M
