"""The real-data study: Fashion-MNIST, SmallCNN, every method at several densities, inits and seeds.

Runs ``recipes/demo.py`` (same model, data, optimizer and schedule) once per cell of the grid
and writes one result record (JSON) per cell under ``--out-dir``; a cell whose record exists is
skipped, so an interrupted study resumes where it stopped. The dense baseline is run once per
seed (it depends on neither density nor init). ``recipes/report.py`` turns the records into
``docs/results.md``.

Run (about a minute per trained model; the default grid trains 93):
    python recipes/study.py --out-dir results/fashion_mnist --workers 2
    python recipes/report.py results/fashion_mnist --out docs/results.md

``--grid extended`` is the extended-training study (docs/extended_training.md), one method per
record: the base schedule is 2 epochs with a topology update every 20 steps (35 updates), and
    1. static, SET, RigL at 1x, 2x and 5x that schedule (ERK, densities 0.05 and 0.02; delta_t
       stays 20, so longer runs make more updates), SNFS and gradual pruning at 1x, dense at 1x
       and 5x;
    2. RigL with uniform and ERK layer densities at a fixed parameter count and at fixed
       inference FLOPs (``--budget params|flops``), densities 0.2 and 0.1 (uniform keeps the first
       layer dense, which alone holds 5% of SmallCNN's FLOPs);
    3. RigL's alpha in {0.1, 0.3, 0.5} x delta_t in {10, 20, 40} at density 0.05;
    4. RigL-SG and RigL-SM against RigL at 0.05 and 0.02,
over seeds 0, 1, 2 (seed 0 of every cell first). About 2.5 hours on 2 cores:
    python recipes/study.py --grid extended --out-dir results/extended --workers 2
    python recipes/report.py results/extended --extended --out docs/extended_training.md --plots
Each record carries each sparse run's final per-layer active counts and its topology updates, from
which ``report.py --plots`` draws the methods' per-layer densities and churn; ``--figures DIR``
also draws each cell's own pictures (recipes/demo.py's ``--figures``, masks included) into
``DIR/<cell name>/``. Each record carries its run's CPU time and finish time; report.py adds
the runs' CPU times and measures the sweep's wall time as the union of the runs' spans, less the
intervals listed in ``pauses.jsonl`` beside the records (``{"paused": t0, "resumed": t1}``, unix
seconds: whoever stops the workers with SIGSTOP to keep the machine quiet, for a benchmark say,
appends one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402
from report import SENSITIVITY_ALPHAS, sensitivity_delta_ts  # noqa: E402

__all__ = ["main", "cells", "extended_cells"]


def cells(seeds: list[int], densities: list[float], inits: list[str], methods: list[str]) -> list[tuple[str, list[str]]]:
    """``(record name, demo arguments)`` for every cell of the grid, dense baselines first."""
    out = []
    for seed in seeds:
        out.append((f"dense-seed{seed}", ["--methods", "dense", "--seed", str(seed)]))
    for seed in seeds:
        for density in densities:
            for init in inits:
                out.append((
                    f"d{density:g}-{init}-seed{seed}",
                    ["--methods", ",".join(methods), "--density", str(density), "--init", init, "--seed", str(seed)],
                ))
    return out


def _run_name(method: str, init: str, budget: str, density: float, epochs: int, delta_t: int, alpha: float, seed: int) -> str:
    if method == "dense":
        return f"dense-e{epochs}-seed{seed}"
    return f"{method}-{init}-{budget}-d{density:g}-e{epochs}-dt{delta_t}-a{alpha:g}-seed{seed}"


def extended_cells(seeds: list[int], base_epochs: int = 2, base_delta_t: int = 20) -> list[tuple[str, list[str]]]:
    """The extended study's runs (see the module docstring), one method each, no duplicates:
    a run that serves several questions (RigL, ERK, 1x, density 0.05) is trained once."""
    runs: list[tuple[str, str, str, float, int, int, float]] = []  # method, init, budget, density, epochs, dt, alpha
    for density in (0.05, 0.02):  # 1. extended training
        for multiple in (1, 2, 5):
            runs += [(m, "erk", "params", density, base_epochs * multiple, base_delta_t, 0.3) for m in ("static", "set", "rigl")]
        runs += [(m, "erk", "params", density, base_epochs, base_delta_t, 0.3) for m in ("snfs", "pruning")]
    runs += [("dense", "-", "-", 1.0, base_epochs * multiple, base_delta_t, 0.3) for multiple in (1, 5)]
    for density in (0.2, 0.1):  # 2. fixed parameters vs fixed FLOPs
        runs += [("rigl", init, budget, density, base_epochs, base_delta_t, 0.3)
                 for init in ("uniform", "erk") for budget in ("params", "flops")]
    for alpha in SENSITIVITY_ALPHAS:  # 3. RigL's hyperparameters
        runs += [("rigl", "erk", "params", 0.05, base_epochs, dt, alpha) for dt in sensitivity_delta_ts(base_delta_t)]
    for density in (0.05, 0.02):  # 4. redistribution
        runs += [(m, "erk", "params", density, base_epochs, base_delta_t, 0.3) for m in ("rigl", "rigl-sg", "rigl-sm")]
    out, seen = [], set()
    for seed in seeds:
        for method, init, budget, density, epochs, delta_t, alpha in runs:
            name = _run_name(method, init, budget, density, epochs, delta_t, alpha, seed)
            if name in seen:
                continue
            seen.add(name)
            args = ["--methods", method, "--epochs", str(epochs), "--seed", str(seed)]
            if method != "dense":
                args += ["--init", init, "--budget", budget, "--density", str(density),
                         "--delta-t", str(delta_t), "--alpha", str(alpha)]
            out.append((name, args))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("main", "extended"), default="main",
                        help="main: every method x density x init (docs/results.md); extended: the "
                        "extended-training study (docs/extended_training.md)")
    parser.add_argument("--out-dir", default=None, help="default results/fashion_mnist (main), results/extended")
    parser.add_argument("--base-epochs", type=int, default=2, help="extended grid: epochs of the 1x schedule")
    parser.add_argument("--base-delta-t", type=int, default=20, help="extended grid: delta_t of the 1x schedule")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--densities", default="0.02,0.05,0.1")
    parser.add_argument("--inits", default="uniform,erk")
    parser.add_argument("--methods", default="static,set,rigl,snfs,pruning")
    parser.add_argument("--workers", type=int, default=1, help="cells trained at once, each in its own process")
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help="draw each cell's topology figures (demo.py --figures, needs matplotlib) into DIR/<cell name>/")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a worker: run one cell
    args, extra = parser.parse_known_args(argv)  # anything else goes to demo.py (e.g. --epochs 1)
    out_dir = Path(args.out_dir or ("results/extended" if args.grid == "extended" else "results/fashion_mnist"))
    if args.only:
        _run_cell(out_dir, args.only, [a for a in extra if a != "--"])
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.grid == "extended":
        grid = extended_cells(seeds, args.base_epochs, args.base_delta_t)
    else:
        grid = cells(seeds, [float(d) for d in args.densities.split(",")], args.inits.split(","), args.methods.split(","))
    if args.figures:  # one folder per cell: demo.py names its figures by method only
        grid = [(name, [*cell, "--figures", str(Path(args.figures) / name)]) for name, cell in grid]
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(name, cell) for name, cell in grid if not (out_dir / f"{name}.json").exists()]
    print(f"{len(grid)} cells, {len(todo)} to run, records in {out_dir}", flush=True)
    if args.dry_run:
        for name, cell in todo:
            print(name, " ".join(cell))
        return
    if args.workers <= 1:
        for i, (name, cell) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {name}", flush=True)
            _run_cell(out_dir, name, [*extra, *cell])
        return
    # several cells at once, each in its own process with one thread (a small CNN uses two
    # threads poorly); records are the same whatever runs beside them
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def work(item: tuple[int, tuple[str, list[str]]]) -> None:
        i, (name, cell) = item
        print(f"[{i}/{len(todo)}] {name} started", flush=True)
        command = [sys.executable, __file__, "--out-dir", str(out_dir), "--only", name, "--", *extra, *cell, "--threads", "1"]
        done = subprocess.run(command, capture_output=True, text=True)
        print(f"[{i}/{len(todo)}] {name} " + ("done" if done.returncode == 0 else f"FAILED: {done.stderr[-500:]}"), flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(work, enumerate(todo, 1)))


def _run_cell(out_dir: Path, name: str, argv: list[str]) -> None:
    partial = out_dir / f"{name}.json.partial"
    demo.main([*argv, "--out", str(partial)])
    partial.replace(out_dir / f"{name}.json")  # a record exists only once its cell finished


if __name__ == "__main__":
    main()
