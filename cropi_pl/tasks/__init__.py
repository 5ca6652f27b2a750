"""Prompt sources: embedded synthetic arithmetic tasks and prompt files (GSM8K/MATH style)."""

from cropi_pl.tasks.arithmetic import FAMILIES, SyntheticTasks, generate_tasks
from cropi_pl.tasks.loading import PromptFile, load_source

__all__ = ["FAMILIES", "PromptFile", "SyntheticTasks", "generate_tasks", "load_source"]
