"""recipes/prune_lm.py: the smoke mode trains every kind of run, writes one record each, resumes,
and the report's table and verdicts say what the records hold."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))


def test_smoke_mode_writes_every_record_resumes_and_reports(tmp_path, capsys):
    pytest.importorskip("transformers")
    import prune_lm

    out, runs = tmp_path / "out", tmp_path / "runs"
    common = ["--smoke", "--seeds", "0", "--densities", "0.2", "--out-dir", str(out), "--runs-dir", str(runs)]
    prune_lm.main([*common, "--workers", "0"])
    names = {p.stem for p in out.glob("*.json")}
    assert names == {"dense-seed0", "dense-ft-seed0", "pruned-magnitude-d0.2-seed0", "pruned-wanda-d0.2-seed0",
                     "magnitude-d0.2-static-seed0", "magnitude-d0.2-rigl-seed0",
                     "wanda-d0.2-static-seed0", "wanda-d0.2-rigl-seed0"}
    records = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    for name, record in records.items():
        bits = record["results"][0]["test_bits"] if record["kind"] == "dense" else record["test_bits"]
        assert 0 < bits < 8, name  # a few dozen characters: under log2(vocabulary) and then some
    for score in ("magnitude", "wanda"):
        pruned = records[f"pruned-{score}-d0.2-seed0"]
        assert pruned["sparse_density"] == pytest.approx(0.2, abs=1e-3)
        assert (pruned["overlap_with_magnitude"] == 1.0) == (score == "magnitude")
        assert records[f"{score}-d0.2-static-seed0"]["mask_changed"] == 0  # static keeps the one-shot topology
        assert records[f"{score}-d0.2-rigl-seed0"]["mask_changed"] > 0  # RigL moved some of it
    assert records["wanda-d0.2-rigl-seed0"]["calibration_batches"] == 2
    assert records["dense-seed0"]["config"]["steps_per_epoch"] * 4 == 8

    prune_lm.main([*common, "--report"])
    page = (out / "pruning.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| wanda | 0.2 | 80% |"))
    assert row.count("+- 0.0000") == 3 and row.endswith("| 1 |")  # after pruning, static, RigL; one seed
    assert "| dense, fine-tuned alike |" in page and "python recipes/prune_lm.py --workers 2 --smoke" in page
    assert "- density 0.2, magnitude: RigL" in page and "- density 0.2, right after pruning: Wanda" in page

    if importlib.util.find_spec("matplotlib") is not None:  # the masks, drawn from the dense weights
        prune_lm.main([*common, "--report", "--figures", str(tmp_path / "img")])
        page = (out / "pruning.md").read_text()
        for score in ("magnitude", "wanda"):
            assert (tmp_path / "img" / f"pruning_masks_{score}.png").stat().st_size > 1000
            assert f"![{score} masks](../img/pruning_masks_{score}.png)" in page

    prune_lm.main([*common, "--workers", "0"])  # everything is there: nothing is trained again
    assert "0 jobs to run" in capsys.readouterr().out
    (runs / "dense-seed0" / "checkpoint.pt").unlink()
    args = argparse.Namespace(out_dir=str(out), runs_dir=str(runs), seeds="0", scores="magnitude,wanda",
                              densities="0.2", methods="static,rigl", steps=8)
    assert prune_lm._todo(args, []) == []  # the dense weights are needed by no missing run
    (out / "wanda-d0.2-rigl-seed0.json").unlink()
    extra = ["--data-root", str(runs / "smoke_plays"), *prune_lm.SMOKE]
    assert prune_lm._todo(args, extra) == ["dense-seed0", "prune-wanda-d0.2-seed0"]  # retrained first


def _records(static: list[float], rigl: list[float]) -> list[dict]:
    out = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        base = {"seed": seed, "finetune_steps": 500, "finetune_lr": 1e-3}
        out.append({"kind": "dense", "seed": seed, "config": {"epochs": 4, "steps_per_epoch": 250, "batch_size": 32,
                    "context": 64, "delta_t": 50, "alpha": 0.3}, "results": [{"test_bits": 2.8 + noise}]})
        out.append({"kind": "dense-ft", **base, "test_bits": 2.7 + noise})
        for score, shift in (("magnitude", 0.0), ("wanda", -0.2)):
            common = {**base, "score": score, "density": 0.2, "overlap_with_magnitude": 1.0 if shift == 0 else 0.6,
                      "calibration_batches": 8}
            out.append({"kind": "pruned", **common, "test_bits": 4.0 + shift + noise})
            for method, bits in (("static", static[seed]), ("rigl", rigl[seed])):
                out.append({"kind": "finetuned", "method": method, **common, "test_bits": bits + shift,
                            "mask_changed": 0.0 if method == "static" else 0.1})
    return out


def test_the_verdicts_say_where_rigl_does_not_beat_static():
    import prune_lm

    worse = prune_lm.render(_records(static=[3.0, 3.01, 2.99], rigl=[3.1, 3.11, 3.09]), ["python recipes/prune_lm.py"])
    assert ("- density 0.2, magnitude: RigL worse than static by 0.1000 bits/char (per-seed difference +0.1000 +- "
            "0.0000, beyond one std; RigL lower in 0 of 3 seeds).") in worse
    assert "- density 0.2, right after pruning: Wanda better than magnitude by 0.2000 bits/char" in worse
    assert "| wanda | 0.2 | 80% | 3.8000 +- 0.0100 | 2.8000 +- 0.0100 | 2.9000 +- 0.0100 | 0.600 | 3 |" in worse
    assert "RigL replaced 10.0% of the one-shot topology" in worse
    close = prune_lm.render(_records(static=[3.0, 3.0, 3.0], rigl=[2.99, 3.01, 2.995]), [])
    assert "RigL better than static by 0.0017 bits/char (per-seed difference -0.0017 +- 0.0104, within one std; " \
           "RigL lower in 2 of 3 seeds)" in close
