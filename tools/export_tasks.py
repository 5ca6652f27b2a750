"""Write a split of the generated tasks (arithmetic or word problems) to .jsonl or .parquet.

The exported file loads back through ``PromptFile(path, prompt_field="prompt",
answer_format="plain", id_field="id", family_field="family")``, which lets the file-based data path
be exercised (and the tasks inspected or edited) without GSM8K/MATH downloads. With ``--gsm8k`` the
file has GSM8K's layout instead: ``question`` and ``answer`` (a worked solution ending in
``#### N``) plus ``id``, ``family`` and ``difficulty``, read back with ``PromptFile(path,
answer_format="gsm8k", id_field="id", family_field="family")`` as a GSM8K file would be.

    python tools/export_tasks.py --split train --num-per-cell 50 --families add mul \\
        --out data/train.jsonl
    python tools/export_tasks.py --tasks words --gsm8k --difficulties 1 --out data/words.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import datasets

from cropi_pl.tasks.arithmetic import FAMILIES, generate_tasks
from cropi_pl.tasks.generated import DIFFICULTIES, SPLITS
from cropi_pl.tasks.words import WORD_FAMILIES, generate_word_problems

TASKS = {"arithmetic": (FAMILIES, generate_tasks), "words": (WORD_FAMILIES, generate_word_problems)}

WRITERS = {
    ".jsonl": lambda data, path: data.to_json(path, lines=True),
    ".parquet": lambda data, path: data.to_parquet(path),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", choices=sorted(TASKS), default="arithmetic")
    parser.add_argument("--split", choices=sorted(SPLITS), default="train")
    parser.add_argument("--num-per-cell", type=int, default=50)
    parser.add_argument(
        "--families",
        nargs="+",
        help="default: all of the tasks' families (arithmetic: "
        f"{' '.join(FAMILIES)}; words: {' '.join(WORD_FAMILIES)})",
    )
    parser.add_argument(
        "--difficulties", nargs="+", type=int, choices=DIFFICULTIES, default=list(DIFFICULTIES)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gsm8k", action="store_true", help="GSM8K columns: question, answer ('... #### N')"
    )
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl or .parquet")
    args = parser.parse_args(argv)
    known = TASKS[args.tasks][0]
    args.families = args.families or list(known)
    unknown = sorted(set(args.families) - set(known))
    if unknown:
        parser.error(f"unknown {args.tasks} families {unknown}; known: {' '.join(known)}")
    if args.out.suffix not in WRITERS:
        parser.error(f"--out must end in one of {sorted(WRITERS)}, got {args.out}")
    if args.num_per_cell < 1:
        parser.error(f"--num-per-cell must be positive, got {args.num_per_cell}")
    return args


def write_atomic(data: datasets.Dataset, out: Path) -> None:
    """Write next to ``out`` then rename, so a crash never leaves a truncated task file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        WRITERS[out.suffix](data, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def as_gsm8k(data: datasets.Dataset) -> datasets.Dataset:
    """GSM8K's columns: the prompt as ``question``, the worked solution as ``answer``."""
    data = data.remove_columns("answer").rename_column("solution", "answer")
    return data.rename_column("prompt", "question")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generate = TASKS[args.tasks][1]
    data = generate(args.families, args.difficulties, args.num_per_cell, args.split, args.seed)
    if args.gsm8k:
        data = as_gsm8k(data)
    write_atomic(data, args.out)
    print(f"wrote {len(data)} {args.split} tasks to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
