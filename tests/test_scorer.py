"""The influence pass: brute-force equivalence, and 2 gloo ranks give the single-process result."""

import os
import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cropi_pl.influence.popi import POPIGradients, PromptTrajectories, behaviour_logps
from cropi_pl.influence.projection import ProjectionConfig, SparseProjector
from cropi_pl.influence.scorer import InfluenceScorer
from cropi_pl.influence.selection import InfluenceSelector, SelectionContext
from tests.models import tiny_llama


def _trajectories(model, n: int, k: int, seed: int) -> list[PromptTrajectories]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 40) for _ in range(rng.randint(2, 6))]
        completions = [[rng.randrange(3, 40) for _ in range(rng.randint(1, 5))] for _ in range(k)]
        rewards = [float(rng.random() < 0.5) for _ in range(k)]
        if i % 4 == 0:
            rewards = [1.0] * k  # all equal: zero gradient, never selected
        logps = behaviour_logps(model, prompt, completions)
        out.append(PromptTrajectories(prompt, completions, logps, rewards))
    return out


def _setup(seed=0):
    model = tiny_llama(0, 40)
    pool = _trajectories(model, 12, 4, seed)
    targets = {"a": _trajectories(model, 5, 6, seed + 1), "b": _trajectories(model, 5, 6, seed + 2)}
    with torch.no_grad():  # move away from beta so the ratios are not all 1
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, pool, targets


def test_scores_equal_brute_force_projection_and_cosine():
    model, pool, targets = _setup()
    projection = ProjectionConfig(dim=64, kept_fraction=0.5, seed=3)
    scorer = InfluenceScorer(projection=projection, prompts_per_batch=3, projection_batch=5)
    result = scorer.score(model, pool, targets, progress=False)

    grads = POPIGradients(model, scorer.popi, prompts_per_batch=1, method="loop")
    matrix = SparseProjector(grads.num_params, projection).explicit_matrix().double()

    def projected(trajs):
        rows = {}
        for idx, flat in grads.compute(trajs):
            for j, i in enumerate(idx):
                rows[i] = flat[j].double() @ matrix
        return rows

    pool_rows = projected(pool)
    assert result.eligible.tolist() == [i in pool_rows for i in range(len(pool))]
    for name, trajs in targets.items():
        rows = projected(trajs)
        mean = torch.stack(list(rows.values())).mean(0)
        for i in range(len(pool)):
            expected = (
                torch.nn.functional.cosine_similarity(pool_rows[i], mean, dim=0)
                if i in pool_rows
                else torch.tensor(0.0, dtype=torch.float64)
            )
            torch.testing.assert_close(
                result.scores[name][i].double(), expected, rtol=1e-4, atol=1e-5
            )


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, pool, targets = _setup()
    scorer = InfluenceScorer(projection=ProjectionConfig(dim=32, seed=1), prompts_per_batch=2)
    result = scorer.score(model, pool, targets, progress=False)
    if rank == 0:
        torch.save({"scores": result.scores, "vectors": result.pool_vectors}, out)
    dist.destroy_process_group()


def test_two_ranks_give_the_single_process_scores_and_selection(tmp_path):
    out = str(tmp_path / "dist.pt")
    mp.start_processes(
        _rank_main, args=(2, 29500 + random.randrange(1000), out), nprocs=2, start_method="fork"
    )
    distributed = torch.load(out)
    model, pool, targets = _setup()
    scorer = InfluenceScorer(projection=ProjectionConfig(dim=32, seed=1), prompts_per_batch=2)
    single = scorer.score(model, pool, targets, progress=False)
    torch.testing.assert_close(distributed["vectors"], single.pool_vectors, rtol=1e-5, atol=1e-6)
    ids = [f"p{i}" for i in range(len(pool))]

    def select(scores):
        ctx = SelectionContext(ids=ids, scores=scores, eligible=single.eligible)
        return InfluenceSelector().select(ctx, 4).ids

    assert select(distributed["scores"]) == select(single.scores)
