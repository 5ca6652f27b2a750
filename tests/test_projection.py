"""Sparse random projection: equality with the explicit matrix, streaming, seeding, JL, storage."""

from __future__ import annotations

import math

import pytest
import torch

from cropi_pl.influence import projection as projection_module
from cropi_pl.influence.projection import (
    ProjectionConfig,
    SparseProjector,
    load_projected,
    save_projected,
)
from cropi_pl.seeding import derive_seed

NUM_PARAMS = 1000
SMALL = {"dim": 16, "block_size": 96, "chunk_rows": 7}  # 11 blocks (last partial), many chunks
KEEP = [
    {"kept_fraction": 1.0},
    {"kept_fraction": 0.3},
    {"kept_fraction": None, "kept_count": 123},
]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _kept_rows(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix != 0).any(dim=1)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "countsketch"])
@pytest.mark.parametrize("keep", KEEP, ids=["full", "fraction0.3", "count123"])
def test_project_equals_explicit_matrix(kind: str, keep: dict) -> None:
    projector = SparseProjector(NUM_PARAMS, ProjectionConfig(kind=kind, seed=3, **SMALL, **keep))
    grads = torch.randn(5, NUM_PARAMS)
    expected = grads.double() @ projector.explicit_matrix().double()
    out = projector.project(grads)
    assert out.dtype == torch.float32 and out.shape == (5, 16)
    assert _rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("keep", KEEP, ids=["full", "fraction0.3", "count123"])
def test_explicit_matrix_structure(keep: dict) -> None:
    """Kept counts are exact per block and in total; entries have the promised distribution."""
    cfg = ProjectionConfig(kind="rademacher", seed=1, **SMALL, **keep)
    projector = SparseProjector(NUM_PARAMS, cfg)
    kept = _kept_rows(projector.explicit_matrix())
    fraction = keep["kept_fraction"] or keep["kept_count"] / NUM_PARAMS
    assert kept.sum().item() == projector.num_kept == round(fraction * NUM_PARAMS)
    for start in range(0, NUM_PARAMS, cfg.block_size):
        length = min(cfg.block_size, NUM_PARAMS - start)
        assert abs(kept[start : start + length].sum().item() - fraction * length) <= 1
    values = projector.explicit_matrix()[kept]
    assert torch.all(values.abs() == 1 / math.sqrt(cfg.dim))


def test_countsketch_has_one_signed_bucket_per_kept_coordinate() -> None:
    """Sign-and-bucket: every kept row of the matrix is one +-1 in a uniform bucket."""
    cfg = ProjectionConfig(kind="countsketch", dim=8, kept_fraction=0.5, seed=2, block_size=500)
    matrix = SparseProjector(4000, cfg).explicit_matrix()
    kept = matrix[_kept_rows(matrix)]
    assert kept.shape[0] == 2000
    assert torch.all((kept != 0).sum(dim=1) == 1) and torch.all(kept.abs().sum(dim=1) == 1)
    buckets = (kept != 0).float().sum(dim=0)  # 2000 draws over 8 buckets: 250 +- 19 each
    assert (buckets - 250).abs().max().item() < 6 * 19
    assert abs((kept.sum() / 2000).item()) < 6 / math.sqrt(2000)  # signs balanced


def test_gaussian_entries_have_variance_one_over_k() -> None:
    cfg = ProjectionConfig(dim=64, seed=5, block_size=300, chunk_rows=50, kind="gaussian")
    values = SparseProjector(2000, cfg).explicit_matrix() * math.sqrt(cfg.dim)
    # 128k standard-normal draws: mean and variance within ~6 standard errors.
    assert abs(values.mean().item()) < 0.02
    assert abs(values.var().item() - 1) < 0.03


def test_subsampling_is_uniform_per_coordinate() -> None:
    """Stratified by block, yet every coordinate is kept with probability ``kept_fraction``."""
    seeds, fraction = 300, 0.3
    hits = torch.zeros(200)
    for seed in range(seeds):
        cfg = ProjectionConfig(dim=1, kept_fraction=fraction, seed=seed, block_size=50)
        hits += _kept_rows(SparseProjector(200, cfg).explicit_matrix()).float()
    frequency = hits / seeds
    sigma = math.sqrt(fraction * (1 - fraction) / seeds)
    assert (frequency - fraction).abs().max().item() < 5 * sigma
    assert hits.sum().item() == seeds * 60


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
@pytest.mark.parametrize("keep", KEEP, ids=["full", "fraction0.3", "count123"])
def test_streaming_pieces_equal_project(kind: str, keep: dict) -> None:
    cfg = ProjectionConfig(kind=kind, seed=7, **SMALL, **keep)
    projector = SparseProjector(NUM_PARAMS, cfg)
    grads = torch.randn(3, NUM_PARAMS)
    cuts = sorted(torch.randperm(NUM_PARAMS - 1)[:40].add(1).tolist())
    bounds = list(zip([0, *cuts], [*cuts, NUM_PARAMS], strict=True))
    assert any(a // 96 != (b - 1) // 96 for a, b in bounds), "some piece must straddle blocks"
    state = projector.begin(3)
    for i in torch.randperm(len(bounds)).tolist():  # arrival order does not matter
        a, b = bounds[i]
        projector.add(state, a, grads[:, a:b])
    assert _rel_err(projector.finish(state), projector.project(grads)) < 1e-6


def test_streaming_rejects_bad_pieces() -> None:
    projector = SparseProjector(NUM_PARAMS, ProjectionConfig(**SMALL))
    grads = torch.randn(2, NUM_PARAMS)
    state = projector.begin(2)
    projector.add(state, 0, grads[:, :50])
    with pytest.raises(ValueError, match=r"\[40, 60\) overlap"):
        projector.add(state, 40, grads[:, 40:60])
    with pytest.raises(ValueError, match="outside"):
        projector.add(state, 990, grads[:, :20])
    with pytest.raises(ValueError, match="shape"):
        projector.add(state, 50, grads[:1, 50:60])
    with pytest.raises(TypeError, match="floating"):
        projector.add(state, 50, grads[:, 50:60].long())
    projector.add(state, 50, grads[:, 50:990])
    projector.add(state, 990, grads[:, 990:992])
    with pytest.raises(ValueError, match=r"only 32 of the 40 coordinates in \[960, 1000\)"):
        projector.finish(state)
    with pytest.raises(ValueError, match="shape"):
        projector.project(grads[:, :-1])


def test_same_seed_identical_different_seed_differs() -> None:
    grads = torch.randn(4, NUM_PARAMS)

    def run(**overrides: object) -> torch.Tensor:
        cfg = ProjectionConfig(**{**SMALL, "kept_fraction": 0.5, "seed": 11, **overrides})
        return SparseProjector(NUM_PARAMS, cfg).project(grads)

    assert torch.equal(run(), run())
    assert not torch.allclose(run(), run(seed=12))
    assert not torch.allclose(run(), run(kind="rademacher"))
    assert torch.equal(run(kind="countsketch"), run(kind="countsketch"))
    assert not torch.allclose(run(kind="countsketch"), run(kind="countsketch", seed=12))


def test_seed_derivation_is_pure() -> None:
    """Seeds come from sha256, so they are fixed constants, unlike Python's salted ``hash``."""
    seed = derive_seed("jl", "gaussian", 0, 0, 0)
    assert seed == derive_seed("jl", "gaussian", 0, 0, 0) == 3172509730913253450
    assert 0 <= seed < 2**63
    assert seed != derive_seed("jl", "gaussian", 0, 0, 1)


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_johnson_lindenstrauss_preserves_geometry(kind: str) -> None:
    k, d = 2048, 5000
    vectors = torch.randn(20, d, dtype=torch.float64)
    cfg = ProjectionConfig(dim=k, seed=2, kind=kind)
    projected = SparseProjector(d, cfg).project(vectors).double()
    norm_err = (projected.norm(dim=1) / vectors.norm(dim=1) - 1).abs()
    assert norm_err.max().item() < 0.15
    # Inner products move by about |a||b|/sqrt(k) ~ 0.022 |a||b|.
    norms = vectors.norm(dim=1)
    gram_err = (projected @ projected.T - vectors @ vectors.T) / torch.outer(norms, norms)
    assert gram_err.abs().max().item() < 0.15


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_input_accumulates_in_fp32(dtype: torch.dtype) -> None:
    d = 50_000
    projector = SparseProjector(d, ProjectionConfig(dim=64, seed=4, block_size=8192))
    grads = torch.randn(3, d).to(dtype)
    expected = grads.double() @ projector.explicit_matrix().double()
    out = projector.project(grads)
    assert out.dtype == torch.float32
    assert _rel_err(out, expected) < 1e-5


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ProjectionConfig(kept_count=5)
    with pytest.raises(ValueError, match="exactly one"):
        ProjectionConfig(kept_fraction=None)
    with pytest.raises(ValueError, match="kept_fraction"):
        ProjectionConfig(kept_fraction=1.5)
    with pytest.raises(ValueError, match="kind"):
        ProjectionConfig(kind="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kept_count=50 exceeds num_params=10"):
        SparseProjector(10, ProjectionConfig(kept_fraction=None, kept_count=50))


def test_save_load_round_trip(tmp_path) -> None:
    path = tmp_path / "stage0" / "pool.safetensors"
    vectors = torch.randn(3, 8, dtype=torch.float64)
    meta = {"stage": 0, "config": {"dim": 8, "seed": 1}}
    save_projected(path, ["a", "b", "c"], vectors, meta)
    ids, loaded, loaded_meta = load_projected(path)
    assert ids == ["a", "b", "c"] and loaded_meta == meta
    assert loaded.dtype == torch.float32 and torch.equal(loaded, vectors.float())
    save_projected(path, ["x"], vectors[:1], {})  # overwrite in place
    assert load_projected(path)[0] == ["x"]
    assert [p.name for p in path.parent.iterdir()] == ["pool.safetensors"]


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "pool.safetensors"
    save_projected(path, ["a"], torch.ones(1, 4), {"v": 1})

    def crash(tensors: dict, filename: str, metadata: dict) -> None:
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(projection_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_projected(path, ["b"], torch.zeros(1, 4), {"v": 2})
    assert load_projected(path)[2] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["pool.safetensors"]


def test_storage_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_projected(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_projected(corrupt)
    with pytest.raises(ValueError, match="2 ids"):
        save_projected(tmp_path / "x.safetensors", ["a", "b"], torch.zeros(3, 4), {})
    with pytest.raises(ValueError, match="duplicate"):
        save_projected(tmp_path / "x.safetensors", ["a", "a"], torch.zeros(2, 4), {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    """The random chunks are drawn on CPU, so a GPU projection reproduces the CPU one."""
    projector = SparseProjector(NUM_PARAMS, ProjectionConfig(kept_fraction=0.3, **SMALL))
    grads = torch.randn(3, NUM_PARAMS)
    on_gpu = projector.project(grads.cuda().half())
    assert on_gpu.device.type == "cuda"
    assert _rel_err(on_gpu.cpu(), projector.project(grads.half())) < 1e-5
