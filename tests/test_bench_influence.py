"""tools/bench_influence.py: metrics, the reference projector, pass bookkeeping and a tiny run."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_influence as bench  # noqa: E402

from cropi_pl.influence.gradients import POPIGradients  # noqa: E402
from cropi_pl.influence.popi import POPIConfig  # noqa: E402
from cropi_pl.influence.trajectories import PromptTrajectories  # noqa: E402
from cropi_pl.policy.tokenizer import build_tokenizer  # noqa: E402
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


def test_influence_scores_is_cosine_with_target_mean():
    gen = _generator()
    pool, targets = torch.randn(6, 11, generator=gen), torch.randn(4, 11, generator=gen)
    mean = [sum(targets[r, c].item() for r in range(4)) / 4 for c in range(11)]
    for row in range(6):
        values = pool[row].tolist()
        dot = sum(v * m for v, m in zip(values, mean, strict=True))
        norms = sum(v * v for v in values) ** 0.5 * sum(m * m for m in mean) ** 0.5
        got = bench.influence_scores(pool, targets, max_targets=100, seed=0)[row].item()
        assert got == pytest.approx(dot / norms, abs=1e-6)


def test_reference_projector_is_subset_then_fp16_dense_matrix():
    gen = _generator()
    projector = bench.ReferenceProjector(num_params=50, kept_fraction=0.3, dim=8, seed=3)
    assert projector.index.numel() == 15 and projector.index.unique().numel() == 15
    assert torch.equal(projector.matrix, projector.matrix.half().float())  # fp16 values
    assert projector.matrix_bytes_fp16 == 15 * 8 * 2
    explicit = torch.zeros(50, 8, dtype=torch.float64)
    explicit[projector.index] = projector.matrix.double()
    grads = torch.randn(3, 50, generator=gen) * 1e-2
    expected = grads.half().double() @ explicit
    got = projector.project(grads)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=1e-7)
    half = projector.project_half_kernel(grads)
    torch.testing.assert_close(half.double(), expected, rtol=2e-3, atol=1e-7)
    same_seed = bench.ReferenceProjector(num_params=50, kept_fraction=0.3, dim=8, seed=3)
    assert torch.equal(same_seed.matrix, projector.matrix)


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


def test_gradient_passes_rows_match_per_prompt_gradients():
    """Each stored row is its own prompt's gradient and the reference projects exactly it."""
    rng = random.Random(random.randrange(2**31))
    model = tiny_char_llama(rng.randrange(100))
    vocab = model.config.vocab_size
    work = bench.Workload(_trajs(rng, 11, 3, vocab), _trajs(rng, 6, 4, vocab), {})
    config = bench.BenchConfig(prompts_per_batch=3, default_dim=8)
    num_params = sum(p.numel() for p in model.parameters())
    projector = bench.ReferenceProjector(num_params, 0.5, 8, seed=1)
    passes = bench.gradient_passes(model, work, projector, config)
    eligible = [i for i in range(11) if i % 4 != 0], [i for i in range(6) if i % 4 != 0]
    assert (passes.pool_rows, passes.target_rows) == eligible
    assert passes.prompts == 8 + 4
    pool_batches, target_batches = passes.batches
    assert sorted(j for b in pool_batches for j in b) == list(range(8))
    assert sorted(j for b in target_batches for j in b) == list(range(8, 12))
    assert [len(b) for b in pool_batches] == [3, 3, 2]
    assert [len(b) for b in target_batches] == [3, 1]
    # InfluenceScorer's projection calls: batches buffered until >= projection_batch rows, per set
    assert passes.projection_groups(5) == [
        pool_batches[0] + pool_batches[1], pool_batches[2], target_batches[0] + target_batches[1]
    ]  # fmt: skip
    assert passes.projection_groups(1) == [*pool_batches, *target_batches]
    assert passes.projection_groups(100) == [
        [j for b in pool_batches for j in b], [j for b in target_batches for j in b]
    ]  # fmt: skip
    loop = POPIGradients(model, POPIConfig(), prompts_per_batch=1, method="loop")
    prompts = [work.pool[i] for i in eligible[0]] + [work.targets[i] for i in eligible[1]]
    for j, traj in enumerate(prompts):
        [(_, expected)] = loop.compute([traj])
        torch.testing.assert_close(passes.grads[j : j + 1], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(passes.reference[j], projector.project(expected)[0])
    pool, targets = passes.split(passes.grads)
    assert pool.shape[0] == 8 and targets.shape[0] == 4
    assert passes.ours.seconds > 0 and passes.reference_section.seconds > 0


def test_tiny_end_to_end_run(tmp_path):
    path = tmp_path / "policy"
    tiny_char_llama(0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    out = tmp_path / "bench.json"
    argv = [
        "--model", str(path), "--pool-size", "28", "--target-size", "8", "--pool-samples", "4",
        "--target-samples", "4", "--max-new-tokens", "3", "--dims", "8,32", "--fractions", "1,0.5",
        "--default-dim", "32", "--default-fraction", "0.5", "--factorised", "2x2",
        "--prompts-per-batch", "4", "--method-batches", "2,5",
        "--projection-batch", "6",
        "--threads", "1", "--fake-rewards", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    for key in ("precision_at_10pct", "reference_precision_at_10pct", "speedup_vs_reference"):
        assert 0 <= result[key] <= (1 if "precision" in key else float("inf"))
    assert result["seconds_per_prompt"] > 0
    assert [r["setting"] for r in result["rows"]] == [
        "k=8 kept=1", "k=8 kept=0.5", "k=32 kept=1", "k=32 kept=0.5",
        "2x2 x 8 linears", "k=32 kept=0.1",
    ]  # fmt: skip
    default = result["rows"][3]
    assert result["precision_at_10pct"] == default["precision_at_10pct"]
    assert result["speedup_vs_reference"] == pytest.approx(
        result["reference_seconds_per_prompt"] / default["seconds_per_prompt"]
    )
    assert result["scorer_check"]["relative_difference"] <= 1e-4
    methods = result["gradient_methods"]
    assert list(methods) == ["loop", "hooks x2", "hooks x5", "vmap x2", "vmap x5"]
    assert result["gradient_method"] == "loop"  # the CPU default: the product path is the loop
    assert methods["loop"]["max_relative_difference"] == 0
    for timing in methods.values():
        assert timing["max_relative_difference"] < 1e-5 and timing["seconds_per_prompt"] > 0
    precise = [r for r in result["rows"][:-1] if r["precision_at_10pct"] >= 0.9]
    fastest = result["fastest_meeting_precision_target"]
    if precise:
        assert fastest["seconds_per_prompt"] == min(r["seconds_per_prompt"] for r in precise)
    else:
        assert fastest is None
    assert result["workload"]["pool_prompts"] == 28
    assert result["workload"]["timed_prompts"] == (
        result["workload"]["eligible_pool_prompts"] + result["workload"]["eligible_target_prompts"]
    )
    with pytest.raises(SystemExit):
        bench.main(["--fractions", "0"])
