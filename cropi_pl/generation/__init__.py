"""Generation engines: one interface, a Hugging Face ``generate`` engine and a vLLM engine."""

from cropi_pl.generation.engine import Completion, GenerationEngine
from cropi_pl.generation.hf import HFGenerateEngine
from cropi_pl.generation.vllm import VLLMEngine

__all__ = ["Completion", "GenerationEngine", "HFGenerateEngine", "VLLMEngine"]
