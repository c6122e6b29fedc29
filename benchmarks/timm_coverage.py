"""Coverage sweep: does ``sparsify`` keep its guarantees on every timm architecture?

For every name of ``timm.list_models()`` (sorted; ``--every K`` keeps every K-th, ``--models``
names some), in its own subprocess with a time limit (``--timeout``) and one thread:

1. build it (``pretrained=False``, 10 classes); too large (``--max-params``) is skipped, said so;
2. pick an input: 64x64 (or the model's own size when it needs one) with the model's channels;
   the eager forward must work, else the model is listed as not runnable;
3. ask whether timm itself can fx-trace it (``timm.models.get_graph_node_names``, timm's
   feature-extraction tracer with its leaf registries): the denominator of the pass rate;
4. run :func:`fxsparse.checks.check_model`: sparsify at density 0.1 ERK, exact counts, density 1.0
   equals eager, gradients, one ``rigl_step``, and the fraction of conv/linear/matmul weights
   sparsified.

Results are appended to a JSON-lines file as they come (``--results``; a rerun skips the models
already there, so a sweep can be resumed), and ``--out`` writes the Markdown report: totals,
per-family table, failures grouped by reason.

``--capture export`` weighs the second front-end (``torch.export``) against symbolic tracing on the
same models: every check runs on the exported capture, and each child also times both captures
(``sparsify`` wall time; a training step, median of 3) and counts the weights each one masks, in
the same process; ``--out`` then writes the weighing page (its own results file by default).

Run (the whole registry takes hours on 2 cores):
    .venv/bin/python benchmarks/timm_coverage.py --out docs/timm_coverage.md
    .venv/bin/python benchmarks/timm_coverage.py --every 10 --out docs/timm_coverage.md  # a sample
    .venv/bin/python benchmarks/timm_coverage.py --capture export --every 30 --out docs/timm_export.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import shlex
import sys
import time
import zlib
from pathlib import Path
from typing import Any

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from sweeps import commands, json_child, listed, load_records, run_all, short_reason, stale  # noqa: E402

__all__ = ["main", "check_one", "create", "write_report", "write_drop_section"]

SMALL = 64


def create(name: str, drop: dict[str, float], **kwargs: Any) -> Any:
    """``timm.create_model(name, pretrained=False, num_classes=10, **kwargs)`` with the drop
    settings it accepts (``drop`` is trimmed to them: a few architectures, densenet among them,
    take no ``drop_path_rate`` or no ``drop_rate``)."""
    import timm

    for keys in (tuple(drop), ("drop_path_rate",), ("drop_rate",), ()):
        taken = {k: drop[k] for k in keys if k in drop}
        if len(taken) < len(keys):
            continue
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **taken, **kwargs)
        except TypeError as e:  # an unexpected keyword: try with fewer
            if not taken or "unexpected keyword" not in str(e):
                raise
            continue
        for key in set(drop) - set(taken):
            drop.pop(key)
        return model
    raise AssertionError("unreachable")  # the last try passes no drop keyword


def check_one(name: str, max_params: float, capture: str = "auto", drop_path: float = 0.0,
              drop_rate: float = 0.0) -> dict[str, Any]:
    """All checks for one model, in this process (the child's work); ``capture`` as sparsify's;
    ``drop_path`` / ``drop_rate``: timm's ``drop_path_rate`` / ``drop_rate`` (where the model
    takes them), as its training recipes set them."""
    import timm
    import torch

    torch.set_num_threads(1)
    from fxsparse.checks import check_model

    result: dict[str, Any] = {"name": name}
    start = time.perf_counter()
    try:  # count parameters on the meta device first: a billion-parameter init takes minutes
        with torch.device("meta"):
            meta = timm.create_model(name, pretrained=False, num_classes=10)
        params = sum(p.numel() for p in meta.parameters())
        if params > max_params:
            return {**result, "family": type(meta).__module__.rsplit(".", 1)[-1], "params": params,
                    "status": "too large", "reason": f"{params / 1e6:.0f} M parameters > cap {max_params / 1e6:.0f} M"}
    except Exception:  # noqa: BLE001 - some models cannot be built on meta: build them for real
        pass
    drop = {k: v for k, v in (("drop_path_rate", drop_path), ("drop_rate", drop_rate)) if v}
    try:
        torch.manual_seed(0)
        model = create(name, drop)
    except Exception as e:  # noqa: BLE001 - the report says why
        return {**result, "status": "not constructed", "reason": _reason(e)}
    if drop_path or drop_rate:
        result["drop"] = drop  # the settings the model took
    result["family"] = type(model).__module__.rsplit(".", 1)[-1]
    params = sum(p.numel() for p in model.parameters())
    result["params"] = params
    if params > max_params:
        return {**result, "status": "too large", "reason": f"{params / 1e6:.0f} M parameters > cap {max_params / 1e6:.0f} M"}
    channels, *size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = None
    for shape in ((channels, SMALL, SMALL), (channels, *size)):
        try:
            candidate = torch.randn(2, *shape)
            model.eval()
            with torch.no_grad():
                model(candidate)
            x = candidate
            break
        except Exception as e:  # noqa: BLE001
            result["eager_error"] = _reason(e)
    if x is None:
        return {**result, "status": "not runnable", "reason": result.pop("eager_error")}
    result["input"] = list(x.shape)
    try:
        from timm.models import get_graph_node_names

        get_graph_node_names(model)
        result["timm_traces"] = True
    except Exception as e:  # noqa: BLE001
        result["timm_traces"] = False
        result["timm_trace_error"] = _reason(e)
    if capture == "export":
        try:
            result["weighing"] = weigh_captures(model, x)
        except Exception as e:  # noqa: BLE001 - the check below says which stage fails
            result["weighing_error"] = _reason(e)
    report = check_model(model, x, capture=capture)
    result.update(
        capture=report.capture,
        mode_graphs=report.mode_graphs,
        status="pass" if report.ok else "fail",
        reason=report.failure,
        passed=report.passed,
        coverage=report.coverage,
        masked_params=report.masked_params,
        skipped=[list(s) for s in report.skipped],
        seconds=round(time.perf_counter() - start, 1),
    )
    return result


def weigh_captures(model: Any, x: Any, steps: int = 3) -> dict[str, Any]:
    """Both front-ends on one model, same process: capture time, step time, weights masked."""
    import copy

    import torch

    import fxsparse

    out: dict[str, Any] = {}
    for how in ("symbolic", "export"):
        torch.manual_seed(0)
        start = time.perf_counter()
        sparse = fxsparse.sparsify(copy.deepcopy(model).train(), 0.1, "erk", example_inputs=x, capture=how)
        out[f"{how}_sparsify_s"] = round(time.perf_counter() - start, 3)
        out[f"{how}_masked"] = sum(m.numel() for m in sparse.masks.values())
        out[f"{how}_layers"] = len(sparse.masks)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            sparse(x).float().sum().backward()
            times.append(time.perf_counter() - start)
        out[f"{how}_step_s"] = round(sorted(times[1:])[len(times[1:]) // 2], 4)
        del sparse
    return out


_reason = short_reason


def _run_child(name: str, timeout: float, max_params: float, capture: str = "auto", drop_path: float = 0.0,
               drop_rate: float = 0.0) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, "--max-params", str(max_params), "--capture", capture,
               "--drop-path", str(drop_path), "--drop-rate", str(drop_rate)]
    return json_child(command, name, timeout)


# records written before the command was recorded came from this full-registry sweep
FIRST_SWEEP = "benchmarks/timm_coverage.py --timeout 240 --out docs/timm_coverage.md"


def write_report(results: list[dict[str, Any]], path: str | None, total_registry: int) -> str:
    """The Markdown report of a sweep's results."""
    by_status = collections.Counter(r["status"] for r in results)
    checked = [r for r in results if r["status"] in ("pass", "fail")]
    traced = [r for r in checked if r.get("timm_traces")]
    passed_traced = [r for r in traced if r["status"] == "pass"]
    passing = [r for r in checked if r["status"] == "pass"]
    masked = sum(r.get("masked_params", 0) for r in passing)
    total_weights = sum(r["masked_params"] / r["coverage"] for r in passing if r.get("coverage"))
    lines = [
        "# timm coverage",
        "",
        f"{len(results)} of timm {_timm_version()}'s {total_registry} registered architectures swept "
        f"({datetime.date.today().isoformat()}), in a fixed pseudo-random order (crc32 of the name), so "
        f"that a partial sweep is a fair sample; each model in its own process, one thread, "
        f"pretrained=False, 10 classes, a 64x64 input or the model's own size where it needs one.",
        "",
        "Produced by (each command resumes from the results file and runs what is missing or asked for):",
        "",
        *commands(results, FIRST_SWEEP),
        "",
        "## Totals",
        "",
        "| outcome | models |",
        "|---|---|",
    ]
    for status in ("pass", "fail", "not constructed", "not runnable", "too large", "timeout", "crashed"):
        lines.append(f"| {status} | {by_status.get(status, 0)} |")
    rate = len(passed_traced) / len(traced) if traced else float("nan")
    two = [r["name"] for r in passing if r.get("mode_graphs")]
    lines += [
        "",
        f"Of the {len(traced)} checked models that timm itself can fx-trace, {len(passed_traced)} pass every "
        f"check: {100 * rate:.1f}%. Of the {len(checked) - len(traced)} that timm's tracer cannot trace, "
        f"{sum(1 for r in checked if not r.get('timm_traces') and r['status'] == 'pass')} pass anyway.",
        f"On the passing models, {100 * masked / total_weights if total_weights else float('nan'):.2f}% of "
        + (
            "conv/linear/matmul weight parameters are sparsified, counted against every `nn.Conv*`/`nn.Linear` "
            "weight and every parameter a product kernel reads while the model runs (`covered`: each of them "
            "is masked or listed in `skipped`)."
            if passing and all("covered" in (r.get("passed") or {}) for r in passing) else
            "conv/linear/matmul weight parameters are sparsified (the rest are listed in `skipped`). This share "
            "is a lower bound: every parameter in `skipped` counts as a weight left dense, although most of "
            "them are gains, biases and position embeddings inside untraceable leaves (listed below)."
        ),
        *([
            f"{len(two)} of the {len(passing)} passing models compute differently in train and in eval mode "
            f"in ways a graph fixes (functional drop path or dropout, a head computed only in training), so "
            f"their sparse module holds a graph per mode: {', '.join(sorted(two)[:8])}"
            + (f" and {len(two) - 8} more." if len(two) > 8 else ".")
        ] if any("mode_graphs" in r for r in passing) else []),
        "",
        "## By family",
        "",
        "| family | checked | pass | fail | weights sparsified |",
        "|---|---|---|---|---|",
    ]
    families: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in checked:
        families[r.get("family", "?")].append(r)
    for family in sorted(families):
        rows = families[family]
        ok = [r for r in rows if r["status"] == "pass"]
        cov = (
            sum(r["masked_params"] for r in ok) / sum(r["masked_params"] / r["coverage"] for r in ok if r["coverage"])
            if ok and any(r.get("coverage") for r in ok) else float("nan")
        )
        lines.append(f"| {family} | {len(rows)} | {len(ok)} | {len(rows) - len(ok)} | {100 * cov:.1f}% |")
    lines += ["", "## Failures by reason", ""]
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        if r["status"] not in ("pass", "too large"):
            reasons[f"{r['status']}: {(r.get('reason') or '')[:160]}"].append(r["name"])
    if not reasons:
        lines.append("None.")
    for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        lines.append(f"- {len(names)} x `{reason}`: {shown}")
    lines += _left_dense(passing) + _every_model(results) + _too_large(results)
    text = "\n".join(lines) + "\n"
    if path:
        Path(path).write_text(text)
    return text


POINTER = "<!-- pointer -->"
DROP_BEGIN, DROP_END = "<!-- drop-path sweep: written by timm_coverage.py --drop-path -->", "<!-- end of drop-path sweep -->"


def write_drop_section(
    results: list[dict[str, Any]], path: str | None, total_registry: int, drop_path: float, drop_rate: float,
) -> str:
    """The section of a sweep with drop path and dropout on (``--drop-path``): the same totals,
    families and failures as :func:`write_report`, under its own heading. With ``path`` it
    replaces that section of the page (or goes right after the page's first paragraph), so the
    full-registry report around it stays."""
    body = write_report(results, None, total_registry).split("\n")
    body = [("#" + line if line.startswith("## ") else line) for line in body[2:]]  # one level down
    took = collections.Counter(tuple(sorted(r.get("drop", {}))) for r in results if r["status"] in ("pass", "fail"))
    settings = "; ".join(f"{n} took {', '.join(k) or 'neither'}" for k, n in took.most_common())
    section = "\n".join([
        DROP_BEGIN,
        f"## With drop path {drop_path:g} and dropout {drop_rate:g} (timm's training-recipe setting)",
        "",
        "Every check of `fxsparse.checks.check_model`, models built with `drop_path_rate` and `drop_rate` where "
        "they take them: besides the checks below, the density-1.0 module (sparsified in train mode) equals "
        "the model in eval mode and, under the same random seed, in train mode again (`modes`), and every "
        "conv/linear/matmul weight (each `nn.Conv*`/`nn.Linear` weight and every parameter a product kernel "
        f"reads while the model runs) is masked or listed in `skipped` (`covered`). Keywords: {settings or 'none'}.",
        "",
        *body,
        DROP_END,
    ])
    if path:
        page = Path(path).read_text() if Path(path).exists() else "# timm coverage\n"
        if DROP_BEGIN in page and DROP_END in page:
            before, rest = page.split(DROP_BEGIN, 1)
            page = before + section + rest.split(DROP_END, 1)[1]
        else:
            page = page.rstrip("\n") + "\n\n" + section + "\n"
        pointer = (
            f"{POINTER} The newest sweep, with drop path and dropout on and the checks of both modes and of "
            f"every product weight, is the last section: [with drop path](#{_anchor(section)})."
        )
        title, *rest = [line for line in page.split("\n") if not line.startswith(POINTER)]
        while rest and not rest[0].strip():
            rest.pop(0)
        page = "\n".join([title, "", pointer, "", *rest])
        Path(path).write_text(page)
    return section


def _anchor(section: str) -> str:
    """The anchor GitHub gives the section's heading."""
    heading = next(line for line in section.splitlines() if line.startswith("## "))[3:].lower()
    return "".join(c for c in heading.replace(" ", "-") if c.isalnum() or c in "-_")


def write_weighing(results: list[dict[str, Any]], path: str | None, total_registry: int) -> str:
    """The page of an export sweep (``--capture export``): does torch.export capture what
    symbolic tracing cannot, and at what cost? Ratios are export / symbolic, same process."""
    by_status = collections.Counter(r["status"] for r in results)
    checked = [r for r in results if r["status"] in ("pass", "fail")]
    weighed = [r for r in checked if r.get("weighing")]

    def median(values: list[float]) -> float:
        values, half = sorted(values), len(values) // 2
        return (values[half] + values[~half]) / 2 if values else float("nan")

    def ratios(key: str) -> list[float]:
        return [r["weighing"][f"export_{key}"] / r["weighing"][f"symbolic_{key}"]
                for r in weighed if r["weighing"].get(f"symbolic_{key}")]

    more = [r for r in weighed if r["weighing"]["export_masked"] > r["weighing"]["symbolic_masked"]]
    fewer = [r for r in weighed if r["weighing"]["export_masked"] < r["weighing"]["symbolic_masked"]]
    capture_ratio, step_ratio = ratios("sparsify_s"), ratios("step_s")
    lines = [
        "# timm under torch.export: the second front-end weighed",
        "",
        f"{len(results)} of timm {_timm_version()}'s {total_registry} architectures "
        f"({datetime.date.today().isoformat()}): every check of `fxsparse.checks.check_model` on the "
        f"`torch.export` capture (`capture=\"export\"`), and, in the same one-thread process, both "
        f"front-ends timed and compared: `sparsify` wall time (export captures train and eval graphs), "
        f"one training step (forward + backward, batch 2, median of 3 after a warm-up) and the number "
        f"of weight parameters each one masks. Symbolic tracing passes on every timm model that fits "
        f"the cap (docs/timm_coverage.md), so the question is what export adds and what it costs.",
        "",
        "```",
        *dict.fromkeys(f".venv/bin/python {r.get('command', '')}" for r in results),
        "```",
        "",
        "| outcome | models |",
        "|---|---|",
    ]
    for status in ("pass", "fail", "not constructed", "not runnable", "too large", "timeout", "crashed"):
        lines.append(f"| {status} | {by_status.get(status, 0)} |")
    lines += [
        "",
        f"- Checks under export: {by_status.get('pass', 0)} of {len(checked)} checked models pass.",
        f"- Weights masked: export masks more weight parameters than symbolic tracing on {len(more)} of "
        f"{len(weighed)} models, fewer on {len(fewer)}, the same on {len(weighed) - len(more) - len(fewer)}.",
        f"- Capture time (`sparsify`), export / symbolic: median {median(capture_ratio):.1f}x "
        f"(range {min(capture_ratio, default=float('nan')):.1f}-{max(capture_ratio, default=float('nan')):.1f}x).",
        f"- Training step, export / symbolic: median {median(step_ratio):.2f}x "
        f"(range {min(step_ratio, default=float('nan')):.2f}-{max(step_ratio, default=float('nan')):.2f}x; "
        f"medians of 3 one-thread steps of batch 2 on a shared machine: the spread is mostly noise, "
        f"the median is the figure).",
        *[f"- {r['name']}: symbolic tracing masks {r['weighing']['symbolic_masked']:,} weight parameters, "
          f"export {r['weighing']['export_masked']:,}." for r in more + fewer],
        "",
        "| model | checks | masked symbolic | masked export | sparsify s (sym / exp) | step s (sym / exp) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["name"]):
        w = r.get("weighing")
        if w:
            lines.append(
                f"| {r['name']} | {r['status']} | {w['symbolic_masked']:,} | {w['export_masked']:,} | "
                f"{w['symbolic_sparsify_s']:.1f} / {w['export_sparsify_s']:.1f} | "
                f"{w['symbolic_step_s']:.3f} / {w['export_step_s']:.3f} |")
        elif r["status"] != "too large":
            lines.append(f"| {r['name']} | {r['status']}: {(r.get('reason') or r.get('weighing_error') or '')[:120]} | | | | |")
    big = [r["name"] for r in results if r["status"] == "too large"]
    if big:
        lines += ["", f"Above the parameter cap, not checked: {', '.join(big)}."]
    text = "\n".join(lines) + "\n"
    if path:
        Path(path).write_text(text)
    return text


def _left_dense(passing: list[dict[str, Any]]) -> list[str]:
    """Parameters that passing models leave dense (``sparse.skipped``), grouped by reason."""
    groups: dict[str, set[str]] = collections.defaultdict(set)
    counts: collections.Counter[str] = collections.Counter()
    for r in passing:
        for fqn, reason in r.get("skipped") or []:
            # 'used inside the opaque leaf module 'x.y' (Cls), ...' -> the class is the reason
            key = reason.split("(", 1)[1].split(")", 1)[0] if "opaque leaf" in reason else reason[:120]
            groups[key].add(r["name"])
            counts[key] += 1
    lines = ["", "## Parameters left dense on passing models", ""]
    if not groups:
        return lines + ["None."]
    lines += [
        "Listed in `sparse.skipped` with the reason; most are not conv/linear/matmul weights at all "
        "(gains, attention biases) but parameters the graph cannot see because they live inside an "
        "untraceable leaf.",
        "",
        "| inside leaf (or reason) | parameters | models |",
        "|---|---|---|",
    ]
    for key, n in counts.most_common():
        names = sorted(groups[key])
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        lines.append(f"| {key} | {n} | {shown} |")
    return lines


def _every_model(results: list[dict[str, Any]]) -> list[str]:
    """One row per checked model: outcome, front-end, share sparsified, masked parameters, what is
    listed and why."""
    checked = sorted((r for r in results if r["status"] != "too large"), key=lambda r: r["name"])
    lines = ["", f"## Every model ({len(checked)})", "",
             "| model | family | outcome | front-end | sparsified | masked parameters | listed in `skipped` |",
             "|---|---|---|---|---|---|---|"]
    for r in checked:
        share = f"{100 * r['coverage']:.2f}%" if r.get("coverage") is not None else ""
        outcome = r["status"] if r["status"] != "fail" else f"fail: {(r.get('reason') or '').split(':', 1)[0]}"
        lines.append(f"| {r['name']} | {r.get('family', '')} | {outcome} | {r.get('capture') or ''} | {share} | "
                     f"{r.get('masked_params', 0):,} | {listed(r) if r['status'] == 'pass' else ''} |")
    return lines


def _too_large(results: list[dict[str, Any]]) -> list[str]:
    """Models above the parameter cap, which were built on the meta device but not checked."""
    big = sorted((r for r in results if r["status"] == "too large"), key=lambda r: r.get("params", 0))
    if not big:
        return []
    return [
        "",
        f"## Not checked: above the parameter cap ({len(big)})",
        "",
        "Counted on the meta device (no memory), not built: the sweep runs two 1-thread processes on a "
        "2-core, 24 GiB machine. Raise `--max-params` and pass `--rerun 'too large'` to check them.",
        "",
        ", ".join(f"{r['name']} ({r.get('params', 0) / 1e6:.0f} M)" for r in big),
    ]


def _timm_version() -> str:
    import timm

    return timm.__version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: the registry)")
    parser.add_argument("--every", type=int, default=1, help="keep every K-th name of the sorted registry")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--capture", default="auto", choices=("auto", "symbolic", "export"),
                        help="sparsify's front-end; 'export' also weighs it against symbolic tracing")
    parser.add_argument("--results", default=None,
                        help="JSON-lines records (default benchmarks/results/timm_coverage.jsonl, "
                        "timm_export.jsonl with --capture export)")
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--rerun", default="", help="comma-separated statuses to run again, e.g. 'too large,timeout'")
    parser.add_argument("--report-only", action="store_true", help="write the report from --results, run nothing")
    parser.add_argument("--drop-path", type=float, default=0.0,
                        help="timm's drop_path_rate (stochastic depth), e.g. 0.1 as its ViT/ConvNeXt/Swin recipes")
    parser.add_argument("--drop-rate", type=float, default=None,
                        help="timm's drop_rate (dropout before the classifier; default: the --drop-path value)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drop_rate is None:
        args.drop_rate = args.drop_path
    if args.child:
        print(json.dumps(check_one(args.child, args.max_params, args.capture, args.drop_path, args.drop_rate)), flush=True)
        return
    dropping = bool(args.drop_path or args.drop_rate)
    if args.results is None:
        stem = "timm_export" if args.capture == "export" else "timm_coverage"
        args.results = f"benchmarks/results/{stem}{'_drop' if dropping else ''}.jsonl"

    import timm

    registry = sorted(timm.list_models())
    names = [n for n in args.models.split(",") if n] or registry[:: args.every]
    results_path = Path(args.results)
    done = load_records(results_path, "name", args.rerun, args.report_only)
    # run in a fixed pseudo-random order, so that a sweep cut short is still a fair sample
    todo = sorted((n for n in names if n not in done), key=lambda n: zlib.crc32(n.encode()))
    if args.report_only:
        todo = []
    print(f"{len(names)} models, {len(todo)} to run, {len(done)} already in {results_path}", flush=True)
    # the command that produced each record, shown in the report (a report-only run adds none)
    command = "benchmarks/timm_coverage.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run = lambda n: _run_child(n, args.timeout, args.max_params, args.capture, args.drop_path, args.drop_rate)  # noqa: E731
    run_all(todo, run, args.workers, results_path, command, done)
    recorded = load_records(results_path, "name", report_only=True)  # the page shows every model in the file
    records = [recorded[n] for n in (registry[:: args.every] if not args.models else names) if n in recorded]
    if args.capture == "export":
        text = write_weighing(records, args.out, len(registry))
    elif dropping:  # the sweep with every check: a record made before one existed is left out until run again
        current = [r for r in records if not stale(r)]
        text = write_drop_section(current, args.out, len(registry), args.drop_path, args.drop_rate)
    else:
        text = write_report(records, args.out, len(registry))
    if not args.out:
        print(text)


if __name__ == "__main__":
    main()
