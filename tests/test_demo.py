"""The main job runs end to end: on synthetic Fashion-MNIST files, and on the real ones if present."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fxsparse.data import write_idx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import demo  # noqa: E402

REAL = Path("/usr/share/datasets/fashion-mnist")


def _fake_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 64) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        # a learnable signal: the label's brightness in one row of the image
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), labels * 2, :] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_demo_runs_every_method_and_writes_its_record(tmp_path):
    _fake_fashion_mnist(tmp_path)
    out = tmp_path / "result.json"
    results = demo.main(["--data-root", str(tmp_path), "--epochs", "2", "--batch-size", "32",
                         "--delta-t", "2", "--out", str(out)])
    assert [r.method for r in results] == ["dense", "static", "rigl"]
    record = json.loads(out.read_text())
    assert record["config"]["density"] == 0.1
    for r in results:
        assert 0.0 <= r.test_accuracy <= 1.0 and r.steps == 16
        assert r.density == pytest.approx(1.0 if r.method == "dense" else 0.1, abs=1e-3)


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_demo_learns_on_real_fashion_mnist():
    results = demo.main(["--epochs", "1", "--limit-train", "3000", "--methods", "rigl", "--delta-t", "5"])
    assert results[0].test_accuracy > 0.6  # chance is 0.1
