"""benchmarks/compact.py: a smoke run writes every table, with ratios from the same run."""

from __future__ import annotations

import json
import subprocess
import sys

from scripts import ROOT


def test_a_short_run_reports_step_time_and_memory(tmp_path):
    out, records = tmp_path / "compact.md", tmp_path / "compact.jsonl"
    done = subprocess.run(
        [sys.executable, "benchmarks/compact.py", "--models", "mlp", "--mlp-width", "256", "--densities", "0.1,0.05",
         "--rounds", "3", "--threads", "1", "--out", str(out), "--json", str(records)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = out.read_text()
    assert "## Step time" in report and "## Memory" in report
    rows = [line for line in report.splitlines() if line.startswith("| mlp |")]
    assert len(rows) == 4  # two densities, in both tables
    results = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(results) == 2
    for result in results:
        assert set(result["peak_mb"]) == {"dense", "masked", "compact"}  # every memory child reported
        assert len(result["ms"]["compact"]) == len(result["ms"]["dense"]) == 3
        assert result["state_bytes"]["compact"] <= result["state_bytes"]["masked"]
        assert result["compact_layers"].endswith("of 3")


def test_the_pointwise_mode_prints_what_the_timing_measured():
    done = subprocess.run(
        [sys.executable, "benchmarks/compact.py", "--pointwise", "--densities", "0.05", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line[:3].strip("| ").isdigit()]
    assert len(rows) == 4
    for row in rows:
        masked, compact, ratio, kept = float(row[3]), float(row[4]), float(row[5]), row[6].strip()
        assert masked > 0 and compact > 0 and abs(ratio - compact / masked) < 0.01
        if abs(compact / masked - 0.95) > 0.01:  # the printed times are rounded: no verdict at the edge
            assert kept == ("compact" if compact <= 0.95 * masked else "masked")
