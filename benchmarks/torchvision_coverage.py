"""Coverage sweep: does ``sparsify`` keep its guarantees on every torchvision model?

Every model of torchvision's classification, semantic segmentation, video and detection zoos
(``torchvision.models.list_models``; ``--zoos`` and ``--models`` narrow it), each in its own
subprocess with a time limit (``--timeout``) and one thread:

1. build it (``weights=None``; 10 classes; detection models resize to 128 px); above
   ``--max-params`` (counted on the meta device) it is listed, not built;
2. pick an input the eager model runs (classification 64x64, else the size it needs; video
   8 frames of 64x64, else 16 of 224x224; detection two 128x128 images with their targets:
   boxes and labels, and masks or keypoints where the model trains on them);
3. run :func:`fxsparse.checks.check_model` with every check: sparsify at density 0.1 ERK, exact
   counts, every conv/linear/matmul weight masked or listed (``covered``), every product reads
   zeros where its mask is False (``reads``), density 1.0 equals eager in both modes (``modes``),
   gradients, one ``rigl_step``; the share of product-weight parameters sparsified.

Records are appended to a JSON-lines file as they come (``--results``; a rerun skips the models
already there, ``--rerun STATUS`` runs those again), and ``--out`` writes the page.

Run (about an hour on 2 cores):
    .venv/bin/python benchmarks/torchvision_coverage.py --out docs/torchvision_coverage.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from sweeps import commands, export_evidence, json_child, limits_section, listed, load_records, run_all, short_reason  # noqa: E402

__all__ = ["main", "check_one", "zoo_models", "build", "example_for", "write_page", "ZOOS"]

ZOOS = ("classification", "segmentation", "video", "detection")
SIDE = 128  # detection: images and the transform's resize


def zoo_models(zoos: tuple[str, ...] = ZOOS) -> dict[str, str]:
    """Model name -> zoo, for torchvision's zoos ``zoos``."""
    from torchvision import models

    modules = {"classification": models, "segmentation": models.segmentation, "video": models.video,
               "detection": models.detection}
    return {name: zoo for zoo in zoos for name in models.list_models(module=modules[zoo])}


def build(name: str, zoo: str) -> Any:
    """``torchvision.models.get_model(name, weights=None, ...)`` with 10 classes (the keypoint
    model keeps its person class), no backbone weights and, for detection, a 128 px transform."""
    from torchvision import models

    kwargs: dict[str, Any] = {"weights": None}
    if zoo in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None  # their default downloads ImageNet weights for the backbone
    if zoo == "detection":
        if not name.startswith("ssd"):
            kwargs.update(min_size=SIDE, max_size=SIDE)
    if not name.startswith("keypointrcnn"):
        kwargs["num_classes"] = 10
    return models.get_model(name, **kwargs)


def _targets(name: str) -> list[dict[str, Any]]:
    import torch

    boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [40.0, 30.0, 120.0, 110.0]])
    target: dict[str, Any] = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    if name.startswith("maskrcnn"):
        masks = torch.zeros(2, SIDE, SIDE, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        target["masks"] = masks
    if name.startswith("keypointrcnn"):
        target["labels"] = torch.tensor([1, 1])
        points = torch.rand(2, 17, 2) * 50 + boxes[:, None, :2]
        target["keypoints"] = torch.cat([points, torch.ones(2, 17, 1)], dim=2)
    return [target, {k: v.clone() for k, v in target.items()}]


def example_for(name: str, zoo: str, model: Any) -> tuple[Any, str]:
    """``(example_inputs, description)``: the first candidate input the eager model runs in eval
    and in train mode (Inception's auxiliary head, run in training only, needs a larger image).
    Raises the last error when none runs."""
    import torch

    if zoo == "detection":
        gen = torch.Generator().manual_seed(0)
        images = [torch.rand(3, SIDE, SIDE, generator=gen) for _ in range(2)]
        candidates = [((images, _targets(name)), f"2 images 3x{SIDE}x{SIDE} with targets")]
    else:
        shapes = {
            "classification": [(2, 3, 64, 64), (2, 3, 224, 224), (2, 3, 299, 299)],
            "segmentation": [(2, 3, 64, 64), (2, 3, 224, 224)],
            "video": [(2, 3, 8, 64, 64), (2, 3, 16, 224, 224)],
        }[zoo]
        candidates = [((torch.randn(*shape),), "x".join(map(str, shape))) for shape in shapes]
    error: Exception | None = None
    for inputs, text in candidates:
        try:
            with torch.no_grad():
                model.eval()(*inputs[:1]) if zoo == "detection" else model.eval()(*inputs)
                model.train()(*inputs)
            return inputs, text
        except Exception as e:  # noqa: BLE001 - try the next size
            error = e
    assert error is not None
    raise error


def _count(name: str, zoo: str) -> int | None:
    """The model's parameter count without its memory: built on the meta device, or where its
    constructor computes on tensors (RegNet's widths), the count torchvision's weights record."""
    import torch
    from torchvision import models

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build(name, zoo).parameters())
    except Exception:  # noqa: BLE001 - the recorded count, for its pretrained head
        pass
    try:
        return int(models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:  # noqa: BLE001 - unknown: build it for real
        return None


def check_one(name: str, zoo: str, max_params: float) -> dict[str, Any]:
    """Every check on one model, in this process (the child's work)."""
    import torch

    torch.set_num_threads(1)
    from fxsparse.checks import check_model

    result: dict[str, Any] = {"name": name, "zoo": zoo}
    start = time.perf_counter()
    params = _count(name, zoo)
    if params is not None and params > max_params:
        return {**result, "params": params, "status": "too large",
                "reason": f"{params / 1e6:.0f} M parameters > cap {max_params / 1e6:.0f} M"}
    try:
        torch.manual_seed(0)
        model = build(name, zoo)
    except Exception as e:  # noqa: BLE001 - the page says why
        return {**result, "status": "not constructed", "reason": short_reason(e)}
    result["params"] = sum(p.numel() for p in model.parameters())
    try:
        inputs, result["input"] = example_for(name, zoo, model)
    except Exception as e:  # noqa: BLE001
        return {**result, "status": "not runnable", "reason": short_reason(e)}
    report = check_model(model.train(), inputs)
    failed = next((c for c, ok in report.passed.items() if not ok), None)
    if failed == "sparsify" and "torch.export" in (report.failure or ""):
        result["evidence"] = export_evidence(model, inputs, {}, ("torchvision/",), report.failure or "")
    result.update(
        stage=failed,
        capture=report.capture, mode_graphs=report.mode_graphs, status="pass" if report.ok else "fail",
        reason=report.failure, passed=report.passed, coverage=report.coverage,
        masked_params=report.masked_params, skipped=[list(s) for s in report.skipped],
        seconds=round(time.perf_counter() - start, 1),
    )
    return result


def _share(records: list[dict[str, Any]]) -> float:
    """Sparsified share of the product-weight parameters of passing ``records``."""
    ok = [r for r in records if r["status"] == "pass" and r.get("coverage")]
    total = sum(r["masked_params"] / r["coverage"] for r in ok)
    return sum(r["masked_params"] for r in ok) / total if total else float("nan")


def write_page(records: list[dict[str, Any]], path: str | None, total: int) -> str:
    """The Markdown page: totals by zoo, the product-weight share, each model, failures by reason."""
    import torchvision

    statuses = ("pass", "fail", "not constructed", "not runnable", "too large", "timeout", "crashed")
    lines = [
        "# torchvision coverage",
        "",
        f"{len(records)} of torchvision {torchvision.__version__}'s {total} classification, segmentation, video and "
        f"detection models swept ({datetime.date.today().isoformat()}); each model in its own process, one thread, "
        "`weights=None`, 10 classes, with every check of `fxsparse.checks.check_model` (listed in "
        "[coverage.md](coverage.md)). Produced by (each command resumes from the results file):",
        "",
        *commands(records),
        "",
        "## Totals",
        "",
        "| zoo | " + " | ".join(statuses) + " | product weights sparsified (passing) |",
        "|---|" + "---|" * (len(statuses) + 1),
    ]
    for zoo in (*ZOOS, "all"):
        rows = [r for r in records if zoo in ("all", r.get("zoo"))]
        counts = collections.Counter(r["status"] for r in rows)
        lines.append(f"| {zoo} | " + " | ".join(str(counts.get(s, 0)) for s in statuses)
                     + (f" | {100 * _share(rows):.2f}% |" if any(r["status"] == "pass" for r in rows) else " | none passes |"))
    lines += [
        "",
        "The share counts every `nn.Conv*`/`nn.Linear` weight and every parameter a product kernel reads while "
        "the model runs (`covered`); a weight listed in `sparse.skipped` counts as left dense.",
        "",
        "## Every model",
        "",
        "| model | zoo | outcome | front-end | sparsified | masked parameters | listed in `skipped` |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (ZOOS.index(r.get("zoo", "classification")), r["name"])):
        share = f"{100 * r['coverage']:.2f}%" if r.get("coverage") is not None else ""
        lines.append(f"| {r['name']} | {r.get('zoo', '')} | {r['status']} | {r.get('capture') or ''} | {share} | "
                     f"{r.get('masked_params', 0):,} | {listed(r) if r['status'] == 'pass' else ''} |")
    lines += ["", "## Failures by reason", ""]
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for r in records:
        if r["status"] not in ("pass", "too large"):
            reasons[f"{r['status']}: {(r.get('reason') or '')[:240]}"].append(r["name"])
    lines += [f"- {len(names)} x `{reason}`: {', '.join(sorted(names))}" for reason, names in
              sorted(reasons.items(), key=lambda kv: -len(kv[1]))] or ["None."]
    lines += limits_section(records, "name", "fail")
    big = [r for r in records if r["status"] == "too large"]
    if big:
        lines += ["", "Above the parameter cap, counted on the meta device and not built: "
                  + ", ".join(f"{r['name']} ({r['params'] / 1e6:.0f} M)" for r in big) + "."]
    text = "\n".join(lines) + "\n"
    if path:
        Path(path).write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", default=",".join(ZOOS), help=f"comma-separated, of {', '.join(ZOOS)}")
    parser.add_argument("--models", default="", help="comma-separated names (default: every model of the zoos)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--results", default="benchmarks/results/torchvision_coverage.jsonl")
    parser.add_argument("--out", default=None, help="write the Markdown page here")
    parser.add_argument("--rerun", default="", help="comma-separated statuses to run again, e.g. 'timeout'")
    parser.add_argument("--report-only", action="store_true", help="write the page from --results, run nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, zoo = args.child.split(":")
        print(json.dumps(check_one(name, zoo, args.max_params)), flush=True)
        return
    every = zoo_models(tuple(z for z in args.zoos.split(",") if z))
    wanted = [n for n in args.models.split(",") if n] or list(every)
    path = Path(args.results)
    done = load_records(path, "name", args.rerun, args.report_only)
    todo = [] if args.report_only else [n for n in wanted if n not in done]
    print(f"{len(wanted)} models, {len(todo)} to run, {len(done)} already in {path}", flush=True)
    command = "benchmarks/torchvision_coverage.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    def run(name: str) -> dict[str, Any]:
        child = [sys.executable, __file__, "--child", f"{name}:{every[name]}", "--max-params", str(args.max_params)]
        return {"zoo": every[name], **json_child(child, name, args.timeout)}

    run_all(todo, run, args.workers, path, command, done)
    recorded = load_records(path, "name", report_only=True)  # the page shows every model in the file
    text = write_page([recorded[n] for n in every if n in recorded], args.out, len(zoo_models()))
    if not args.out:
        print(text)


if __name__ == "__main__":
    main()
