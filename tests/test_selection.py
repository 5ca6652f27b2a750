"""Target means, cosines, rank merges and selectors: hand-computed and brute-force checks."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from cropi_pl.influence.selection import (
    FullSelector,
    InfluenceSelector,
    LearnabilitySelector,
    PassRateSelector,
    RandomSelector,
    Selection,
    SelectionContext,
    cosine_scores,
    max_merge,
    reciprocal_rank_merge,
    selection_size,
)

# Three target sets over five prompts; per-set top-3 ranks are written next to each set.
SETS = {
    "a": torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1]),  # 0:1 1:2 2:3
    "b": torch.tensor([0.1, 0.6, 0.2, 0.5, 0.0]),  # 1:1 3:2 2:3
    "c": torch.tensor([0.0, 0.3, 0.1, 0.9, 0.2]),  # 3:1 1:2 4:3
}
ALL = torch.ones(5, dtype=torch.bool)


def test_rrf_hand_computed() -> None:
    # merged: 0 -> 1, 1 -> 1/2+1+1/2 = 2, 2 -> 1/3+1/3, 3 -> 1/2+1 = 3/2, 4 -> 1/3
    indices, merged = reciprocal_rank_merge(SETS, ALL, 3)
    assert indices.tolist() == [1, 3, 0]
    assert merged.tolist() == [2.0, 1.5, 1.0]


def test_rrf_hand_computed_with_ineligible_and_tie() -> None:
    # Without prompt 1: a: 0:1 2:2 3:3, b: 3:1 2:2 0:3, c: 3:1 4:2 2:3
    # merged: 3 -> 7/3, 0 -> 4/3, 2 -> 1/2+1/2+1/3 = 4/3 (tie; 0 has best single rank 1 < 2)
    eligible = torch.tensor([True, False, True, True, True])
    indices, merged = reciprocal_rank_merge(SETS, eligible, 3)
    assert indices.tolist() == [3, 0, 2]
    assert merged.tolist() == pytest.approx([7 / 3, 4 / 3, 4 / 3], abs=1e-15)


def test_rrf_tie_on_merged_and_best_rank_falls_back_to_index() -> None:
    scores = {"a": torch.tensor([0.9, 0.8, 0.1, 0.7]), "b": torch.tensor([0.1, 0.8, 0.9, 0.2])}
    # a: 0:1 1:2, b: 2:1 1:2 -> every merged score is 1; best ranks 1, 2, 1 -> [0, 2, 1]
    indices, merged = reciprocal_rank_merge(scores, torch.ones(4, dtype=torch.bool), 2)
    assert indices.tolist() == [0, 2]
    assert merged.tolist() == [1.0, 1.0]


def test_max_merge_hand_computed() -> None:
    # max over sets: [0.5, 0.6, 0.3, 0.9, 0.2]
    indices, best = max_merge(SETS, ALL, 3)
    assert indices.tolist() == [3, 1, 0]
    assert best.tolist() == pytest.approx([0.9, 0.6, 0.5])
    eligible = torch.tensor([True, True, True, False, True])
    assert max_merge(SETS, eligible, 2)[0].tolist() == [1, 0]
    tied = {"a": torch.tensor([0.2, 0.5, 0.5]), "b": torch.tensor([0.5, 0.1, 0.0])}
    assert max_merge(tied, torch.ones(3, dtype=torch.bool), 2)[0].tolist() == [0, 1]


def _brute_force_rrf(scores: list[list[float]], eligible: list[bool], n: int):
    """Rank by counting who beats whom, exactly as the definition reads."""
    size = len(eligible)
    merged: dict[int, Fraction] = {}
    best: dict[int, int] = {}
    for values in scores:
        for s in range(size):
            if not eligible[s]:
                continue
            rank = 1 + sum(
                1
                for t in range(size)
                if eligible[t] and (values[t] > values[s] or (values[t] == values[s] and t < s))
            )
            if rank <= n:
                merged[s] = merged.get(s, Fraction(0)) + Fraction(1, rank)
                best[s] = min(best.get(s, rank), rank)
    chosen: list[int] = []
    for _ in range(min(n, len(merged))):
        top = None
        for s in merged:
            if s in chosen:
                continue
            key = (-merged[s], best[s], s)
            if top is None or key < (-merged[top], best[top], top):
                top = s
        chosen.append(top)
    return chosen, [float(merged[s]) for s in chosen]


def _brute_force_max(scores: list[list[float]], eligible: list[bool], n: int) -> list[int]:
    best = [max(values[s] for values in scores) for s in range(len(eligible))]
    pool = [s for s in range(len(eligible)) if eligible[s]]
    chosen = []
    for _ in range(min(n, len(pool))):
        top = max((s for s in pool if s not in chosen), key=lambda s: (best[s], -s))
        chosen.append(top)
    return chosen


@pytest.mark.parametrize("trial", range(20))
def test_merges_match_brute_force(trial: int) -> None:
    gen = torch.Generator().manual_seed(trial)
    size = int(torch.randint(5, 40, (1,), generator=gen))
    num_sets = int(torch.randint(1, 4, (1,), generator=gen))
    n = int(torch.randint(1, size + 3, (1,), generator=gen))
    # Coarse values force ties, so the tie-breaking rules are exercised.
    scores = {
        f"v{i}": torch.randint(-4, 5, (size,), generator=gen).float() / 4 for i in range(num_sets)
    }
    eligible = torch.rand(size, generator=gen) < 0.8
    lists = [v.tolist() for v in scores.values()]
    expected, expected_merged = _brute_force_rrf(lists, eligible.tolist(), n)
    indices, merged = reciprocal_rank_merge(scores, eligible, n)
    assert indices.tolist() == expected
    assert merged.tolist() == pytest.approx(expected_merged, abs=1e-12)
    assert max_merge(scores, eligible, n)[0].tolist() == _brute_force_max(
        lists, eligible.tolist(), n
    )


def test_merge_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no target score sets"):
        reciprocal_rank_merge({}, ALL, 2)
    with pytest.raises(ValueError, match=r"scores\['b'\] has shape"):
        max_merge({"a": torch.zeros(5), "b": torch.zeros(4)}, ALL, 2)
    with pytest.raises(ValueError, match="eligible row 2 is NaN"):
        reciprocal_rank_merge({"a": torch.tensor([0.0, 1.0, float("nan"), 0, 0])}, ALL, 2)


@pytest.mark.parametrize("rows", [4096, 3, 1])  # whole pool, chunks with a remainder, row by row
def test_cosine_scores_match_loop(rows: int) -> None:
    pool = torch.randn(7, 5)
    pool[3] = 0
    target = torch.randn(5)
    out = cosine_scores(pool, target, rows)
    assert out.dtype == torch.float32 and out.shape == (7,)
    for i in range(7):
        p, t = pool[i].double().tolist(), target.double().tolist()
        dot = sum(a * b for a, b in zip(p, t, strict=True))
        norm_p = sum(a * a for a in p) ** 0.5
        norm_t = sum(b * b for b in t) ** 0.5
        expected = 0.0 if norm_p == 0 else dot / (norm_p * norm_t)
        assert out[i].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="norm 0"):
        cosine_scores(pool, torch.zeros(5))
    pool[5, 1] = float("inf")
    with pytest.raises(ValueError, match="row 5 has"):  # its index in the pool, not the chunk
        cosine_scores(pool, target, rows)


IDS = [f"p{i}" for i in range(6)]
PASS = torch.tensor([0.0, 0.25, 0.5, 1.0, 0.75, 0.125])


def test_learnability_selector_hand_computed() -> None:
    # p(1-p) = [0, 3/16, 1/4, 0, 3/16, 7/64]: 2 first, then 1 and 4 tied (lower index first)
    sel = LearnabilitySelector().select(SelectionContext(IDS, pass_rate=PASS), 3)
    assert sel.indices == [2, 1, 4] and sel.ids == ["p2", "p1", "p4"]
    assert sel.scores == [0.25, 0.1875, 0.1875] and sel.method == "learnability"
    # p(1-p) of 0.8 and 0.2 differ by round-off only (in float64 and more so from float32
    # storage); they must still tie and go by index.
    for dtype in (torch.float32, torch.float64):
        rate = torch.tensor([0.8, 0.2, 0.8 + 1e-4], dtype=dtype)
        sel = LearnabilitySelector().select(SelectionContext(["x", "y", "z"], rate), 3)
        assert sel.indices == [0, 1, 2]


def test_pass_rate_selector_hand_computed() -> None:
    ctx = SelectionContext(IDS, pass_rate=PASS, seed=3)
    sel = PassRateSelector().select(ctx, 3)
    assert len(sel.indices) == 3 and set(sel.indices) <= {1, 2, 4, 5}
    assert sel.scores == PASS[sel.indices].tolist()
    everything = PassRateSelector().select(ctx, 10)  # fewer than n exist: all of them, no filler
    assert sorted(everything.indices) == [1, 2, 4, 5]
    assert PassRateSelector().select(ctx, 3) == sel


def test_random_selector_seeded_by_seed_and_stage() -> None:
    ids = [f"q{i}" for i in range(100)]

    def pick(seed: int, stage: int) -> list[int]:
        return RandomSelector().select(SelectionContext(ids, seed=seed, stage=stage), 10).indices

    assert pick(0, 1) == pick(0, 1)
    assert len(set(pick(0, 1))) == 10
    assert pick(0, 1) != pick(0, 2)
    assert sorted(RandomSelector().select(SelectionContext(IDS), 50).indices) == list(range(6))


def test_full_selector_takes_everything() -> None:
    sel = FullSelector().select(SelectionContext(IDS, stage=2), 1)
    assert sel.indices == list(range(6)) and sel.ids == IDS and sel.stage == 2


@pytest.mark.parametrize(("merge", "expected"), [("rrf", [1, 3, 0]), ("max", [3, 1, 0])])
def test_influence_selector(merge: str, expected: list[int]) -> None:
    ids = ["a", "b", "c", "d", "e"]
    ctx = SelectionContext(ids, scores=SETS, eligible=ALL, seed=0, stage=4)
    sel = InfluenceSelector(merge).select(ctx, 3)
    assert sel.indices == expected and sel.ids == [ids[i] for i in expected]
    assert sel.method == f"influence_{merge}" and sel.stage == 4
    assert InfluenceSelector(merge).select(ctx, 3) == sel


def test_selectors_name_missing_fields() -> None:
    bare = SelectionContext(IDS)
    with pytest.raises(ValueError, match="needs SelectionContext.scores"):
        InfluenceSelector().select(bare, 2)
    scored = SelectionContext(IDS, scores={"a": torch.zeros(6)})
    with pytest.raises(ValueError, match="needs SelectionContext.eligible"):
        InfluenceSelector("max").select(scored, 2)
    with pytest.raises(ValueError, match="needs SelectionContext.pass_rate"):
        PassRateSelector().select(bare, 2)
    with pytest.raises(ValueError, match="needs SelectionContext.pass_rate"):
        LearnabilitySelector().select(bare, 2)
    with pytest.raises(ValueError, match="merge"):
        InfluenceSelector("sum")  # type: ignore[arg-type]


def test_context_validation() -> None:
    with pytest.raises(ValueError, match="pass_rate has shape"):
        SelectionContext(IDS, pass_rate=torch.zeros(5))
    with pytest.raises(ValueError, match=r"scores\['t'\] has shape"):
        SelectionContext(IDS, scores={"t": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"pass_rate\[2\] = 1.5"):
        SelectionContext(IDS, pass_rate=torch.tensor([0, 0, 1.5, 0, 0, 0]))
    with pytest.raises(ValueError, match="eligible must be bool"):
        SelectionContext(IDS, eligible=torch.ones(6))


def test_selection_save_load_round_trip(tmp_path) -> None:
    sel = Selection(ids=["b", "a"], indices=[1, 0], scores=[0.5, 0.25], method="x", stage=3)
    path = tmp_path / "stage3" / "selection.json"
    sel.save(path)
    assert Selection.load(path) == sel
    assert Selection.from_json(sel.to_json()) == sel
    assert [p.name for p in path.parent.iterdir()] == ["selection.json"]
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        Selection.load(tmp_path / "nothing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ids": [], "indices": []}))
    with pytest.raises(
        ValueError, match=r"bad.json.*lacks key\(s\) \['scores', 'method', 'stage'\]"
    ):
        Selection.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Selection.load(bad)
    with pytest.raises(ValueError, match="differ in length"):
        Selection(ids=["a"], indices=[0, 1], scores=[0.0], method="x", stage=0)


def test_selection_size() -> None:
    assert selection_size(100, 0.1) == 10
    assert selection_size(5, 0.1) == 1
    assert selection_size(15, 0.1) == 2  # 1.5 rounds up
    assert selection_size(3, 1.0) == 3
    with pytest.raises(ValueError, match="ratio"):
        selection_size(10, 0.0)
    with pytest.raises(ValueError, match="pool_size"):
        selection_size(0, 0.1)
