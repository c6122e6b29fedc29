"""Aggregate result records into the papers' tables (mean +- std over seeds) and plots.

Reads every ``*.json`` result record under the given directories (written by ``recipes/demo.py``,
``recipes/study.py`` and the CIFAR recipe ``recipes/train.py``), groups the runs by dataset,
model, method, init and density, and writes a Markdown report: accuracy by method and density,
training and inference FLOP multipliers and model size (fxsparse.flop_report, the papers'
conventions), the seeds behind every cell, and whether the papers' ordering RigL >= SET > static
held in each column. With ``--plots`` it draws accuracy vs density and accuracy vs training FLOPs
(matplotlib PNGs next to the report).

Run:
    python recipes/report.py results/fashion_mnist --out docs/results.md --plots
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Run", "load_runs", "aggregate", "render", "plot", "main"]

ORDER = ["dense", "small_dense", "static", "set", "rigl", "rigl-sg", "rigl-sm", "snfs", "pruning", "lottery"]


@dataclass(frozen=True)
class Run:
    """One trained model, from a result record."""

    dataset: str
    model: str
    method: str
    init: str
    density: float  # the target density of the run (1.0 for dense)
    seed: int
    accuracy: float
    training_flops: float
    inference_flops: float
    size_mb: float
    epochs: float
    source: str


def load_runs(paths: list[Path]) -> list[Run]:
    """Every run of every ``*.json`` record under ``paths`` (files or directories)."""
    files = []
    for path in paths:
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    runs = []
    for file in files:
        record = json.loads(file.read_text())
        config = record.get("config", {})
        dataset = record.get("dataset", "fashion_mnist" if "demo" in record.get("recipe", "") else "?")
        model = record.get("model", f"SmallCNN(width={config.get('width', 32)})")
        for result in record.get("results", []):
            dense = result["method"] in ("dense", "small_dense")
            runs.append(Run(
                dataset=dataset,
                model=model,
                method=result["method"],
                init="-" if dense else config.get("init", "erk"),
                density=1.0 if result["method"] == "dense" else float(config.get("density", result.get("density", 1.0))),
                seed=int(config.get("seed", 0)),
                accuracy=float(result["test_accuracy"]),
                training_flops=float(result.get("training_flops", float("nan"))),
                inference_flops=float(result.get("inference_flops", float("nan"))),
                size_mb=float(result.get("size_mb", float("nan"))),
                epochs=float(config.get("epochs", float("nan"))),
                source=str(file),
            ))
    return runs


@dataclass(frozen=True)
class Cell:
    """The runs of one (method, init, density) over seeds."""

    runs: tuple[Run, ...]

    @property
    def accuracies(self) -> list[float]:
        return [r.accuracy for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.runs) > 1 else 0.0

    def field(self, name: str) -> float:
        return statistics.fmean(getattr(r, name) for r in self.runs)

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.std:.2f}"


def aggregate(runs: list[Run]) -> dict[tuple[str, str], dict[tuple[str, str, float], Cell]]:
    """``{(dataset, model): {(method, init, density): Cell}}``; a repeated seed is an error."""
    groups: dict[tuple[str, str], dict[tuple[str, str, float], list[Run]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for run in runs:
        cell = groups[(run.dataset, run.model)][(run.method, run.init, run.density)]
        if any(r.seed == run.seed for r in cell):
            raise ValueError(f"two runs of {run.method}/{run.init}/{run.density} with seed {run.seed}: {run.source}")
        cell.append(run)
    return {key: {k: Cell(tuple(sorted(v, key=lambda r: r.seed))) for k, v in cells.items()} for key, cells in groups.items()}


def _method_key(key: tuple[str, str, float]) -> tuple[int, str]:
    method, init, _ = key
    return (ORDER.index(method) if method in ORDER else len(ORDER), init)


def render(groups: dict[tuple[str, str], dict[tuple[str, str, float], Cell]], commands: list[str], plots: list[str] = ()) -> str:
    """The Markdown report."""
    lines = ["# Results", ""]
    if commands:
        lines += ["Produced by:", "", "```", *commands, "```", ""]
    for (dataset, model), cells in groups.items():
        densities = sorted({d for (m, _, d) in cells if m != "dense"}, reverse=True)
        rows = sorted({(m, i) for (m, i, _) in cells if m != "dense"}, key=lambda mi: _method_key((*mi, 0.0)))
        seeds = sorted({r.seed for cell in cells.values() for r in cell.runs})
        epochs = sorted({r.epochs for cell in cells.values() for r in cell.runs})
        lines += [
            f"## {dataset}, {model}",
            "",
            f"Test accuracy (%), mean +- standard deviation over seeds {seeds} ({len(seeds)} per cell unless "
            f"marked), {', '.join(f'{e:g}' for e in epochs)} epochs.",
            "",
        ]
        dense = [c for (m, _, _), c in cells.items() if m == "dense"]
        header = ["method", "init", *[f"density {d:g}" for d in densities]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for cell in dense:
            lines.append("| dense | - | " + " | ".join([f"{cell}{_n(cell, seeds)}"] * len(densities)) + " |")
        for method, init in rows:
            row = [method, init]
            for density in densities:
                cell = cells.get((method, init, density))
                row.append("" if cell is None else f"{cell}{_n(cell, seeds)}")
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            "Training FLOPs (x dense training) / inference FLOPs (x dense) / model size (MB), means over seeds "
            "(fxsparse.flop_report, the papers' conventions):",
            "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        ]
        for cell in dense:
            text = f"{cell.field('training_flops'):.2f}x / {cell.field('inference_flops'):.2f}x / {cell.field('size_mb'):.3f}"
            lines.append("| dense | - | " + " | ".join([text] * len(densities)) + " |")
        for method, init in rows:
            row = [method, init]
            for density in densities:
                cell = cells.get((method, init, density))
                row.append("" if cell is None else (
                    f"{cell.field('training_flops'):.3f}x / {cell.field('inference_flops'):.3f}x / {cell.field('size_mb'):.3f}"
                ))
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "### Does RigL >= SET > static hold?", ""]
        lines += _ordering(cells, densities, sorted({i for (_, i) in rows}))
        lines.append("")
    for path in plots:
        lines += [f"![{Path(path).stem}]({Path(path).name})", ""]
    return "\n".join(lines)


def _n(cell: Cell, seeds: list[int]) -> str:
    return "" if len(cell.runs) == len(seeds) else f" (n={len(cell.runs)})"


def _ordering(cells: dict[tuple[str, str, float], Cell], densities: list[float], inits: list[str]) -> list[str]:
    out = []
    held = failed = 0
    for init in inits:
        for density in densities:
            rigl, set_, static = (cells.get((m, init, density)) for m in ("rigl", "set", "static"))
            if None in (rigl, set_, static):
                continue
            a, b = rigl.mean >= set_.mean, set_.mean > static.mean
            gap = max(rigl.std, set_.std, static.std)
            verdict = "holds" if a and b else "does not hold"
            held += a and b
            failed += not (a and b)
            detail = []
            if not a:
                detail.append(f"RigL {100 * rigl.mean:.2f} < SET {100 * set_.mean:.2f}")
            if not b:
                detail.append(f"SET {100 * set_.mean:.2f} <= static {100 * static.mean:.2f}")
            margin = min(rigl.mean - set_.mean, set_.mean - static.mean)
            significance = "" if abs(margin) > gap else f"; the closest gap ({100 * margin:+.2f}) is within one standard deviation ({100 * gap:.2f})"
            out.append(f"- {init}, density {density:g}: {verdict}" + (f" ({'; '.join(detail)})" if detail else "") + significance)
    out.insert(0, f"It held in {held} of {held + failed} (init, density) columns, comparing means over seeds:")
    out.insert(1, "")
    out += ["", "Pair by pair (columns where the first mean is higher; in brackets: by more than the larger standard deviation):", ""]
    for first, second in (("rigl", "set"), ("set", "static"), ("rigl", "static"), ("snfs", "rigl"), ("pruning", "rigl")):
        pairs = [
            (cells[(first, i, d)], cells[(second, i, d)]) for i in inits for d in densities
            if (first, i, d) in cells and (second, i, d) in cells
        ]
        if pairs:
            wins = sum(a.mean > b.mean for a, b in pairs)
            clear = sum(a.mean - b.mean > max(a.std, b.std) for a, b in pairs)
            out.append(f"- {first} > {second}: {wins} of {len(pairs)} ({clear})")
    return out


def plot(groups: dict[tuple[str, str], dict[tuple[str, str, float], Cell]], out_dir: Path, stem: str = "results") -> list[str]:
    """Accuracy vs density and accuracy vs training FLOPs, one PNG each per (dataset, model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for index, ((dataset, model), cells) in enumerate(groups.items()):
        rows = sorted({(m, i) for (m, i, _) in cells if m != "dense"}, key=lambda mi: _method_key((*mi, 0.0)))
        dense = [c for (m, _, _), c in cells.items() if m == "dense"]
        suffix = "" if index == 0 else f"_{index}"
        for kind, xlabel in (("density", "density (fraction of weights active)"), ("flops", "training FLOPs (x dense)")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for method, init in rows:
                keys = sorted(k for k in cells if k[0] == method and k[1] == init)
                xs = [k[2] if kind == "density" else cells[k].field("training_flops") for k in keys]
                ys = [100 * cells[k].mean for k in keys]
                errs = [100 * cells[k].std for k in keys]
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=f"{method} ({init})",
                            linestyle="-" if init == "erk" else "--")
            for cell in dense:
                ax.axhline(100 * cell.mean, color="black", linewidth=1, label=f"dense {cell}")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{dataset}, {model}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = out_dir / f"{stem}_accuracy_vs_{kind}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="result records or directories of them")
    parser.add_argument("--out", default=None, help="write the Markdown here (plots beside it)")
    parser.add_argument("--plots", action="store_true", help="also draw the PNG plots (matplotlib)")
    parser.add_argument("--command", action="append", default=[], help="a command to list as producing the records")
    args = parser.parse_args(argv)
    runs = load_runs([Path(p) for p in args.paths])
    if not runs:
        sys.exit(f"error: no result records under {args.paths}; run recipes/study.py or recipes/train.py first")
    groups = aggregate(runs)
    plots = []
    if args.plots:
        out_dir = Path(args.out).parent if args.out else Path(".")
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = plot(groups, out_dir, Path(args.out).stem if args.out else "results")
    shown, skip = [], False
    for a in (argv if argv is not None else sys.argv[1:]):  # this command, without its --command texts
        if skip or a.startswith("--command="):
            skip = False
            continue
        if a == "--command":
            skip = True
            continue
        shown.append(a)
    commands = [*args.command, ".venv/bin/python recipes/report.py " + " ".join(shown)]
    text = render(groups, commands, plots)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
