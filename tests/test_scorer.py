"""The influence pass: brute-force equivalence, and 2 gloo ranks give the single-process result."""

import os
import random
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cropi_pl.influence.factorised import FactorisedProjection
from cropi_pl.influence.popi import Block, POPIConfig, behaviour_logps, collate, prompt_loss
from cropi_pl.influence.projection import ProjectionConfig, SparseProjector
from cropi_pl.influence.scorer import InfluenceScorer
from cropi_pl.influence.selection import InfluenceSelector, SelectionContext
from cropi_pl.influence.trajectories import PromptTrajectories
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


def _brute_gradient(model, traj: PromptTrajectories, names: list[str]) -> torch.Tensor:
    """One prompt's POPI gradient by plain autograd on its own unpadded (K, T) block."""
    block = Block(*(x[0] for x in collate([traj], torch.device("cpu"))))
    loss = prompt_loss(model(block.input_ids).logits, block, POPIConfig())
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return torch.cat([g.reshape(-1) for g in grads]).double()


def _first(traj: PromptTrajectories, n: int | None) -> PromptTrajectories:
    if n is None:
        return traj
    return PromptTrajectories(
        traj.prompt_ids, traj.completion_ids[:n], traj.behaviour_logps[:n], traj.rewards[:n]
    )


def _check_scores(result, pool, targets, rows) -> None:
    """``rows(trajs)`` gives {index: expected projected vector} of the non-zero prompts."""
    pool_rows = rows(pool)
    assert result.eligible.tolist() == [i in pool_rows for i in range(len(pool))]
    for name, trajs in targets.items():
        mean = torch.stack(list(rows(trajs).values())).mean(0)
        torch.testing.assert_close(result.target_means[name].double(), mean, rtol=1e-4, atol=1e-6)
        for i in range(len(pool)):
            expected = (
                torch.nn.functional.cosine_similarity(pool_rows[i], mean, dim=0)
                if i in pool_rows
                else torch.tensor(0.0, dtype=torch.float64)
            )
            torch.testing.assert_close(
                result.scores[name][i].double(), expected, rtol=1e-4, atol=1e-5
            )


SETTINGS = {  # every gradient path x projection kind x cost option, against brute force
    "loop-gaussian": ({"method": "loop"}, "gaussian", None, None, False),
    "hooks-countsketch": ({"method": "hooks"}, "countsketch", None, None, False),
    "vmap-rademacher": ({"method": "vmap"}, "rademacher", None, None, False),
    "subset-countsketch": ({"method": "loop"}, "countsketch", r"layers\.0\.|lm_head", None, False),
    "hooks-subset-3-responses": ({"method": "hooks"}, "gaussian", r"layers\.0\.mlp", 3, False),
    "hooks-shared-prompts": ({"method": "hooks"}, "countsketch", None, None, True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_scores_equal_brute_force_projection_and_cosine(setting: str) -> None:
    options, kind, param_filter, responses, share = SETTINGS[setting]
    model, pool, targets = _setup()
    projection = ProjectionConfig(dim=64, kept_fraction=0.5, seed=3, kind=kind)
    scorer = InfluenceScorer(
        POPIConfig(param_filter=param_filter, share_prompt_cache=share),
        projection,
        prompts_per_batch=3,
        responses_per_prompt=responses,
        **options,
    )
    result = scorer.score(model, pool, targets, progress=False)

    names = [n for n, _ in model.named_parameters() if re.search(param_filter or "", n)]
    matrix = SparseProjector(
        sum(dict(model.named_parameters())[n].numel() for n in names), projection
    ).explicit_matrix()

    def rows(trajs):
        trajs = [_first(t, responses) for t in trajs]
        return {
            i: _brute_gradient(model, t, names) @ matrix.double()
            for i, t in enumerate(trajs)
            if len(set(t.rewards)) > 1
        }

    _check_scores(result, pool, targets, rows)


def test_target_subset_keeps_non_zero_prompts_capped_by_seed() -> None:
    """Prompt i is identified by its prompt token; prompts 0 and 5 have all-equal rewards, and
    prompt 7 only once ``responses_per_prompt`` keeps its first two (equal) rewards."""
    rewards = {0: [1.0, 1.0, 1.0], 5: [0.0, 0.0, 0.0], 7: [0.0, 0.0, 1.0]}
    trajs = [
        PromptTrajectories([i], [[1], [2], [3]], [[-1.0]] * 3, rewards.get(i, [1.0, 0.0, 1.0]))
        for i in range(10)
    ]

    def chosen(seed: int, cap: int = 4, responses: int | None = None) -> list[int]:
        scorer = InfluenceScorer(max_target_prompts=cap, seed=seed, responses_per_prompt=responses)
        return [t.prompt_ids[0] for t in scorer.target_subset(trajs)]

    assert chosen(1, cap=100) == [1, 2, 3, 4, 6, 7, 8, 9]
    assert chosen(1, cap=100, responses=2) == [1, 2, 3, 4, 6, 8, 9]
    assert len(chosen(1)) == 4 and not {0, 5} & set(chosen(1))
    assert chosen(1) == chosen(1)
    assert len({tuple(chosen(s)) for s in range(2, 8)}) > 1
    with pytest.raises(ValueError, match="all-equal cached rewards"):
        InfluenceScorer().target_subset([trajs[0], trajs[5]])


def test_target_means_keep_the_loops_one_prompt_per_forward() -> None:
    """ "loop" holds one prompt's activations at a time, target means included (8 SmolLM2 prompts
    per forward, their logits over a 49k vocabulary, took the real-model config to 19 GB)."""
    model, _, targets = _setup()
    trajs = InfluenceScorer().target_subset(targets["a"])
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    try:
        for method, forwards in (("loop", len(trajs)), ("hooks", -(-len(trajs) // 2))):
            rows.clear()
            scorer = InfluenceScorer(prompts_per_batch=2, method=method)
            scorer.project_mean(model, trajs, progress=False)
            assert len(rows) == forwards, (method, rows)
    finally:
        handle.remove()
    assert len(trajs) > 2  # so that the two methods differ


def test_factorised_scores_equal_brute_force_kronecker_projection() -> None:
    """LoGra path: vec(P_out^T G P_in) of each selected linear layer's exact weight gradient G."""
    model, pool, targets = _setup()
    popi = POPIConfig(param_filter=r"layers\.0\.(mlp|self_attn\.o_proj)")
    scorer = InfluenceScorer(popi, ProjectionConfig(seed=5), prompts_per_batch=3, factorised=(3, 4))
    result = scorer.score(model, pool, targets, progress=False)
    engine = FactorisedProjection(model, popi, 3, 4, seed=5, module_filter=popi.param_filter)
    layers = engine.layer_names
    assert len(layers) == 4 and result.pool_vectors.shape[1] == 4 * 12

    def rows(trajs):
        out = {}
        for i, t in enumerate(trajs):
            if len(set(t.rewards)) <= 1:
                continue
            flat = _brute_gradient(model, t, [f"{name}.weight" for name in layers])
            pieces, start = [], 0
            for name in layers:
                p_in, p_out = (m.double() for m in engine.projections[name])
                size = p_in.shape[0] * p_out.shape[0]
                weight_grad = flat[start : start + size].reshape(p_out.shape[0], p_in.shape[0])
                pieces.append((p_out.T @ weight_grad @ p_in).reshape(-1))
                start += size
            out[i] = torch.cat(pieces)
        return out

    _check_scores(result, pool, targets, rows)


def test_bf16_autocast_stays_close_to_fp32() -> None:
    """Lower precision with fp32 accumulation: the same ranking up to bf16 rounding."""
    model, pool, targets = _setup()
    projection = ProjectionConfig(dim=256, seed=3, kind="countsketch")
    exact = InfluenceScorer(projection=projection).score(model, pool, targets, progress=False)
    fast = InfluenceScorer(POPIConfig(autocast_bf16=True), projection)
    result = fast.score(model, pool, targets, progress=False)
    assert result.pool_vectors.dtype == torch.float32
    assert torch.equal(result.eligible, exact.eligible)
    for name in targets:
        error = (result.scores[name] - exact.scores[name]).abs().max().item()
        assert 0 < error < 0.05, name


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, pool, targets = _setup()
    scorer = InfluenceScorer(projection=ProjectionConfig(dim=32, seed=1), prompts_per_batch=2)
    result = scorer.score(model, pool, targets, progress=False)
    if rank == 0:
        saved = {"scores": result.scores, "vectors": result.pool_vectors}
        torch.save({**saved, "means": result.target_means}, out)
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
    for name, mean in single.target_means.items():  # each rank sums a share of the targets
        torch.testing.assert_close(distributed["means"][name], mean, rtol=1e-5, atol=1e-6)
    ids = [f"p{i}" for i in range(len(pool))]

    def select(scores):
        ctx = SelectionContext(ids=ids, scores=scores, eligible=single.eligible)
        return InfluenceSelector().select(ctx, 4).ids

    assert select(distributed["scores"]) == select(single.scores)
