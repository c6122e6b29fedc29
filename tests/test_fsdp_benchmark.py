"""benchmarks/fsdp.py and examples/fsdp_llama.py: short runs on 2 CPU processes print their tables
and results; FSDP holds each rank's half of the state."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch.distributed as dist

from scripts import ROOT

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def test_the_benchmark_prints_memory_per_rank_step_time_and_update_bytes():
    done = subprocess.run(
        [sys.executable, "benchmarks/fsdp.py", "--layers", "2", "--width", "64", "--rounds", "2", "--batch", "4", "--length", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in done.stdout.splitlines() if line.startswith("| DDP") or line.startswith("| FSDP")}
    assert set(rows) == {"DDP dense", "DDP fxsparse", "FSDP dense", "FSDP fxsparse"}
    total = {name: float(columns[4]) for name, columns in rows.items()}
    assert total["FSDP fxsparse"] < 0.6 * total["DDP fxsparse"]  # each rank holds half the weights, grads, state, masks
    assert float(rows["FSDP fxsparse"][3]) > 0 and float(rows["FSDP dense"][3]) == 0  # masks, sharded
    assert re.search(r"\d+ all_gathers, [\d,]+ bytes received", done.stdout)
    assert "| 64 |" in done.stdout


def test_the_example_trains_a_sharded_llama_and_reads_its_checkpoint_back(tmp_path):
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, "examples/fsdp_llama.py", "--spawn", "2", "--steps", "4", "--delta-t", "2", "--layers", "1",
         "--checkpoint", str(tmp_path / "ckpt")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "updates 1" in done.stdout and "written and read back" in done.stdout
    held = re.search(r"rank 0 holds ([\d,]+) of ([\d,]+) mask entries", done.stdout)
    assert held and int(held[1].replace(",", "")) * 2 == int(held[2].replace(",", ""))
