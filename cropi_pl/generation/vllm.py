"""vLLM engine: fast sampling on CUDA, same interface as the HF engine."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from cropi_pl.generation.engine import Completion, GenerationEngine


class VLLMEngine(GenerationEngine):
    """Samples with a colocated vLLM ``LLM`` whose weights are synced from the policy before use.

    Requires CUDA and the ``gpu`` extra (``pip install cropi_pl[gpu]``); construction fails with a
    clear message otherwise, so a CPU config that names it stops before any work is done.
    """

    def __init__(
        self,
        model_path: str,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
        enforce_eager: bool = True,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "VLLMEngine needs vLLM: install the GPU extra with `pip install cropi_pl[gpu]`, "
                "or use cropi_pl.generation.HFGenerateEngine"
            )
        if not torch.cuda.is_available():
            raise RuntimeError(
                "VLLMEngine needs a CUDA GPU; on CPU use cropi_pl.generation.HFGenerateEngine"
            )
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enforce_eager=enforce_eager,
        )
        self._synced_version: int | None = None

    def sync_weights(self, model: nn.Module) -> None:
        """Copy the policy's current weights into the vLLM worker (full tensors, gathered)."""
        state = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in model.state_dict().items()
        }
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(state.items())

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

        self.sync_weights(model)
        rows = [p for p in prompts for _ in range(num_samples)]
        params = [
            SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=None if seeds is None else seeds[i] % (2**31),
                stop_token_ids=[eos_token_id],
            )
            for i in range(len(rows))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params)
        completions = []
        for o in outputs:
            ids = list(o.outputs[0].token_ids)
            completions.append(Completion(ids, truncated=o.outputs[0].finish_reason == "length"))
        return completions
