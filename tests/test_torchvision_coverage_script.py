"""benchmarks/torchvision_coverage.py and benchmarks/sweeps.py: one model per zoo kind through the
per-model function the sweep's subprocesses run, the page, and the evidence that names the limit a
failure meets. The sweep itself (every model, an hour) is not run here."""

from __future__ import annotations

from scripts import load_script

from fxsparse.checks import CHECKS


def _script():
    return load_script("benchmarks/torchvision_coverage.py")


def _sweeps():
    return load_script("benchmarks/sweeps.py")


def test_a_classification_model_passes_every_check():
    record = _script().check_one("squeezenet1_1", "classification", 150e6)
    assert record["status"] == "pass", record
    assert record["passed"] == {check: True for check in CHECKS}
    assert record["coverage"] == 1.0 and record["skipped"] == [] and record["input"] == "2x3x64x64"


def test_every_zoo_is_listed_and_a_detection_model_gets_targets():
    script = _script()
    models = script.zoo_models()
    assert {"resnet18", "deeplabv3_resnet50", "swin3d_t", "maskrcnn_resnet50_fpn"} <= set(models)
    assert set(models.values()) == set(script.ZOOS)
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the lightest detection model
    model = script.build(name, "detection")
    (images, targets), text = script.example_for(name, "detection", model)
    assert len(images) == len(targets) == 2 and "targets" in text
    losses = model.train()(images, targets)  # the targets are what the model trains on
    assert {"loss_classifier", "loss_box_reg"} <= set(losses)
    assert script._targets("keypointrcnn_resnet50_fpn")[0]["keypoints"].shape == (2, 17, 3)
    assert script._targets("maskrcnn_resnet50_fpn")[0]["masks"].shape == (2, script.SIDE, script.SIDE)


def test_the_page_names_each_failure_s_limit_with_its_evidence(tmp_path):
    script = _script()
    passing = {"name": "resnet18", "zoo": "classification", "status": "pass", "capture": "symbolic",
               "coverage": 1.0, "masked_params": 1000, "skipped": [], "passed": dict.fromkeys(CHECKS, True),
               "command": "benchmarks/torchvision_coverage.py --zoos classification"}
    detection = {"name": "ssd300_vgg16", "zoo": "detection", "status": "fail", "stage": "sparsify",
                 "reason": "sparsify: TypeError: expected a model torch.export can capture ...",
                 "evidence": "plain torch.export fails too (no fxsparse pass): GuardOnDataDependentSymNode: ... "
                             "at torchvision/models/detection/ssd.py:310", "masked_params": 0}
    ours = {"name": "alexnet", "zoo": "classification", "status": "fail", "stage": "gradients",
            "reason": "gradients: AssertionError: no gradient", "masked_params": 0}
    big = {"name": "vit_h_14", "zoo": "classification", "status": "too large", "params": 632e6}
    text = script.write_page([passing, detection, ours, big], str(tmp_path / "page.md"), 107)
    assert (tmp_path / "page.md").read_text() == text
    assert "| classification | 1 | 1 | 0 | 0 | 1 | 0 | 0 | 100.00% |" in text
    assert "| resnet18 | classification | pass | symbolic | 100.00% | 1,000 | none |" in text
    limits = text.split("## The limit each failure meets", 1)[1]
    assert limits.index("### fxsparse") < limits.index("### torch.export: the model branches")  # ours first
    assert "- ssd300_vgg16: plain torch.export fails too" in limits and "ssd.py:310" in limits
    assert "vit_h_14 (632 M)" in text


def test_limit_of_needs_evidence_and_stale_records_run_again():
    sweeps = _sweeps()
    export_failure = "sparsify: TypeError: expected a model torch.export can capture"
    assert sweeps.limit_of("sparsify", export_failure, None) == sweeps.FXSPARSE  # no evidence, no limit
    assert sweeps.limit_of("sparsify", export_failure, "plain torch.export captures it") == sweeps.FXSPARSE
    assert sweeps.limit_of("density_one", "density_one: AssertionError: torch.export's own graph of X differs from "
                           "eager already", None).startswith("torch.export: its own graph")
    assert sweeps.limit_of(None, "more than 300 s (while building AutoModel)", None, "timeout").startswith("the model alone")
    assert sweeps.stale({"status": "pass", "passed": {"sparsify": True}})
    assert not sweeps.stale({"status": "pass", "passed": dict.fromkeys(CHECKS, True)})
    assert not sweeps.stale({"status": "fail", "passed": {"sparsify": False}})


def test_export_evidence_names_the_model_s_line():
    import torch

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # a branch on a tensor's value
                return x * 2
            return x

    evidence = _sweeps().export_evidence(Branchy(), (torch.randn(3),), {}, ("test_torchvision_coverage_script",))
    assert evidence.startswith("plain torch.export fails too"), evidence
    assert "test_torchvision_coverage_script.py:" in evidence
    assert _sweeps().export_evidence(torch.nn.Linear(3, 2), (torch.randn(2, 3),), {}, ()) == "plain torch.export captures it"



def test_a_run_resumes_from_its_records_and_writes_the_page_of_every_record(tmp_path):
    import json

    results, page = tmp_path / "records.jsonl", tmp_path / "page.md"
    old = {"name": "alexnet", "zoo": "classification", "status": "pass", "coverage": 1.0, "masked_params": 5,
           "passed": {"sparsify": True}, "command": "benchmarks/torchvision_coverage.py"}  # before the newer checks
    results.write_text(json.dumps(old) + "\n")
    sweeps = _sweeps()
    assert sweeps.load_records(results, "name") == {}  # stale: runs again
    assert set(sweeps.load_records(results, "name", report_only=True)) == {"alexnet"}
    _script().main(["--zoos", "classification", "--report-only", "--results", str(results), "--out", str(page)])
    assert "| alexnet | classification | pass |" in page.read_text()
