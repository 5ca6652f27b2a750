"""The README's real-data, reward and prompt-format snippets work as written: its YAML parses
through the real CLI parser and its Python reward is called with the extra column it reads."""

from __future__ import annotations

import json
import re

import datasets

from cropi_pl.cli import main
from cropi_pl.rewards.base import safe_rewards
from tests.cli_utils import ROOT, TINY


def _blocks(section: str, language: str) -> list[str]:
    """The fenced ``language`` blocks of README section ``### section``."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"### {section}\n", 1)[1].split("\n### ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def test_readme_real_data_rewards_and_prompt_format_snippets(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "data").mkdir()
    gsm = [
        {"question": f"{a}+{a}", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}", "unit": u}
        for a, u in [(1, "kg"), (2, ""), (3, "m")]
    ]
    (tmp_path / "data" / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    math_rows = [
        {
            "problem": "Half of 1?",
            "solution": "It is $\\boxed{\\frac{1}{2}}$.",
            "type": "Algebra",
            "level": "Level 2",
        },
    ]
    math_file = tmp_path / "data" / "math_validation.parquet"
    datasets.Dataset.from_list(math_rows).to_parquet(str(math_file))
    (package := tmp_path / "my_pkg").mkdir()
    (package / "__init__.py").write_text("")
    [code] = _blocks("Rewards", "python")
    (package / "rewards.py").write_text(code)

    configs = ["--config", str(TINY)]  # the README's blocks stacked on a base config
    for section in ("Real data", "Rewards", "Prompt formats"):
        for i, block in enumerate(_blocks(section, "yaml")):
            path = tmp_path / f"{section.replace(' ', '_')}_{i}.yaml"
            path.write_text(block)
            configs += ["--config", str(path)]
    cli = main([*configs, f"--trainer.default_root_dir={tmp_path}"], run=False)

    dm, module = cli.datamodule, cli.model
    dm.setup("fit")
    assert dm.pool["answer"] == ["2", "4", "6"]
    assert dm.pool["prompt"][0] == "1+1\nPut the final answer after ####."
    assert dm.pool["unit"] == ["kg", "", "m"]
    target = dm.target_data["math"]
    assert target["answer"] == ["\\frac{1}{2}"] and target["difficulty"] == [2]
    assert target["prompt"] == ["Half of 1? Put the final answer in \\boxed{}."]
    assert module.hparams.system_prompt == "Solve the problem. Put the final answer in \\boxed{}."
    assert module.reward_names == ["math_verify", "format_reward"]
    assert module.reward_weights == [1.0, 0.1]
    rows = dm.pool.to_list()
    outcome = safe_rewards(
        module.rewards[1], dm.pool["prompt"], ["2 kg", "4", "6 m?"], dm.pool["answer"], rows
    )
    assert outcome.rewards == [1.0, None, 0.0] and outcome.failures == 0
