"""The real CLI on real-data paths: a GSM8K-style JSONL pool with a TRL-style plain-function
reward reading an extra column, and a chat-template model whose trajectory cache records the
prompt format."""

from __future__ import annotations

import json
from pathlib import Path

from cropi_pl.influence.cache import TrajectoryCache
from cropi_pl.policy.prompting import PromptEncoder
from tests.cli_utils import CROPI, completions_table, event_tags, run_cli
from tests.models import char_tokenizer, save_tiny_chat_policy


def _gsm8k_file(path: Path) -> dict[str, str]:
    """Arithmetic word-free questions the char-level embedded policy can read, with GSM8K-style
    reference solutions and an extra ``unit`` column; returns question -> unit."""
    rows, units = [], {}
    for i, (a, b) in enumerate([(3, 4), (12, 7), (5, 5), (20, 13), (8, 1), (31, 16)]):
        unit = "apples" if i % 2 else ""
        question = f"{a}+{b}"
        answer = f"{a}+{b}={a + b}\n#### {a + b}"
        rows.append({"question": question, "answer": answer, "unit": unit})
        units[question] = unit
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return units


def test_gsm8k_jsonl_pool_with_plain_function_reward(tmp_path):
    units = _gsm8k_file(tmp_path / "gsm.jsonl")
    pool = {
        "class_path": "cropi_pl.tasks.loading.PromptFile",
        "init_args": {
            "path": str(tmp_path / "gsm.jsonl"),
            "template": "Q: {prompt}\nA: ",
            "answer_format": "gsm8k",
            "family": "gsm",
        },
    }
    exact = {"class_path": "cropi_pl.rewards.numeric.ExactNumberReward"}
    rewards = [exact, "tests.plugins.unit_reward"]
    run_cli(
        "fit",
        "--trainer.max_steps=2",
        "--model.init_args.log_completions_every_n_steps=1",
        f"--data.init_args.pool={json.dumps(pool)}",
        f"--model.init_args.rewards={json.dumps(rewards)}",
        "--model.init_args.reward_weights=[1.0, 0.5]",
        run_dir=tmp_path / "run",
    )
    tags = event_tags(tmp_path / "run")
    assert len(tags["reward"]) == 2 and "accuracy/gsm" in tags
    for name in ("exact_number", "unit_reward"):
        for stat in ("mean", "std"):
            assert f"rewards/{name}/{stat}" in tags
        assert tags[f"rewards/{name}/failures"] == [0.0, 0.0], name  # the column reached it
    table = completions_table(tmp_path / "run")
    header = ["prompt", "completion", "exact_number", "unit_reward", "reward", "advantage"]
    assert table[0] == header
    applied = skipped = 0
    for prompt, completion, exact, unit, reward, _ in table[2:]:
        question = prompt.removeprefix("Q: ").removesuffix("A:").strip()
        if units[question]:  # the unit reward applies: weighted sum of both
            applied += 1
            assert unit == ("1" if "####" in completion else "0")
            assert float(reward) == float(exact) + 0.5 * float(unit)
        else:  # None: contributes nothing, the reward is the exact-number reward alone
            skipped += 1
            assert unit == "-" and float(reward) == float(exact)
    assert applied and skipped
    saved = (tmp_path / "run" / "tensorboard" / "version_0" / "config.yaml").read_text()
    assert "tests.plugins.unit_reward" in saved  # the run config names the function


def test_chat_template_model_trains_and_cache_records_the_format(tmp_path):
    model = save_tiny_chat_policy(tmp_path / "chat-policy")
    proc = run_cli(
        "fit",
        f"--model.init_args.model={model}",
        "--model.init_args.max_completion_length=12",
        '--model.init_args.rewards=["tests.plugins.even_length"]',  # mixed rewards at random
        "--trainer.max_steps=4",
        config=CROPI,
        run_dir=tmp_path / "run",
    )
    assert "stage 0: selected" in proc.stderr and "stage 1: selected" in proc.stderr
    manifest = json.loads((tmp_path / "run" / "trajectories" / "manifest.json").read_text())
    expected = PromptEncoder(char_tokenizer(chat_template=True)).fingerprint()
    assert expected.startswith("chat:")
    for split in ("pool", "target/mul"):
        assert manifest["splits"][split]["sampling"]["prompt_format"] == expected
    tokenizer = char_tokenizer(chat_template=True)
    cache = TrajectoryCache(tmp_path / "run" / "trajectories")
    for split in ("pool", "target/mul"):  # the pool and the influence targets alike
        text = tokenizer.decode(cache.load(split)[0]["prompt_ids"])
        assert text.startswith("<bos><|user|>Q: ") and text.endswith("\n<|assistant|>")
