"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Any

import torch


def machine_info(threads: int, *packages: str) -> dict[str, Any]:
    """Platform, CPU, load and the versions of torch and ``packages`` (imported by name)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        **{name: importlib.import_module(name).__version__ for name in packages},
    }
