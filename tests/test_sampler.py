"""The training sampler: deterministic epochs, rank shards that union to the batch, resume."""

import random

import pytest

from cropi_pl.data.sampler import SubsetBatchStream


def _batches(stream: SubsetBatchStream) -> list[list[int]]:
    per = stream.global_batch_size // stream.num_replicas
    flat = list(stream)
    return [flat[i : i + per] for i in range(0, len(flat), per)]


def test_epoch_is_function_of_seed_and_epoch():
    subset = random.Random(1).sample(range(1000), 37)
    a = SubsetBatchStream(subset, 8, 10, seed=3)
    b = SubsetBatchStream(subset, 8, 10, seed=3)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert set(first) <= set(subset) and len(first) == 80


def test_every_subset_item_appears_before_any_repeats():
    subset = list(range(20))
    stream = SubsetBatchStream(subset, 4, 5, seed=0)
    assert sorted(stream) == subset


def test_rank_shards_union_to_global_batches():
    subset = list(range(50))
    single = SubsetBatchStream(subset, 8, 6, seed=7)
    ranks = [SubsetBatchStream(subset, 8, 6, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    merged = [b0 + b1 for b0, b1 in zip(*(_batches(r) for r in ranks), strict=True)]
    assert merged == _batches(single)
    assert len(ranks[0]) == 24


def test_resume_skips_consumed_batches_only_in_that_epoch():
    subset = list(range(30))
    full = SubsetBatchStream(subset, 5, 6, seed=2)
    full.set_epoch(1)
    expected = _batches(full)
    resumed = SubsetBatchStream(subset, 5, 6, seed=2)
    resumed.resume_from(epoch=1, batch=4)
    resumed.set_epoch(1)
    assert _batches(resumed) == expected[4:]
    resumed.set_epoch(2)
    assert len(list(resumed)) == 30  # the skip applies once


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        SubsetBatchStream([], 4, 1)
    with pytest.raises(ValueError, match="divide"):
        SubsetBatchStream([1, 2, 3], 5, 1, num_replicas=2)
