"""The main job runs end to end: on synthetic Fashion-MNIST files, and on the real ones if present."""

from __future__ import annotations

import json
import math
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
    assert record["results"][0]["structure"] == {}  # dense: nothing masked
    assert set(record["results"][2]["structure"]) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    _check_topology_fields(record, delta_t=2, end_fraction=0.75)


def _check_topology_fields(record: dict, delta_t: int, end_fraction: float) -> None:
    """What the pictures need, recorded per sparse run: per layer the final shape and active count
    (they add up to the run's density), and the scheduler's history, one entry per update step."""
    from fxsparse.schedules import end_step, is_update_step

    for result in record["results"]:
        layers = result["structure"]
        if result["method"] == "dense":
            assert layers == {} and result["history"] == []
            continue
        active = sum(c["active"] for c in layers.values())
        total = sum(math.prod(c["shape"]) for c in layers.values())
        assert active / total == pytest.approx(result["density"], abs=1e-12)
        steps = result["steps"]
        updates = [t for t in range(1, steps + 1) if is_update_step(t, delta_t, end_step(steps, end_fraction))]
        history = result["history"]
        if result["method"] == "static":
            assert history == []  # a static mask never changes
            continue
        assert [h["step"] for h in history] == updates and updates
        assert all(set(h["layers"]) == set(layers) for h in history)
        # counts move only at updates, so the last update's are the final masks' counts
        assert {fqn: c["active"] for fqn, c in history[-1]["layers"].items()} == {fqn: c["active"] for fqn, c in layers.items()}
        assert json.loads(json.dumps(history)) == history  # plain numbers


def test_demo_draws_each_sparse_runs_figures_when_asked(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_fashion_mnist(tmp_path, n_train=128, n_test=32)
    figures, out = tmp_path / "figures", tmp_path / "record.json"
    results = demo.main(["--data-root", str(tmp_path), "--epochs", "1", "--batch-size", "16", "--delta-t", "2",
                         "--methods", "dense,static,rigl", "--out", str(out), "--figures", str(figures)])
    _check_topology_fields(json.loads(out.read_text()), delta_t=2, end_fraction=0.75)
    expected = {"demo_static_density_bars.png", "demo_static_masks.png",  # static never updates: no churn
                "demo_rigl_density_bars.png", "demo_rigl_churn.png", "demo_rigl_masks.png",
                "demo_methods_density.png", "demo_methods_churn.png"}  # the methods compared (recipes/report.py)
    assert {p.name for p in figures.iterdir()} == expected
    assert all((figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (figures / name).stat().st_size > 1000
               for name in expected)
    assert results[0].figures == [] and {Path(f).name for r in results for f in r.figures} == expected - {
        "demo_methods_density.png", "demo_methods_churn.png"}


def test_demo_without_matplotlib_notes_it_and_still_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    _fake_fashion_mnist(tmp_path, n_train=64, n_test=16)
    out = tmp_path / "record.json"
    demo.main(["--data-root", str(tmp_path), "--epochs", "1", "--batch-size", "16", "--delta-t", "1",
               "--methods", "rigl", "--out", str(out), "--figures", str(tmp_path / "figures")])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no figures written" in notes[0] and 'pip install "fxsparse[plot]"' in notes[0]
    assert not (tmp_path / "figures").exists()
    record = json.loads(out.read_text())
    assert record["config"]["figures"] is None and record["results"][0]["history"]  # the core path is unchanged


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_demo_learns_on_real_fashion_mnist():
    results = demo.main(["--epochs", "1", "--limit-train", "3000", "--methods", "rigl", "--delta-t", "5"])
    assert results[0].test_accuracy > 0.6  # chance is 0.1


def test_demo_runs_under_torchrun_with_two_processes(tmp_path):
    import os
    import subprocess

    _fake_fashion_mnist(tmp_path)
    out = tmp_path / "ddp.json"
    demo_py = Path(__file__).resolve().parents[1] / "recipes" / "demo.py"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(demo_py),
        "--data-root", str(tmp_path), "--epochs", "2", "--batch-size", "32", "--delta-t", "2",
        "--threads", "1", "--methods", "rigl,snfs,pruning", "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("total wall time") == 1  # one report, from rank 0
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["results"]] == ["rigl", "snfs", "pruning"]
    for r in record["results"]:
        assert r["density"] == pytest.approx(0.1, abs=2e-3)


def test_structure_counts_empty_outputs_and_unread_inputs():
    import torch

    import fxsparse
    from fxsparse.models import small_cnn

    sparse = fxsparse.sparsify(small_cnn(num_classes=10, width=8), density=0.5, init="uniform", seed=0)
    masks = sparse.masks
    with torch.no_grad():
        masks["conv2.weight"].fill_(True)
        masks["conv2.weight"][3].fill_(False)  # output filter 3: nothing active
        masks["conv2.weight"][:, 5].fill_(False)  # input channel 5: read by nothing
        masks["fc1.weight"].fill_(True)
    found = demo.structure(sparse)
    active = 16 * 8 * 9 - 8 * 9 - 15 * 9  # less filter 3, less channel 5 of the other filters
    assert found["conv2.weight"] == {"shape": [16, 8, 3, 3], "active": active,
                                     "outputs": 16, "inputs": 8, "empty_outputs": 1, "unread_inputs": 1}
    assert found["fc1.weight"]["empty_outputs"] == 0 and found["fc1.weight"]["unread_inputs"] == 0
    assert list(found) == list(masks)  # every masked weight, in graph order
    for name, mask in masks.items():  # the active counts and shapes the density figures draw
        assert found[name]["active"] == int(mask.sum()) and found[name]["shape"] == list(mask.shape)
