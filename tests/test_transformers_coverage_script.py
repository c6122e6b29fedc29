"""benchmarks/transformers_coverage.py: one model type end to end, tiny configs, and its page.

The sweep itself (every model type, hours) is not run here: one type through the per-model
function the sweep's subprocesses run, the config shrinking on composite configs, the page
writer on made-up records, and ``--help`` without transformers installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts import load_script

from fxsparse.checks import CHECKS

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transformers_coverage.py"


def _script():
    return load_script("benchmarks/transformers_coverage.py")


def test_one_model_type_passes_every_check_from_a_tiny_config():
    from fxsparse.checks import CHECKS

    steps = []
    record = _script().check_one("bert", progress=steps.append)
    assert record["status"] == "ok", record
    assert record["passed"] == {check: True for check in CHECKS}
    assert record["type"] == "bert" and record["config"] == "tiny"
    assert record["auto"] == "AutoModelForCausalLM" and record["model"] == "BertLMHeadModel"
    assert record["inputs"] == {"input_ids": [2, 16], "attention_mask": [2, 16], "labels": [2, 16]}
    assert record["capture"] == "export" and record["stage"] is None and record["reason"] is None
    assert 0.5 < record["coverage"] <= 1.0 and record["masked_params"] > 0
    assert record["params"] < 100_000  # tiny: widths 32, 2 layers, vocabulary 256
    assert any("check_model BertLMHeadModel" in s for s in steps)  # what a timeout would report
    # sparsified from input_ids alone, it runs other shapes and takes the mask and labels it lacked
    assert record["signatures"] == {"status": "ok", "capture": "export", "calls": [
        "other shape", "+ attention_mask, labels", "other shape + attention_mask, labels"]}


def test_the_signature_check_reports_a_call_that_fails(monkeypatch):
    import torch

    script = _script()
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(1, 50, (script.BATCH, script.LENGTH))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    assert script.check_signatures(model, inputs)["status"] == "ok"
    # the sparse module's outputs (read second in each call) differing from the model's: failed
    real, reads = script._outputs, []

    def shifted(result):
        reads.append(1)
        return {k: v + 1 for k, v in real(result).items()} if len(reads) % 2 == 0 else real(result)

    monkeypatch.setattr(script, "_outputs", shifted)
    result = script.check_signatures(model, inputs)
    assert result["status"] == "failed" and result["calls"] == [] and result["reason"].startswith("other shape")
    # a reshaped call the model itself cannot take (token ids out of its vocabulary): skipped, said so
    monkeypatch.setattr(script, "_outputs", real)
    monkeypatch.setattr(script, "_reshaped", lambda given: {**given, "input_ids": torch.full((3, 11), 999)})
    result = script.check_signatures(model, inputs)
    assert result["status"] == "ok" and result["calls"] == ["+ attention_mask, labels"]
    assert all("the model itself fails" in s for s in result["skipped"]) and len(result["skipped"]) == 2


def test_a_model_type_without_a_model_class_is_said_so():
    record = _script().check_one("sam_prompt_encoder")  # a part of SAM, built by SamModel only
    assert record["status"] == "no model class" and "no auto class maps" in record["reason"]


def test_tiny_config_shrinks_nested_sub_configs_and_keeps_them_consistent():
    script = _script()
    llava = script.tiny_config("llava")
    assert llava.text_config.hidden_size == 32 and llava.text_config.num_hidden_layers == 2
    assert llava.text_config.vocab_size == 256 and llava.vision_config.num_hidden_layers == 2
    assert llava.text_config.use_cache is False
    assert llava.image_token_index < llava.text_config.vocab_size  # special ids remapped into it
    qwen = script.tiny_config("qwen2_vl").text_config  # per-layer lists follow the layer count
    assert len(qwen.layer_types) == qwen.num_hidden_layers == 2
    assert sum(qwen.rope_parameters["mrope_section"]) == qwen.hidden_size // qwen.num_attention_heads // 2
    swin = script.tiny_config("swin")  # derived fields are recomputed, not overwritten
    assert swin.embed_dim == 32 and list(swin.depths) == [1, 1, 1, 1] and swin.hidden_size == 32 * 8
    assert script.tiny_config("gpt2", "default").n_embd == 768  # the fallback config as it comes


FAKE = [
    {"type": "bert", "model": "BertLMHeadModel", "config": "tiny", "status": "ok", "stage": None, "reason": None,
     "capture": "export", "coverage": 0.68, "masked_params": 17408, "seconds": 12.5, "torch": "2.x",
     "transformers": "5.x", "command": "benchmarks/transformers_coverage.py --only bert",
     "signatures": {"status": "ok", "calls": ["other shape"], "capture": "export"},
     "passed": {check: True for check in CHECKS}},
    {"type": "layoutlm", "model": "LayoutLMForMaskedLM", "config": "tiny", "status": "failed",
     "stage": "rigl_step", "reason": "rigl_step: ValueError: no growth gradient | for 1 layer",
     "capture": "export", "coverage": 0.7, "masked_params": 100, "seconds": 11.0, "torch": "2.x",
     "transformers": "5.x", "command": "benchmarks/transformers_coverage.py"},
    {"type": "hubert", "model": "HubertModel", "config": "default", "status": "failed", "stage": "sparsify",
     "reason": "sparsify: TypeError: exporting failed", "capture": None, "seconds": 30.0,
     "command": "benchmarks/transformers_coverage.py"},
    {"type": "reformer", "status": "could not make inputs", "reason": "ReformerModel on ids: ValueError: axial",
     "seconds": 6.0, "command": "benchmarks/transformers_coverage.py"},
    {"type": "nougat", "status": "could not build", "reason": "config (tiny): ValueError: Unrecognized",
     "seconds": 4.0, "command": "benchmarks/transformers_coverage.py"},
    {"type": "sam_prompt_encoder", "status": "no model class", "reason": "no auto model class maps this config type",
     "seconds": 3.0, "command": "benchmarks/transformers_coverage.py"},
    {"type": "swin", "status": "timeout", "reason": "more than 120 s (while check_model SwinModel)", "seconds": 120.2,
     "command": "benchmarks/transformers_coverage.py"},
]


def test_page_counts_outcomes_and_lists_every_type_with_its_reason(tmp_path):
    out = tmp_path / "page.md"
    text = _script().write_report(FAKE, str(out), registry=822, wall=200.0)
    assert out.read_text() == text
    assert "7 of the 822 model types" in text and "torch 2.x, transformers 5.x" in text
    for row in ("| swept | 7 |", "| built and ran (dense, eager) | 3 |", "| pass every check | 1 |",
                "| failed at `sparsify` | 1 |", "| failed at `rigl_step` | 1 |", "| failed at `gradients` | 0 |",
                "| built, but could not make inputs | 1 |", "| could not build | 1 |",
                "| no model class (config only) | 1 |", "| timeout | 1 |", "| crashed | 0 |"):
        assert row in text, row
    assert ".venv/bin/python benchmarks/transformers_coverage.py --only bert" in text
    assert text.count(".venv/bin/python benchmarks/transformers_coverage.py\n") == 1  # commands deduplicated
    assert "1 of them needed a larger config" in text and "3.3 min of wall time" in text
    assert "| bert | BertLMHeadModel | tiny | ok | export | 68% | 17408 | 12.5 |  |" in text
    assert "| layoutlm | LayoutLMForMaskedLM | tiny | failed at rigl_step |" in text
    assert "no growth gradient \\| for 1 layer" in text  # a | in a reason does not break the table
    assert "- 1 x `timeout: more than 120 s (while check_model SwinModel)`: swin" in text
    assert "## Other shapes and keywords" in text and "1 were also sparsified" in text and "1 ok, 0 failed" in text
    table = text.split("## Every model type", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    assert [r.split(" | ")[0][2:] for r in rows] == sorted(r["type"] for r in FAKE)  # every type, sorted


def test_help_works_and_a_run_says_how_to_install_without_transformers():
    block = "import runpy, sys; sys.modules['transformers'] = None; sys.argv = ['x', *sys.argv[1:]]; " \
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    shown = subprocess.run([sys.executable, "-c", block, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--only" in shown.stdout and "--limit" in shown.stdout
    run = subprocess.run([sys.executable, "-c", block, "--only", "bert"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "pip install fxsparse[transformers]" in run.stderr


def test_a_run_over_some_types_writes_the_page_of_every_recorded_type(tmp_path):
    """``--only`` and ``--rerun`` choose what runs; the page still shows every type in the
    results file (a run with ``--only recurrent_gemma --rerun failed`` once wrote a page of that
    type alone)."""
    import json

    results, page = tmp_path / "results.jsonl", tmp_path / "page.md"
    results.write_text("".join(json.dumps(r) + "\n" for r in FAKE))
    ok = next(r["type"] for r in FAKE if r["status"] == "ok")
    failed = [r["type"] for r in FAKE if r["status"] == "failed"]
    # the one type named passed already, so nothing runs; the failed ones are not named
    _script().main(["--only", ok, "--rerun", "failed", "--results", str(results), "--out", str(page)])
    table = page.read_text().split("## Every model type", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == sorted(r["type"] for r in FAKE)
    assert failed and all(f"| {t} |" in table for t in failed)
