"""tools/fault_sweep.py: the in-process probes and the crash injector's arguments (the sweep
itself runs minutes of real training and is run by hand)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fault_sweep  # noqa: E402


def test_data_error_probes_pass_and_name_file_and_row(tmp_path):
    rows = fault_sweep.data_errors(tmp_path)
    assert len(rows) == 4
    assert all(r["ok"] for r in rows), rows


def test_crash_refuses_an_unknown_phase():
    with pytest.raises(ValueError, match="collection, selection or training"):
        fault_sweep.Crash("export", 1)
