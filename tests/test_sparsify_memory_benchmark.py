"""benchmarks/sparsify_memory.py: a smoke run reports both variants, each a child process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts import ROOT

pytest.importorskip("transformers")


def test_a_short_run_reports_copy_and_in_place(tmp_path):
    records = tmp_path / "memory.jsonl"
    done = subprocess.run(
        [sys.executable, "benchmarks/sparsify_memory.py", "--layers", "1", "--width", "64", "--intermediate", "128",
         "--vocab", "500", "--threads", "1", "--json", str(records)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| copy |" in done.stdout and "| inplace |" in done.stdout
    result = json.loads(records.read_text().splitlines()[0])
    for variant in ("copy", "inplace"):
        assert result[variant]["peak_extra_mb"] > 0 and result[variant]["params"] == result["copy"]["params"]
