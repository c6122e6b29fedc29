"""benchmarks/ab_commit.py and benchmarks/ddp_step.py: short runs that print their tables."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))


def _has_history() -> bool:
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS, capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _has_history(), reason="needs the git history of the checkout")
def test_ab_commit_imports_an_earlier_fxsparse_beside_the_current_one(benchmarks, tmp_path, monkeypatch, capsys):
    ab_commit = importlib.import_module("ab_commit")
    earlier = ab_commit.import_at("HEAD", tmp_path)
    import fxsparse

    assert earlier.__name__.startswith("fxsparse_at_") and earlier is not fxsparse
    assert Path(earlier.__file__).is_relative_to(tmp_path)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    sparse = earlier.sparsify(net, density=0.5)
    assert isinstance(sparse, earlier.SparseGraphModule) and not isinstance(sparse, fxsparse.SparseGraphModule)
    assert "0.weight" in sparse.masks and hasattr(sparse, "fxsparse_masker")  # buffer names unchanged
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    ab_commit.main(["HEAD", "--models", "wrn22_2", "--rounds", "2", "--batch", "2", "--no-compile",
                    "--max-other-load", "100"])
    table = capsys.readouterr().out
    assert "| wrn22_2 | eager |" in table and table.count("[") >= 3


def test_ddp_step_prints_one_process_and_two_process_ratios(benchmarks, monkeypatch, capsys):
    ddp_step = importlib.import_module("ddp_step")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    ddp_step.main(["--models", "wrn22_2", "--rounds", "2", "--batch", "4", "--no-broadcast-buffers"])
    out = capsys.readouterr().out
    assert "broadcast_buffers=False" in out
    row = next(line for line in out.splitlines() if line.startswith("| wrn22_2 |"))
    assert row.count("[") == 2
