"""Step time of this checkout's fxsparse against an earlier commit's, dense beside both, in one run.

The question a design change must answer ("did it cost step time?") cannot be answered by two
runs of benchmarks/step_time.py on different days: this machine's step times drift by 20% over
minutes and its kernels changed between hosts. This script imports both versions into one
process (the earlier one from ``git archive COMMIT fxsparse``, renamed ``fxsparse_at_COMMIT``),
builds dense, the earlier and the current sparse model from the same weights (density 0.1 ERK,
``RigLScheduler`` between updates), eager and under ``torch.compile``, and times rounds of one
ordinary training step of each variant in a new random order each round. The headline is the
per-round paired ratio (median and distribution-free 95% interval): current / earlier, and each
against dense.

    .venv/bin/python benchmarks/ab_commit.py 4797ee8 --models resnet18,resnet50,wrn22_2
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import RoundOrder, ci_text, cpu_name, quiet_repeats, timed_ms  # noqa: E402
from step_time import build_dense  # noqa: E402

import fxsparse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def import_at(commit: str, into: Path):
    """``fxsparse`` as it was at ``commit``, importable beside the current one."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    name = f"fxsparse_at_{sha}"
    archive = subprocess.run(["git", "archive", sha, "fxsparse"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            text = tar.extractfile(member).read().decode()
            target = into / name / Path(member.name).relative_to("fxsparse")
            target.parent.mkdir(parents=True, exist_ok=True)
            # the package's own imports, not the buffer names ("fxsparse_masker", "fxsparse_updates")
            target.write_text(re.sub(r"\bfxsparse\b(?!_)", name, text))
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def make_step(name: str, lib, compiled: bool, batch: tuple[torch.Tensor, torch.Tensor]):
    model: nn.Module = build_dense(name, seed=0)
    scheduler = None
    if lib is not None:
        model = lib.sparsify(model, density=0.1, init="erk", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if lib is not None:
        scheduler = lib.RigLScheduler(model, optimizer, total_steps=10**9, delta_t=10**8)
    module = torch.compile(model) if compiled else model

    def step() -> None:
        F.cross_entropy(module(batch[0]), batch[1]).backward()
        if scheduler is None or scheduler.step():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the earlier commit (anything git rev-parse takes)")
    parser.add_argument("--models", default="resnet18,resnet50,wrn22_2")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--max-other-load", type=float, default=0.15,
                        help="redo a round when other processes used more of the CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        earlier = import_at(args.commit, Path(tmp))
        label = earlier.__name__.removeprefix("fxsparse_at_")
        print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads, batch {args.batch} at 32x32, "
              f"density 0.1 ERK, {args.rounds} rounds; fxsparse at {label} vs this checkout; per-round ratio, "
              "median [95% CI]\n")
        pairs = [("current", "earlier"), ("earlier", "dense"), ("current", "dense")]
        compiles = [False] if args.no_compile else [False, True]
        print("| model | mode | current / earlier | earlier / dense | current / dense | dense ms |")
        print("|---|---|---|---|---|---|")
        for name in args.models.split(","):
            torch.manual_seed(0)
            batch = (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
            for compiled in compiles:
                steps = {"dense": make_step(name, None, compiled, batch),
                         "earlier": make_step(name, earlier, compiled, batch),
                         "current": make_step(name, fxsparse, compiled, batch)}
                for step in steps.values():  # warm-up (compiles the compiled variants)
                    for _ in range(3):
                        step()
                orders = RoundOrder(list(steps), 0)

                def one_round() -> dict[str, float]:
                    return {variant: timed_ms(steps[variant]) for variant in orders.next()}

                rounds, _ = quiet_repeats(one_round, args.rounds, f"{name} rounds",
                                          max_other_load=args.max_other_load, max_attempts=3)
                cells = [ci_text([r[a] / r[b] for r in rounds]) for a, b in pairs]
                dense_ms = statistics.median(r["dense"] for r in rounds)
                mode = "compile" if compiled else "eager"
                print(f"| {name} | {mode} | {' | '.join(cells)} | {dense_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
