"""How often a step-by-step policy guesses, and how well each mode does.

The embedded step-by-step policy is warm-started with a share of bare-answer solutions
(``#### 282``), so at T=1 it sometimes guesses instead of working the steps. This samples
completions on test prompts and splits them by mode, which shows what GRPO changed:

    python tools/guess_share.py embedded:stepwise runs/full/checkpoints/last.ckpt

Each source is a model name or folder (``embedded:stepwise``) or a training checkpoint.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from cropi_pl.policy.build import completions, extract_answer, resolve_model_path
from cropi_pl.policy.export import module_from_checkpoint
from cropi_pl.tasks.stepwise import STEPWISE_FAMILIES, StepwiseTasks

GUESS_PREFIX = "####"


def load(source: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(policy, tokenizer) of a model name/folder or of a training checkpoint."""
    if source.endswith(".ckpt"):
        module = module_from_checkpoint(source)
        policy, name = module.policy, module.hparams.model
    else:
        name = source
        policy = AutoModelForCausalLM.from_pretrained(resolve_model_path(source))
    return policy.eval(), AutoTokenizer.from_pretrained(resolve_model_path(name))


@torch.no_grad()
def modes(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    families: list[str],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Guess share and accuracy of guesses, of worked solutions and overall, at T=1."""
    tasks = StepwiseTasks(families=families, split="test", num_per_cell=args.per_cell).load()
    torch.manual_seed(args.seed)
    counts = {"guess": [0, 0], "steps": [0, 0]}  # mode -> [samples, right]
    samples = completions(policy, tokenizer, tasks, args.samples, 1.0, args.max_new_tokens)
    for texts, answer in zip(samples, tasks["answer"], strict=True):
        for text in texts:
            mode = counts["guess" if text.lstrip().startswith(GUESS_PREFIX) else "steps"]
            mode[0] += 1
            mode[1] += extract_answer(text) == answer
    total = counts["guess"][0] + counts["steps"][0]
    return {
        "samples": total,
        "guess_share": counts["guess"][0] / total,
        "guess_accuracy": counts["guess"][1] / max(counts["guess"][0], 1),
        "steps_accuracy": counts["steps"][1] / max(counts["steps"][0], 1),
        "accuracy": (counts["guess"][1] + counts["steps"][1]) / total,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="model names/folders or .ckpt checkpoints")
    parser.add_argument("--targets", default="mul,mod", help="targeted families")
    parser.add_argument("--per-cell", type=int, default=15, help="test prompts per cell")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (T=1)")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    targeted = args.targets.split(",")
    others = [f for f in STEPWISE_FAMILIES if f not in targeted]
    print("| source | families | guess share | guess acc. | worked acc. | accuracy | samples |")
    print("|---|---|---|---|---|---|---|")
    for source in args.sources:
        policy, tokenizer = load(source)
        for families in (targeted, others):
            m = modes(policy, tokenizer, families, args)
            print(
                f"| {source} | {','.join(families)} | {m['guess_share']:.3f} | "
                f"{m['guess_accuracy']:.3f} | {m['steps_accuracy']:.3f} | {m['accuracy']:.3f} | "
                f"{m['samples']} |"
            )


if __name__ == "__main__":
    main()
