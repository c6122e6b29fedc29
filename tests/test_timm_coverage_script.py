"""benchmarks/timm_coverage.py's export weighing (``--capture export``): one model end to end and
the page. The sweeps themselves take hours and are not run here."""

from __future__ import annotations

import torch
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


def test_drop_path_sweep_checks_both_modes_and_writes_its_own_section(tmp_path):
    script = _script()
    record = script.check_one("test_vit", 150e6, drop_path=0.1, drop_rate=0.1)
    assert record["status"] == "pass", record
    assert record["drop"] == {"drop_path_rate": 0.1, "drop_rate": 0.1}  # the model took both
    assert record["passed"]["modes"] and record["passed"]["covered"]
    assert record["mode_graphs"] is True  # stochastic depth: the modes trace differently
    page = tmp_path / "page.md"
    page.write_text("# timm coverage\n\nThe full sweep.\n\n## Totals\n\n| pass | 3 |\n")
    failing = {**record, "name": "other", "status": "fail", "reason": "modes: AssertionError: differs"}
    for _ in range(2):  # a second run replaces its section, the rest of the page stays
        section = script.write_drop_section([record, failing], str(page), 1371, 0.1, 0.1)
    text = page.read_text()
    assert text.count(script.DROP_BEGIN) == 1 and text.count(script.POINTER) == 1
    assert text.startswith("# timm coverage\n\n" + script.POINTER) and "The full sweep.\n\n## Totals" in text
    assert section in text and "## With drop path 0.1 and dropout 0.1" in section
    assert "| pass | 1 |" in section and "| fail | 1 |" in section and "### Totals" in section
    assert "x `fail: modes: AssertionError: differs`: other" in section
    assert "counted against every `nn.Conv*`/`nn.Linear` weight" in section


def test_create_drops_the_keywords_a_model_does_not_take():
    script = _script()
    drop = {"drop_path_rate": 0.1, "drop_rate": 0.1}
    model = script.create("densenet121", drop)  # takes drop_rate, not drop_path_rate
    assert drop == {"drop_rate": 0.1} and isinstance(model, torch.nn.Module)
