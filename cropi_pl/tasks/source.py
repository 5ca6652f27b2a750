"""The prompt-source interface: anything that yields a validated table of prompts."""

from __future__ import annotations

from abc import ABC, abstractmethod

import datasets

REQUIRED_COLUMNS = ("id", "prompt", "answer", "family", "difficulty")


class PromptSource(ABC):
    """A configurable producer of a prompt table (YAML ``class_path`` targets subclass this)."""

    @abstractmethod
    def load(self) -> datasets.Dataset:
        """Rows with at least :data:`REQUIRED_COLUMNS`."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the loaded rows would change (used by caches)."""
