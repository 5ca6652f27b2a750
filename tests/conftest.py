"""Tiny CLI runs shared by every test module: each is fitted once per test session (the real
CLI in this process), and tests only read them."""

from __future__ import annotations

import pytest

from tests.cli_utils import CROPI, fit_in_empty_cwd


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
