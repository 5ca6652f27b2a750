"""``cache_rows`` keeps the same cache rows, with the same gradients, as HF's own selection."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from cropi_pl.kv_cache import cache_rows
from tests.models import tiny_llama


def prompt_cache(seed: int) -> tuple[DynamicCache, torch.Tensor]:
    model = tiny_llama(seed, 11, layers=2)
    ids = torch.randint(1, 11, (3, 5), generator=torch.Generator().manual_seed(seed))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    return model(inputs_embeds=embeds, use_cache=True).past_key_values, embeds


def test_cache_rows_match_batch_select_indices_and_its_gradient() -> None:
    index = torch.tensor([0, 0, 2, 1, 2, 2])
    cache, got_in = prompt_cache(0)
    before = [layer.keys.clone() for layer in cache.layers]
    got = cache_rows(cache, index)
    ref, ref_in = prompt_cache(0)
    ref.batch_select_indices(index)
    for layer, keys in zip(cache.layers, before, strict=True):  # the source is left as it was
        assert torch.equal(layer.keys, keys)
    weights = torch.randn(ref.layers[0].keys.shape, generator=torch.Generator().manual_seed(1))
    assert len(got.layers) == len(ref.layers) == 2
    for a, b in zip(got.layers, ref.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    def loss(cache: DynamicCache) -> torch.Tensor:
        return sum((weights * (layer.keys + 2 * layer.values)).sum() for layer in cache.layers)

    (g_got,) = torch.autograd.grad(loss(got), got_in)
    (g_ref,) = torch.autograd.grad(loss(ref), ref_in)
    assert g_ref.abs().sum() > 0
    torch.testing.assert_close(g_got, g_ref)


def test_cache_rows_refuse_other_caches() -> None:
    with pytest.raises(TypeError, match="expected a transformers DynamicCache, got tuple"):
        cache_rows((torch.zeros(1),), torch.tensor([0]))
