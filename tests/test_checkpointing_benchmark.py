"""benchmarks/activation_checkpointing.py: a smoke run reports both variants with the same loss,
and checkpointing keeps fewer activations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts import ROOT

pytest.importorskip("transformers")


def test_a_short_run_reports_both_variants(tmp_path):
    records = tmp_path / "ckpt.jsonl"
    done = subprocess.run(
        [sys.executable, "benchmarks/activation_checkpointing.py", "--layers", "2", "--width", "64", "--seq", "64",
         "--threads", "1", "--json", str(records)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "checkpointed / plain" in done.stdout and "same loss: True" in done.stdout
    result = json.loads(records.read_text().splitlines()[0])
    assert result["checkpointed"]["kept_mb"] < result["plain"]["kept_mb"]
    assert result["checkpointed"]["step_peak_mb"] >= 0 and result["plain"]["step_peak_mb"] > 0
