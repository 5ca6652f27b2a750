"""The acceleration experiment: full-pool GRPO vs 10% subsets (random, pass rate, learnability,
static influence, CROPI) on the embedded step-by-step tasks, same batch size, step budget and task
mix, several seeds (each one ``seed_everything``, from which every other seed derives).

    python tools/reproduce_acceleration.py [--seeds 0 1 2] [--steps 90] [--val-every 30]
    python tools/reproduce_acceleration.py --targets sub,cmp --key second_target

For every method and seed it runs ``python -m cropi_pl fit`` on ``configs/cropi_tiny.yaml`` plus
``configs/method/<method>.yaml`` and reads TensorBoard. Reported per method:
- targeted and untargeted validation accuracy against step (mean, min, max over seeds);
- steps to reach the best targeted accuracy the full-pool run reaches within the budget (same
  seed), and the step acceleration ``full's steps to its best / method's steps``;
- the same in wall-clock seconds of training, with trajectory collection (once per seed, charged
  in full to every method that needs it) and every selection pass counted; validation time is
  excluded for all methods alike;
- full-pool's targeted gain (final minus starting accuracy) and every method's final untargeted
  accuracy, each with its 95% interval (prompts as units, from ``val/<set>/accuracy_ci95``).
``--targets fam1,fam2`` replaces the targeted families (influence targets and the targeted
evaluation set; every other family of the pool is untargeted), ``--model`` the starting policy
and ``--pool-per-cell`` the pool's prompts per (family, difficulty) cell, without editing YAML;
``--key`` writes the results under that key of the JSON (keeping the others) and names the plot
after it.
``--merge`` adds methods to a stored report of the same settings: the methods run now (full
among them) replace their stored runs, the others are kept, and the report records how far the
re-run full-pool curve is from the stored one (0 when runs are reproducible). The stored runs'
trajectory cache (same ``--runs``) is verified rather than re-sampled, so the collection seconds
charged are the stored report's.
Writes ``results/acceleration.json`` and ``results/acceleration.png``.

    python tools/reproduce_acceleration.py --targets sub,cmp --key second_target \
        --methods full pass_rate learnability --merge
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from cropi_pl.atomic import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    "full",
    "random",
    "pass_rate",
    "learnability",
    "static_influence",
    "cropi",
    "cropi_resample",
)
USES_TRAJECTORIES = {"pass_rate", "static_influence", "cropi", "cropi_resample", "learnability"}
STEP_TIMES = ("time/generation_s", "time/reward_and_prep_s", "time/training_s")


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``run_dir`` as (step, value) pairs sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def pool_families(data: dict[str, Any]) -> list[str]:
    """The families of the pool source (its ``families`` argument, else every family its class
    generates)."""
    pool = data["pool"]
    if pool["init_args"].get("families"):
        return list(pool["init_args"]["families"])
    module, name = pool["class_path"].rsplit(".", 1)
    return list(getattr(importlib.import_module(module), name).generators)


def targets_overlay(config: Path, targets: list[str]) -> dict[str, Any]:
    """``data.init_args`` entries that make ``targets`` the targeted families: one influence
    target per family and the targeted evaluation set over them, every other pool family in the
    untargeted set; sources, splits and sizes stay those of ``config``."""
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    families = pool_families(data)
    unknown = sorted(set(targets) - set(families))
    if unknown or len(set(targets)) != len(targets) or len(targets) == len(families):
        raise SystemExit(
            f"--targets {','.join(targets)}: need distinct families of the pool {families} "
            f"leaving at least one untargeted (unknown: {unknown})"
        )
    template = next(iter(data["targets"].values()))
    evals = copy.deepcopy(data["eval_sets"])
    evals["targeted"]["init_args"]["families"] = list(targets)
    evals["untargeted"]["init_args"]["families"] = [f for f in families if f not in targets]
    return {
        "targets": {
            f: {**template, "init_args": {**template["init_args"], "families": [f]}}
            for f in targets
        },
        "eval_sets": evals,
    }


def config_args(
    method: str, run_dir: Path, cache_dir: Path, args: argparse.Namespace, seed: int
) -> list[str]:
    """``--config`` arguments of one run: the base config, the method's overlay, then a per-run
    overlay (seed, step budget, targets, starting policy, no checkpoints or export, everything
    under ``run_dir``).

    ``seed_everything`` is the run's one seed: sampling, trajectory, projection and selection
    seeds follow it, so each seed has its own trajectory cache (``cache_dir/seed<N>``)."""
    data: dict[str, Any] = {"trajectories": {"cache_dir": str(cache_dir / f"seed{seed}")}}
    if args.targets:
        data.update(targets_overlay(ROOT / args.config, args.targets))
    config = {
        "seed_everything": seed,
        "trainer": {
            "default_root_dir": str(run_dir),
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "max_steps": args.steps,
            "val_check_interval": args.val_every,
        },
        "curriculum": {"init_args": {"stage_steps": args.stage_steps, "progress": False}},
        "export": {"folder": None},
        "data": {"init_args": data},
    }
    if args.model:
        config["model"] = {"init_args": {"model": args.model}}
    if args.pool_per_cell:
        data["pool"] = {"init_args": {"num_per_cell": args.pool_per_cell}}
    path = run_dir / "overlay.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    method_config = ROOT / "configs" / "method" / f"{method}.yaml"
    return ["--config", args.config, "--config", str(method_config), "--config", str(path)]


def run(cmd: list[str], log: Path, threads: int | None = None) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def curve(tags: dict[str, list[tuple[int, float]]], tag: str, base: float) -> dict[int, float]:
    """Accuracy keyed by optimizer steps done; Lightning logs a validation after step s at s - 1."""
    return {0: base, **{step + 1: value for step, value in tags.get(tag, [])}}


def step_seconds(tags: dict[str, list[tuple[int, float]]]) -> dict[int, float]:
    """Seconds of each training step (0-based): generation, reward and preparation, training."""
    per_step: dict[int, float] = {}
    for tag in STEP_TIMES:
        for step, value in tags.get(tag, []):
            per_step[step] = per_step.get(step, 0.0) + value
    return per_step


def train_seconds_by_step(
    run_dir: Path, tags: dict, collection_s: float, stage_steps: int
) -> dict[int, float]:
    """Cumulative seconds of training work up to and including each step (0-based steps)."""
    per_step = step_seconds(tags)
    selections: dict[int, float] = {}
    for metrics in sorted((run_dir / "selections").glob("stage-*.metrics.json")):
        stage = int(metrics.name.split("-")[1].split(".")[0])
        data = json.loads(metrics.read_text())
        selections[stage] = data.get("curriculum/selection_seconds", 0.0)
    out, total = {0: collection_s}, collection_s
    for step in sorted(per_step):
        if step % stage_steps == 0:
            total += selections.get(step // stage_steps, 0.0)
        total += per_step[step]
        out[step + 1] = total  # after step s, global_step == s + 1
    return out


def first_reaching(points: dict[int, float], threshold: float) -> int | None:
    return next((s for s in sorted(points) if points[s] >= threshold - 1e-9), None)


def interval(values: list[float], half_widths: list[float]) -> dict[str, Any]:
    """Mean over seeds, per-seed values and each seed's 95% half-width."""
    return {
        "mean": statistics.mean(values),
        "per_seed": values,
        "ci95_half_width_per_seed": half_widths,
    }


def stored_runs(report: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The raw runs of a stored report (JSON keys back to ints) if it has ``settings``."""
    if not report.get("raw"):
        raise SystemExit("--merge: no stored report under that key to merge into")
    if report.get("settings") != settings:
        raise SystemExit(
            f"--merge: the stored report's settings {report.get('settings')} differ from "
            f"this run's {settings}; runs of different settings cannot be compared"
        )

    def ints(value: Any) -> Any:
        return {int(k): v for k, v in value.items()} if isinstance(value, dict) else value

    runs = {
        method: {int(seed): {k: ints(v) for k, v in run.items()} for seed, run in by_seed.items()}
        for method, by_seed in report["raw"].items()
    }
    collection = {int(k): v for k, v in report.get("trajectory_collection_seconds", {}).items()}
    return {
        "runs": runs,
        "total_seconds": report.get("total_seconds"),
        "collection_seconds": collection,
    }


def final(run: dict, kind: str) -> tuple[float, float]:
    """The last validation's accuracy of ``kind`` and its 95% half-width."""
    step = max(run[kind])
    return run[kind][step], run[f"{kind}_ci95"].get(step, math.nan)


def summarise(results: dict[str, dict[int, dict]], seeds: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method, by_seed in results.items():
        step_acc, wall_acc, steps_to = [], [], []
        for seed in seeds:
            r, full = by_seed[seed], results["full"][seed]
            best = max(full["targeted"].values())
            full_step = first_reaching(full["targeted"], best)
            step = first_reaching(r["targeted"], best)
            steps_to.append(step)
            if step is not None and full_step is not None:
                step_acc.append(full_step / max(step, 1) if step else math.inf)
                wall_full = full["wall"].get(full_step, 0.0)
                wall = r["wall"].get(step, 0.0)
                wall_acc.append(wall_full / wall if wall > 0 else math.inf)
            else:
                step_acc.append(0.0)
                wall_acc.append(0.0)
        finals = {k: [final(by_seed[s], k) for s in seeds] for k in ("targeted", "untargeted")}
        # gain = final - start; the two measurements' half-widths add in quadrature
        starts = [
            (by_seed[s]["targeted"][0], by_seed[s]["targeted_ci95"].get(0, math.nan)) for s in seeds
        ]
        pairs = list(zip(finals["targeted"], starts, strict=True))
        gains = [end - begin for (end, _), (begin, _) in pairs]
        gain_ci = [math.hypot(end_hw, begin_hw) for (_, end_hw), (_, begin_hw) in pairs]
        summary[method] = {
            "step_acceleration": statistics.median(step_acc),
            "wallclock_acceleration": statistics.median(wall_acc),
            "step_acceleration_per_seed": step_acc,
            "wallclock_acceleration_per_seed": wall_acc,
            "steps_to_full_best_per_seed": steps_to,
            "targeted_gain": interval(gains, gain_ci),
            "final_targeted": interval(*map(list, zip(*finals["targeted"], strict=True))),
            "final_untargeted": interval(*map(list, zip(*finals["untargeted"], strict=True))),
            "best_targeted_mean": statistics.mean(
                max(by_seed[s]["targeted"].values()) for s in seeds
            ),
            "curves": {
                kind: {
                    str(step): {
                        "mean": statistics.mean(by_seed[s][kind][step] for s in seeds),
                        "min": min(by_seed[s][kind][step] for s in seeds),
                        "max": max(by_seed[s][kind][step] for s in seeds),
                    }
                    for step in sorted(by_seed[seeds[0]][kind])
                    if all(step in by_seed[s][kind] for s in seeds)
                }
                for kind in ("targeted", "untargeted")
            },
        }
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, kind in zip(axes, ("targeted", "untargeted"), strict=True):
        for method, s in summary.items():
            points = s["curves"][kind]
            steps = [int(k) for k in points]
            mean = [points[k]["mean"] for k in points]
            ax.plot(steps, mean, marker="o", ms=3, label=method)
            ax.fill_between(
                steps,
                [points[k]["min"] for k in points],
                [points[k]["max"] for k in points],
                alpha=0.15,
            )
        ax.set_title(f"{kind} validation accuracy")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean, min-max over seeds)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[m for m in METHODS if m != "cropi_resample"],
        help=f"of {', '.join(METHODS)} (default: all but cropi_resample, which doubles the "
        "selection passes)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=90, help="optimizer steps per run")
    parser.add_argument("--stage-steps", type=int, default=30)
    parser.add_argument(
        "--val-every", type=int, default=30, help="steps between validations (each ~1 min)"
    )
    parser.add_argument("--config", default="configs/cropi_tiny.yaml")
    parser.add_argument("--runs", default="runs/acceleration")
    parser.add_argument("--out", default="results")
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs in parallel (each with --threads threads)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--targets",
        type=lambda text: [f.strip() for f in text.split(",") if f.strip()],
        default=None,
        help="comma-separated targeted families (default: the config's, e.g. mul,mod)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="starting policy (an HF folder or embedded:<name>) instead of the config's, e.g. "
        "the family-deficit warm start of the README",
    )
    parser.add_argument(
        "--pool-per-cell",
        type=int,
        default=None,
        help="the pool's prompts per (family, difficulty) cell instead of the config's "
        "(num_per_cell; 16 gives 384 prompts): a larger pool, so that a 10%% subset is not "
        "seen many times per stage",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the stored runs of methods not run now (same settings required)",
    )
    parser.add_argument(
        "--key",
        default=None,
        help="write the results under this key of acceleration.json (e.g. second_target), "
        "keeping what is there, and plot to acceleration_<key>.png",
    )
    args = parser.parse_args()
    if "full" not in args.methods:
        raise SystemExit("--methods must include 'full': accelerations are relative to it")
    if args.pool_per_cell is not None and args.pool_per_cell < 1:
        raise SystemExit(f"--pool-per-cell must be >= 1, got {args.pool_per_cell}")
    settings = {
        "seeds": args.seeds,
        "steps": args.steps,
        "stage_steps": args.stage_steps,
        "val_every": args.val_every,
        "config": args.config,
        "targets": args.targets,
        **({"model": args.model} if args.model else {}),
        **({"pool_per_cell": args.pool_per_cell} if args.pool_per_cell else {}),
    }
    runs, out = ROOT / args.runs, ROOT / args.out
    path = out / "acceleration.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    merged = (
        stored_runs(previous.get(args.key, {}) if args.key else previous, settings)
        if args.merge
        else {}
    )
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cache = runs / "trajectories"
    py = sys.executable
    started = time.perf_counter()

    def validate_start(seed: int) -> dict[str, float]:
        """Accuracy (and its 95% half-width) of the starting policy with this seed's evaluation
        samples (step 0)."""
        base_dir = runs / f"base-seed{seed}"
        shutil.rmtree(base_dir, ignore_errors=True)
        configs = config_args("full", base_dir, cache, args, seed)
        cmd = [py, "-m", "cropi_pl", "validate", *configs]
        run(cmd, base_dir / "log.txt", args.threads)
        tags = scalars(base_dir)
        return {
            f"{k}{suffix}": tags[f"val/{k}/accuracy{suffix}"][-1][1]
            for k in ("targeted", "untargeted")
            for suffix in ("", "_ci95")
        }

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        bases = dict(zip(args.seeds, pool.map(validate_start, args.seeds), strict=True))
    for seed, b in bases.items():
        print(
            f"starting policy, seed {seed}: targeted {b['targeted']:.3f} "
            f"+-{b['targeted_ci95']:.3f}, untargeted {b['untargeted']:.3f} "
            f"+-{b['untargeted_ci95']:.3f}"
        )

    def collect(seed: int) -> float:
        """Seconds to sample this seed's own trajectory cache (``--jobs`` seeds at a time, like
        the runs); with ``--merge`` the stored runs' cache is verified and its seconds charged."""
        configs = config_args("full", runs / f"base-seed{seed}", cache, args, seed)
        seconds = run(
            [py, "tools/collect_trajectories.py", *configs],
            runs / f"collect_log-seed{seed}.txt",
            args.threads,
        )
        return merged["collection_seconds"][seed] if args.merge else seconds

    collection_s = dict.fromkeys(args.seeds, 0.0)
    if USES_TRAJECTORIES & set(args.methods):
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            collection_s = dict(zip(args.seeds, pool.map(collect, args.seeds), strict=True))
        for seed, seconds in collection_s.items():
            print(
                f"trajectory collection, seed {seed}: {seconds:.1f}s "
                "(charged to every method that uses it)"
            )

    def one(method: str, seed: int) -> tuple[str, int, dict]:
        run_dir = runs / f"{method}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        configs = config_args(method, run_dir, cache, args, seed)
        seconds = run(
            [py, "-m", "cropi_pl", "fit", *configs],
            run_dir / "log.txt",
            args.threads,
        )
        tags = scalars(run_dir)
        charged = collection_s[seed] if method in USES_TRAJECTORIES else 0.0
        result = {
            **{
                f"{kind}{suffix}": curve(
                    tags, f"val/{kind}/accuracy{suffix}", bases[seed][f"{kind}{suffix}"]
                )
                for kind in ("targeted", "untargeted")
                for suffix in ("", "_ci95")
            },
            "wall": train_seconds_by_step(run_dir, tags, charged, args.stage_steps),
            "process_seconds": seconds,
        }
        t = result["targeted"]
        print(
            f"{method:17s} seed {seed}: targeted {[round(t[s], 3) for s in sorted(t)]} "
            f"({seconds:.0f}s)",
            flush=True,
        )
        return method, seed, result

    results: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for method, seed, result in pool.map(lambda job: one(*job), jobs):
            results[method][seed] = result

    if args.merge:
        full_diff = max(
            abs(
                results["full"][seed]["targeted"][step]
                - merged["runs"]["full"][seed]["targeted"][step]
            )
            for seed in args.seeds
            for step in results["full"][seed]["targeted"]
        )
        print(f"re-run full vs stored full: max |targeted diff| {full_diff}")
        results = {
            m: results.get(m, merged["runs"].get(m))
            for m in METHODS
            if m in results or m in merged["runs"]
        }
    summary = summarise(results, args.seeds)
    print(
        f"\n{'method':17s} {'step acc.':>9s} {'wall acc.':>9s} {'best tgt':>8s} "
        f"{'final tgt':>9s} {'final untgt':>11s}  steps to full's best (per seed)"
    )
    for method, s in summary.items():
        print(
            f"{method:17s} {s['step_acceleration']:9.2f} {s['wallclock_acceleration']:9.2f} "
            f"{s['best_targeted_mean']:8.3f} {s['final_targeted']['mean']:9.3f} "
            f"{s['final_untargeted']['mean']:11.3f}  {s['steps_to_full_best_per_seed']}"
        )
    pick = ("step_acceleration", "wallclock_acceleration", "final_untargeted", "targeted_gain")
    report = {
        "seeds": args.seeds,
        "targets": args.targets or "config",
        **{
            m: {k: summary[m][k] for k in pick}
            | {f"{k}_per_seed": summary[m][f"{k}_per_seed"] for k in pick[:2]}
            for m in ("full", "cropi")
            if m in summary
        },
        "methods": summary,
        "base_accuracy": {str(k): v for k, v in bases.items()},
        "trajectory_collection_seconds": {str(k): v for k, v in collection_s.items()},
        "settings": settings,
        "raw": {
            m: {
                str(s): {
                    k: {str(a): b for a, b in v.items()} if isinstance(v, dict) else v
                    for k, v in r.items()
                }
                for s, r in by.items()
            }
            for m, by in results.items()
        },
        "total_seconds": time.perf_counter() - started,
    }
    if args.merge:
        report["merged"] = {
            "kept_methods": sorted(set(results) - set(args.methods)),
            "full_rerun_max_abs_diff": full_diff,
            "stored_total_seconds": merged["total_seconds"],
        }
    if args.key:
        report_file = {**previous, args.key: report}
    else:  # a new main run replaces the old one but keeps the keyed runs (whole reports)
        keyed = {k: v for k, v in previous.items() if isinstance(v, dict) and "methods" in v}
        report_file = {**report, **keyed}
    write_bytes_atomic(path, json.dumps(report_file, indent=1).encode())
    figure = out / (f"acceleration_{args.key}.png" if args.key else "acceleration.png")
    plot(summary, figure)
    print(f"\nwrote {path} and {figure} in {report['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
