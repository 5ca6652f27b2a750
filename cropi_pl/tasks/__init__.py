"""Prompt sources: embedded synthetic arithmetic tasks and prompt files (GSM8K/MATH style)."""

from cropi_pl.tasks.arithmetic import FAMILIES, SyntheticTasks, generate_tasks
from cropi_pl.tasks.loading import PromptFile
from cropi_pl.tasks.source import REQUIRED_COLUMNS, PromptSource, load_source

__all__ = [
    "FAMILIES",
    "REQUIRED_COLUMNS",
    "PromptFile",
    "PromptSource",
    "SyntheticTasks",
    "generate_tasks",
    "load_source",
]
