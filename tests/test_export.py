"""save_hf_folder / full_state_dict on unsharded models (the FSDP2 gather is tested in
test_distributed.py, the end-of-fit export and the tool in test_cli.py)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.policy.export import full_state_dict, save_hf_folder
from cropi_pl.policy.tokenizer import build_tokenizer
from tests.models import tiny_llama


@pytest.mark.parametrize("tied", [True, False])
def test_folder_reloads_with_equal_logits_and_stores_a_tie_once(tmp_path, tied):
    tokenizer = build_tokenizer()
    model = tiny_llama(3, len(tokenizer), tie_word_embeddings=tied)
    state = full_state_dict(model)
    assert (state["lm_head.weight"] is state["model.embed_tokens.weight"]) == tied
    out = save_hf_folder(model, tokenizer, tmp_path / "hf", state)
    with safe_open(str(out / "model.safetensors"), framework="pt") as saved:
        assert ("lm_head.weight" in saved.keys()) != tied
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    text = "Q: 31*4=?\nA: "
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_export_replaces_an_older_folder_whole(tmp_path):
    tokenizer = build_tokenizer()
    out = tmp_path / "hf"
    save_hf_folder(tiny_llama(1, len(tokenizer)), tokenizer, out)
    (out / "stale.txt").write_text("from an older export")
    newer = tiny_llama(2, len(tokenizer))
    save_hf_folder(newer, tokenizer, out)
    assert not (out / "stale.txt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in newer.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
