"""The real-data study: Fashion-MNIST, SmallCNN, every method at several densities, inits and seeds.

Runs ``recipes/demo.py`` (same model, data, optimizer and schedule) once per cell of the grid
and writes one result record (JSON) per cell under ``--out-dir``; a cell whose record exists is
skipped, so an interrupted study resumes where it stopped. The dense baseline is run once per
seed (it depends on neither density nor init). ``recipes/report.py`` turns the records into
``docs/results.md``.

Run (about a minute per trained model; the default grid trains 93):
    python recipes/study.py --out-dir results/fashion_mnist --workers 2
    python recipes/report.py results/fashion_mnist --out docs/results.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402

__all__ = ["main", "cells"]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="results/fashion_mnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--densities", default="0.02,0.05,0.1")
    parser.add_argument("--inits", default="uniform,erk")
    parser.add_argument("--methods", default="static,set,rigl,snfs,pruning")
    parser.add_argument("--workers", type=int, default=1, help="cells trained at once, each in its own process")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a worker: run one cell
    args, extra = parser.parse_known_args(argv)  # anything else goes to demo.py (e.g. --epochs 1)
    if args.only:
        _run_cell(Path(args.out_dir), args.only, [a for a in extra if a != "--"])
        return
    grid = cells(
        [int(s) for s in args.seeds.split(",")],
        [float(d) for d in args.densities.split(",")],
        args.inits.split(","),
        args.methods.split(","),
    )
    out_dir = Path(args.out_dir)
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
            _run_cell(out_dir, name, [*cell, *extra])
        return
    # several cells at once, each in its own process with one thread (a small CNN uses two
    # threads poorly); records are the same whatever runs beside them
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def work(item: tuple[int, tuple[str, list[str]]]) -> None:
        i, (name, cell) = item
        print(f"[{i}/{len(todo)}] {name} started", flush=True)
        command = [sys.executable, __file__, "--out-dir", str(out_dir), "--only", name, "--", *cell, *extra, "--threads", "1"]
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
