"""benchmarks/timm_coverage.py's export weighing (``--capture export``): one model end to end and
the page. The sweeps themselves take hours and are not run here."""

from __future__ import annotations

from scripts import load_script

def _script():
    return load_script("benchmarks/timm_coverage.py")


def test_export_weighing_checks_one_model_and_compares_both_front_ends(tmp_path):
    script = _script()
    record = script.check_one("test_vit", 150e6, capture="export")
    assert record["status"] == "pass" and record["capture"] == "export", record
    weighing = record["weighing"]
    assert weighing["export_masked"] == weighing["symbolic_masked"] == record["masked_params"] > 0
    assert weighing["export_layers"] == weighing["symbolic_layers"] > 0
    for key in ("symbolic_sparsify_s", "export_sparsify_s", "symbolic_step_s", "export_step_s"):
        assert weighing[key] > 0
    fewer = {**record, "name": "other", "weighing": {**weighing, "export_masked": weighing["export_masked"] - 10}}
    big = {"name": "huge", "status": "too large", "reason": "2000 M parameters > cap 150 M"}
    text = script.write_weighing([record, fewer, big], str(tmp_path / "page.md"), 1371)
    assert (tmp_path / "page.md").read_text() == text
    assert "| pass | 2 |" in text and "| too large | 1 |" in text
    assert "more weight parameters than symbolic tracing on 0 of 2 models, fewer on 1, the same on 1" in text
    assert f"- other: symbolic tracing masks {weighing['symbolic_masked']:,}" in text
    assert "| test_vit | pass |" in text and "Above the parameter cap, not checked: huge." in text
