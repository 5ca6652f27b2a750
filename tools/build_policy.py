"""Build the embedded starting policy and print how well it does per task cell.

``python tools/build_policy.py --out cropi_pl/assets/tiny-policy --seed 0`` (one-shot arithmetic)
``python tools/build_policy.py --tasks stepwise --steps 800 --guess-fraction 0.25
--max-new-tokens 72 --out cropi_pl/assets/stepwise-policy`` (the acceleration testbed:
step-by-step solutions, a quarter of them bare answers; see ``cropi_pl/tasks/stepwise.py``)
``python tools/build_policy.py --tasks stepwise --steps 800 --guess-fraction 0.05
--family-guess-fraction mul=0.6 mod=0.6 --max-new-tokens 72 --out runs/family-deficit-policy``
(the README's family-deficit probe: only ``mul`` and ``mod`` guess often; its pre-registered
testbed names ``sub=0.6 cmp=0.6`` too and writes ``runs/four-deficit-policy``)
"""

from __future__ import annotations

import argparse
import json

from cropi_pl.policy.build import METADATA_FILE, TASK_SUITES, PolicySpec, build_policy


def family_fraction(text: str) -> tuple[str, float]:
    """``FAMILY=FRACTION`` of ``--family-guess-fraction`` as ``(family, fraction)``."""
    family, _, value = text.partition("=")  # no "=" leaves value empty, which float refuses
    try:
        if family:
            return family, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected FAMILY=FRACTION, got {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the HF checkpoint to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="SFT steps (default: built-in)")
    parser.add_argument("--tasks", choices=sorted(TASK_SUITES), default="arithmetic")
    parser.add_argument(
        "--guess-fraction",
        type=float,
        default=0.0,
        help="share of SFT solutions replaced by the bare answer (#### N)",
    )
    parser.add_argument(
        "--family-guess-fraction",
        type=family_fraction,
        nargs="+",
        default=[],
        metavar="FAMILY=FRACTION",
        help="another guess fraction for these families, e.g. mul=0.6 mod=0.6 (a deficit of "
        "their own that only their data teaches RL to remove)",
    )
    parser.add_argument(
        "--final-lr-fraction",
        type=float,
        default=0.0,
        help="the cosine SFT schedule ends at this fraction of the peak lr (3e-3)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for the measurement")
    parser.add_argument("--no-progress", action="store_true", help="hide the SFT progress bar")
    args = parser.parse_args()
    steps = {} if args.steps is None else {"sft_steps": args.steps}
    out = build_policy(
        args.out,
        PolicySpec(),
        args.seed,
        progress=not args.no_progress,
        tasks=args.tasks,
        max_new_tokens=args.max_new_tokens,
        guess_fraction=args.guess_fraction,
        final_lr_fraction=args.final_lr_fraction,
        family_guess_fractions=dict(args.family_guess_fraction),
        **steps,
    )
    meta = json.loads((out / METADATA_FILE).read_text())
    stats = meta["stats"]
    print(
        f"saved {out}: {meta['num_parameters']:,} parameters, {meta['sft_steps']} SFT steps, "
        f"{meta['wall_seconds']:.0f} s"
    )
    n = stats["sampled_num_samples"]
    print(f"\ngreedy accuracy | sampled pass rate (T=1, {n} samples), validation split")
    greedy, sampled = stats["greedy_accuracy_per_cell"], stats["sampled_pass_rate_per_cell"]
    levels = sorted({d for cells in greedy.values() for d in cells})
    header = " ".join(f"d{d:>4}" for d in levels)
    print(f"{'family':8s} {header}  | {header}")
    for family, cells in greedy.items():
        left = " ".join(f"{cells.get(d, float('nan')):5.2f}" for d in levels)
        right = " ".join(f"{sampled[family].get(d, float('nan')):5.2f}" for d in levels)
        print(f"{family:8s} {left}  | {right}")
    print(f"{'all':8s} {stats['greedy_accuracy']:5.2f}  | {stats['sampled_pass_rate']:5.2f}")
    print(f"\npass-rate histogram over {stats['validation_prompts']} prompts (T=1):")
    print(
        f"{stats['pass_rate_histogram']}; strictly between 0 and 1: {stats['fraction_mixed']:.0%}"
    )


if __name__ == "__main__":
    main()
