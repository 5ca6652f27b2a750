"""Tiny CLI runs shared by every test module: each is fitted once per test session (once per
pytest-xdist worker that needs it; the real CLI in this process), and tests only read them."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist workers share the cores: split the threads between them before torch loads,
    # or one worker's spinning OpenMP threads stall the other's small ops (measured: 0.7 s
    # tests took 24 s with 2 workers of 2 threads on 2 cores).
    WORKERS = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))

import pytest

from tests.cli_utils import CROPI, fit_in_empty_cwd

PYTEST_VERSION = tuple(int(part) for part in pytest.__version__.split(".")[:2])


@pytest.fixture(scope="session")
def tiny_fit(tmp_path_factory):
    """``tests/configs/tiny_test.yaml`` fitted (4 steps) from an empty working directory:
    (run dir, cwd, checkout files the run changed)."""
    run_dir, cwd = tmp_path_factory.mktemp("tiny_fit"), tmp_path_factory.mktemp("tiny_cwd")
    return run_dir, cwd, fit_in_empty_cwd(run_dir, cwd)


@pytest.fixture(scope="session")
def cropi_fit(tmp_path_factory):
    """``tests/configs/cropi_test.yaml`` (3 curriculum stages of 2 steps) fitted from an empty
    working directory: (run dir, cwd, checkout files the run changed)."""
    run_dir, cwd = tmp_path_factory.mktemp("cropi_fit"), tmp_path_factory.mktemp("cropi_cwd")
    return run_dir, cwd, fit_in_empty_cwd(run_dir, cwd, config=CROPI)


def pytest_configure(config: pytest.Config) -> None:
    """Refuse ``--dist loadgroup`` where it cannot group: from pytest 9.2 pytest-xdist's group
    suffix no longer reaches the node ids (pytest-xdist issue 1386), so the grouped tests would
    silently repeat their shared work (the real GGUF conversion) on every worker."""
    if config.getoption("dist", None) == "loadgroup" and PYTEST_VERSION >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__}: pytest-xdist's --dist loadgroup does not group "
            "here (pytest-xdist issue 1386); install pytest<9.2 or pass -n 0"
        )
