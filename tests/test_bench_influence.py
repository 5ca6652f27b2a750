"""tools/bench_influence.py: metrics, the reference projector, pass bookkeeping and a tiny run."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_influence as bench  # noqa: E402

from cropi_pl.influence.factorised import FactorisedProjection  # noqa: E402
from cropi_pl.influence.gradients import POPIGradients  # noqa: E402
from cropi_pl.influence.popi import POPIConfig  # noqa: E402
from cropi_pl.influence.projection import ProjectionConfig, SparseProjector  # noqa: E402
from cropi_pl.influence.trajectories import PromptTrajectories  # noqa: E402
from tests.models import tiny_char_llama  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a shared CPU makes them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


def _brute_top(values: torch.Tensor, top: int) -> set[int]:
    """The ``top`` best indices, ties by lower index, by sorting Python tuples."""
    return set(sorted(range(len(values)), key=lambda i: (-values[i].item(), i))[:top])


def test_precision_at_matches_brute_force():
    gen = _generator()
    for n in (9, 37, 120):
        scores = torch.randint(0, 6, (n,), generator=gen).double()  # many ties
        exact = torch.randn(n, generator=gen).double()
        exact[: n // 3] = exact[n // 3]  # ties in the exact scores too
        top = max(1, int(0.1 * n + 0.5))

        expected = len(_brute_top(scores, top) & _brute_top(exact, top)) / top
        assert bench.precision_at(scores, exact) == pytest.approx(expected)
    assert bench.precision_at(exact, exact) == 1.0


def test_spearman_matches_brute_force():
    gen = _generator()
    a = torch.randint(0, 8, (40,), generator=gen).double()
    b = a + torch.randint(0, 5, (40,), generator=gen).double()

    def ranks(x: torch.Tensor) -> list[float]:
        values = x.tolist()
        return [
            1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values
        ]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / 40, sum(rb) / 40
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - ma) ** 2 for x in ra)
    var_b = sum((y - mb) ** 2 for y in rb)
    assert bench.average_ranks(a).tolist() == pytest.approx(ra)
    assert bench.spearman(a, b) == pytest.approx(cov / (var_a * var_b) ** 0.5, abs=1e-12)
    x = torch.randn(25, generator=gen)
    assert bench.spearman(x, x**3) == pytest.approx(1.0)
    assert bench.spearman(x, -x) == pytest.approx(-1.0)


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    gen = _generator()
    exact = torch.randn(200, generator=gen).double()
    noisy = exact + 0.3 * torch.randn(200, generator=gen).double()
    lo, hi = bench.bootstrap_interval(bench.precision_at, noisy, exact, 200, seed=1)
    assert 0 <= lo <= bench.precision_at(noisy, exact) <= hi <= 1 and lo < hi
    assert (lo, hi) == bench.bootstrap_interval(bench.precision_at, noisy, exact, 200, seed=1)
    assert bench.bootstrap_interval(bench.spearman, exact, exact, 50, seed=2) == (
        pytest.approx(1.0),
        pytest.approx(1.0),
    )
    report = bench.fidelity(noisy, exact, 50, seed=3)
    for key in ("precision_at_5pct", "precision_at_10pct", "precision_at_20pct", "spearman"):
        lo, hi = report[f"{key}_ci95"]
        assert lo <= report[key] <= hi


def test_measured_sees_allocations():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    with bench.measured() as section:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert block[-1] == 1
    assert section.peak_bytes is not None and section.peak_bytes >= 60 * 2**20
    assert section.seconds > 0


def _trajs(rng: random.Random, n: int, k: int, vocab: int) -> list[PromptTrajectories]:
    out = []
    for i in range(n):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(2, 6))]
        completions = [
            [rng.randrange(4, vocab) for _ in range(rng.randint(1, 5))] for _ in range(k)
        ]
        rewards = [float(rng.random() < 0.5) for _ in range(k - 1)]
        rewards.append(1.0 - rewards[0])  # mixed: a non-zero gradient
        if i % 4 == 0:
            rewards = [0.0] * k  # all equal: zero gradient, excluded
        logps = [[-rng.random() for _ in c] for c in completions]
        out.append(PromptTrajectories(prompt, completions, logps, rewards))
    return out


def test_combined_pass_matches_brute_force_per_prompt_gradients():
    """Exact cosines, streamed projections of the full and a tail subset of the gradient, and
    the factorised projection, all from one hooked pass, against the product's own paths."""
    rng = random.Random(random.randrange(2**31))
    model = tiny_char_llama(rng.randrange(100))
    vocab = model.config.vocab_size
    pool, targets = _trajs(rng, 11, 3, vocab), _trajs(rng, 6, 4, vocab)
    loop = POPIGradients(model, POPIConfig(), prompts_per_batch=1, method="loop")
    tail = loop.param_names[-3:]
    offset = loop.offsets[tail[0]]
    full = SparseProjector(loop.num_params, ProjectionConfig(dim=16, kind="countsketch"))
    part = SparseProjector(loop.num_params - offset, ProjectionConfig(dim=8, kind="countsketch"))
    factorised = FactorisedProjection(model, POPIConfig(), 2, 3, seed=4)
    got = bench.combined_pass(model, pool, targets, {"full": (full, 0), "tail": (part, offset)},
                              factorised)  # fmt: skip

    def flat(trajs):
        rows = {}
        for idx, g in loop.compute(trajs):
            rows.update({i: g[j].double() for j, i in enumerate(idx)})
        return torch.stack([rows[i] for i in sorted(rows)])

    pool_grads, target_grads = flat(pool), flat(targets)
    assert pool_grads.shape[0] == 8 == got.exact.numel()  # every 4th prompt has equal rewards
    mean = target_grads.mean(0)
    expected = pool_grads @ mean / (pool_grads.norm(dim=1) * mean.norm())
    torch.testing.assert_close(got.exact, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.vectors["full"].double(), full.project(pool_grads).double(),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(
        got.vectors["tail"].double(),
        part.project(pool_grads[:, offset:]).double(),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        got.target_means["full"].double(),
        full.project(target_grads).double().mean(0),
        rtol=1e-4,
        atol=1e-6,
    )
    rows = dict(item for idx, v in factorised.project(pool) for item in zip(idx, v, strict=True))
    expected_f = torch.stack([rows[i] for i in sorted(rows)])
    torch.testing.assert_close(got.vectors["factorised"], expected_f, rtol=1e-4, atol=1e-6)


def test_tiny_end_to_end_run(tmp_path):
    """The embedded and the real-model sections on a few prompts (the embedded policy stands in
    for SmolLM2); the selection section trains, so it only runs in the real benchmark."""
    out = tmp_path / "bench.json"
    argv = [
        "--sections", "embedded,smollm2", "--pool-size", "40", "--target-size", "8",
        "--skip-options", "torch.compile",  # about 35 s of compilation
        "--dims", "16", "--default-dim", "16", "--bootstrap", "10", "--threads", "1",
        "--roofline-repeats", "2",
        "--smol-model", "embedded:tiny", "--smol-pool", "24", "--smol-targets", "8",
        "--smol-timed", "2", "--smol-dim", "16", "--reference-slice", "1000", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["eligible_prompts"] == result["embedded"]["eligible_prompts"] > 0
    assert 0 <= result["precision_at_10pct"] <= 1 and result["gemm_fraction_of_peak"] > 0
    roofline = result["embedded"]["roofline"]
    assert roofline["mean_block_tokens"] > 0 and roofline["model_shape_gemm_flops"] > 0
    assert roofline["fraction_of_model_shape_gemm"] == pytest.approx(
        roofline["achieved_flops"] / roofline["model_shape_gemm_flops"]
    )
    rows = {r["name"]: r for r in result["embedded"]["rows"]}
    hooks_seconds = rows[bench.HOOKS.format(k=16)]["extra"]["seconds"]
    assert roofline["hooks_fraction_of_peak"] == pytest.approx(
        roofline["influence_pass_flops"] / hooks_seconds / roofline["gemm_peak_flops"]
    )
    bf16_seconds = rows[bench.BF16_HOOKS.format(k=16)]["extra"]["seconds"]
    assert roofline["bf16_hooks_fraction_of_bf16_peak"] == pytest.approx(
        roofline["influence_pass_flops"] / bf16_seconds / roofline["bf16_gemm_peak_flops"]
    )
    assert roofline["compiled_second_pass_fraction_of_peak"] is None  # torch.compile skipped
    for method in ("loop", "hooks"):  # steady state: the best of the back-to-back passes
        seconds = roofline["steady_seconds"][method]
        assert len(seconds) == 2 and min(seconds) > 0
        assert roofline["steady_fraction_of_peak"][method] == pytest.approx(
            roofline["influence_pass_flops"] / min(seconds) / roofline["gemm_peak_flops"]
        )
    assert result["gemm_fraction_of_peak"] == roofline["steady_fraction_of_peak"]["hooks"]
    names = list(rows)
    assert names[0] == "countsketch k=16" and any(n.startswith("factorised") for n in names)
    smol = result["smollm2"]
    assert set(smol["rows"]) == {"reference", "default", "subset", "factorised", "bf16 hooks"}
    for name in ("default", "subset", "factorised"):  # the timed path gives the scored vectors
        assert smol["rows"][name]["max_rel_diff_vs_combined_pass"] < 1e-4
    assert 0 < smol["rows"]["bf16 hooks"]["max_rel_diff_vs_combined_pass"] < 0.05  # bf16 rounding
    assert 0 <= smol["rows"]["bf16 hooks"]["precision_at_10pct"] <= 1
    assert smol["speedup_vs_reference"] > 0
    assert "| embedded: countsketch k=16 |" in result["table"]
    config = bench.BenchConfig(sections=(), dims=(16,), default_dim=16)
    again = bench.run(config, result)  # --update: sections not run now are kept
    assert again["smollm2"] == smol and again["embedded"] == result["embedded"]


def test_selection_section_runs_the_config(tmp_path):
    """The selection section fits a config (here the test curriculum, 3 steps of 2-step stages),
    prices its passes in that run's steps, and scores each option against exact cosines."""
    out = tmp_path / "bench.json"
    config = Path(__file__).parent / "configs" / "cropi_test.yaml"
    argv = [
        "--sections", "selection", "--selection-config", str(config), "--train-steps", "2",
        "--threads", "1", "--out", str(out), "--lean-micro-batch-size", "3",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    section = result["selection"]
    lean = section["lean_fit_pass_seconds"]
    assert section["lean_micro_batch_size"] == 3 and len(lean) == 2 and min(lean) > 0
    assert section["step_equivalents_vs_lean_step"] == pytest.approx(
        sum(lean) / 2 / section["lean_train_step_seconds"]
    )
    top = result["selection_pass_step_equivalents_vs_lean_step"]
    assert top == section["step_equivalents_vs_lean_step"]
    assert section["lean_median_train_step_seconds"] > 0
    steps = section["each_train_step_seconds"]
    assert section["train_steps_timed"] == len(steps) == 3 and min(steps) > 0  # steps 0-2
    assert section["train_step_seconds"] == pytest.approx(sum(steps) / 3)  # the mean
    assert section["median_train_step_seconds"] == pytest.approx(sorted(steps)[1])
    assert section["host_memory_kept"] is True  # glibc: the bench runs what the CLI runs
    passes = section["fit_pass_seconds"]
    assert len(passes) == 2 and min(passes) > 0  # stages start at steps 0 and 2
    assert section["step_equivalents"] == pytest.approx(
        sum(passes) / 2 / section["train_step_seconds"]
    )
    assert section["step_equivalents_vs_median_step"] == pytest.approx(
        sum(passes) / 2 / section["median_train_step_seconds"]
    )
    assert section["first_pass_step_equivalents"] == pytest.approx(
        passes[0] / section["train_step_seconds"]
    )
    assert section["fit_selection_seconds_with_collection"] > passes[0]
    assert section["pass_flops"] > 0 and section["gemm_peak_flops"] > 0
    assert section["gemm_peak_dtype"] == "float32"  # the test config runs no autocast
    assert section["flop_floor_step_equivalents"] == pytest.approx(
        section["pass_flops"] / section["gemm_peak_flops"] / section["train_step_seconds"]
    )
    assert 0 < section["eligible_prompts"] <= section["pool_prompts"] == 16
    sketches = {f"k={k}, sketch seed {s}" for k in (256, 1024) for s in (1, 2, 3)}
    same_gradients = {
        "float32 (no autocast)", "loop (one backward per prompt)",
        "prompt once per response (share_prompt_cache off)",
        "every response, prompt once per response, 8 prompts per backward",
        "float32 loop, sdpa (the default before bf16)",
        *(f"{n} prompts per backward" for n in (16, 24, 32)),
    }  # fmt: skip
    assert set(section["options"]) == {
        "config", "K'=4", "last layer + head", *same_gradients, *sketches
    }  # fmt: skip
    for option in section["options"].values():
        assert set(option["agreement_precision_at_10pct"]) == {"mul"}
        assert 0 <= option["agreement_precision_at_10pct"]["mul"] <= 1
    # the test config is a float32 loop: these variants compute its gradients (up to float
    # rounding), so they score the same and agree as much
    for name in same_gradients:
        agreement = section["options"][name]["agreement_precision_at_10pct"]
        assert agreement == section["agreement_precision_at_10pct"], name
