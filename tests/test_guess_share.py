"""tools/guess_share.py splits sampled completions by mode and scores each mode right."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import guess_share  # noqa: E402

from cropi_pl.tasks.stepwise import StepwiseTasks  # noqa: E402


class ScriptedPolicy(torch.nn.Module):
    """Answers every prompt with fixed completions: a right guess, a wrong guess, the right
    worked solution and a wrong worked one, so the expected split is known."""

    def __init__(self, tokenizer, tasks):
        super().__init__()
        self.tokenizer, self.by_prompt = tokenizer, {r["prompt"]: r for r in tasks}

    def generate(self, input_ids, attention_mask, num_return_sequences, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            row = self.by_prompt[prompt]
            wrong = str(int(row["answer"]) + 1)
            texts = [f"#### {row['answer']}", f"#### {wrong}", row["solution"], f"1=1 #### {wrong}"]
            assert num_return_sequences == len(texts)
            for text in texts:
                rows.append(torch.cat([ids, torch.tensor(self.tokenizer.encode(text))]))
        return torch.nn.utils.rnn.pad_sequence(
            rows, batch_first=True, padding_value=self.tokenizer.pad_token_id
        )


def test_modes_split_and_score_guesses_and_worked_solutions():
    tokenizer = guess_share.load("embedded:stepwise")[1]
    tasks = StepwiseTasks(families=["mul"], split="test", num_per_cell=2).load()
    args = argparse.Namespace(per_cell=2, samples=4, max_new_tokens=72, seed=0)
    m = guess_share.modes(ScriptedPolicy(tokenizer, tasks), tokenizer, ["mul"], args)
    assert m["samples"] == 4 * len(tasks)
    assert m["guess_share"] == 0.5 and m["guess_accuracy"] == 0.5
    assert m["steps_accuracy"] == 0.5 and m["accuracy"] == 0.5


def test_main_prints_a_row_per_source_and_family_set(capsys):
    guess_share.main(["embedded:stepwise", "--per-cell", "1", "--samples", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if "embedded:stepwise" in line]
    assert [row.split(" | ")[1] for row in rows] == ["mul,mod", "add,sub,cmp,word"]
    for row in rows:
        share = float(row.split(" | ")[2])
        assert 0.0 <= share <= 1.0
