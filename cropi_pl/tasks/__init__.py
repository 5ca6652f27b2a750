"""Prompt sources: embedded step-by-step and one-shot arithmetic tasks, word problems and prompt
files (GSM8K/MATH style)."""

from cropi_pl.tasks.arithmetic import FAMILIES, SyntheticTasks, generate_tasks
from cropi_pl.tasks.generated import GeneratedTasks, generate_problems
from cropi_pl.tasks.loading import PromptFile
from cropi_pl.tasks.source import REQUIRED_COLUMNS, PromptSource, load_source
from cropi_pl.tasks.stepwise import STEPWISE_FAMILIES, StepwiseTasks
from cropi_pl.tasks.words import WORD_FAMILIES, WordProblems, generate_word_problems

__all__ = [
    "FAMILIES",
    "REQUIRED_COLUMNS",
    "STEPWISE_FAMILIES",
    "GeneratedTasks",
    "PromptFile",
    "PromptSource",
    "StepwiseTasks",
    "SyntheticTasks",
    "WORD_FAMILIES",
    "WordProblems",
    "generate_problems",
    "generate_tasks",
    "generate_word_problems",
    "load_source",
]
