"""scripts/gpu_check.sh and benchmarks/gpu_step.py on a machine without a GPU: the script says so
and exits 0 having run nothing; the benchmark's code path runs on the CPU with tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "CUDA_VISIBLE_DEVICES": ""}  # any GPU hidden
    return subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_a_gpu_the_check_says_so_and_runs_nothing(tmp_path):
    done = _run(tmp_path, sys.executable)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "no CUDA GPU on this machine" in report and "nothing was run" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no test log, no benchmark records


def test_an_interpreter_without_torch_is_an_error_that_names_the_fix(tmp_path):
    done = _run(tmp_path, "/bin/false")
    assert done.returncode == 2
    assert "PYTHON=" in done.stderr


def test_the_gpu_benchmark_runs_its_code_path_on_the_cpu(tmp_path):
    pytest.importorskip("transformers")
    out, records = tmp_path / "gpu.md", tmp_path / "gpu.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_step.py"), "--device", "cpu", "--tiny",
                           "--models", "gpt2", "--steps", "2", "--warmup", "1", "--out", str(out), "--json", str(records)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| gpt2 | 2 x 16 tokens |" in text
    assert "| gpt2 | masked / dense step |" in text and "| gpt2 | update, amortized % of a step |" in text
    assert records.read_text().count("\n") == 1
