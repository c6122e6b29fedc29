"""Fashion-MNIST in a few minutes on a CPU: dense vs static sparse vs RigL, side by side.

Trains :class:`fxsparse.models.SmallCNN` three times with the same seed, data order and
hyperparameters (SGD, momentum 0.9, lr 0.05 with per-step cosine decay, weight decay 5e-4,
batch 128, 2 epochs): dense; static sparse (random ERK mask at density 0.1, never changed); and
RigL (Evci et al., "Rigging the Lottery", ICML 2020: same initial mask, then every 100 steps
drop the smallest-magnitude weights and grow those with the largest dense gradient, drop fraction
0.3 cosine-annealed to zero at 75% of training). Prints a table of test accuracy, achieved
density and wall time, and optionally writes it with the config to a JSON file (each sparse
run's final per-layer counts and its topology updates included) and pictures of each sparse
run's topology (``--figures DIR``, with matplotlib: fxsparse.plot's density bars, churn and mask
heatmaps, and the methods compared).

Run:
    python recipes/demo.py                          # the full demo
    python recipes/demo.py --limit-train 512 --epochs 1 --out runs/smoke.json   # smoke test
    python recipes/demo.py --methods dense,static,set,rigl,snfs --out runs/demo.json --figures docs/img

Measured (defaults, seeds 0, 1 and 2; AMD EPYC, 2 cores, torch.set_num_threads(2), torch 2.14.1
CPU; test accuracy on the 10,000 test images, mean +- std over the 3 seeds):

    method  density  test acc        time per method (train + eval)
    dense   1.0000   91.13 +- 0.14%  34-41 s
    static  0.1000   89.92 +- 0.14%  37-38 s
    rigl    0.1000   90.06 +- 0.20%  34-42 s

Seed 0 alone: dense 91.08%, static 89.76%, RigL 89.83%. RigL beat static on every seed, but only
by 0.07-0.24 points, about one standard deviation: in two epochs RigL makes just 7 topology
updates (every 100 steps until step 703 of 938), so the demo shows the mechanics more than a
significant gain. The whole run (data loading, three trainings, evaluation) took 107-122 s of
wall time, sharing the 2 cores with other light work. ERK at 0.1 keeps conv1 and fc2 dense and gives
conv2 0.067 and fc1 0.098; the achieved overall density is 0.09999810 (whole weights per layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

# Let `python recipes/demo.py` run from a checkout without installing the package.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import fxsparse  # noqa: E402
from fxsparse.data import load_fashion_mnist  # noqa: E402
from fxsparse.models import small_cnn  # noqa: E402

__all__ = ["Config", "MethodResult", "main", "parse_args", "run_method", "structure"]

_METHODS = ("dense", "static", "rigl")  # the default comparison
_ALL_METHODS = ("dense", *fxsparse.available_methods())  # what --methods accepts


# --- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Everything that determines a run; every field has a command-line override."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    density: float = 0.1
    init: str = "erk"
    budget: str = "params"
    delta_t: int = 100
    alpha: float = 0.3
    end_fraction: float = 0.75
    width: int = 32
    seed: int = 0
    threads: int = 2
    methods: tuple[str, ...] = _METHODS
    limit_train: int | None = None
    data_root: str | None = None
    out: str | None = None
    figures: str | None = None  # a folder for the topology figures (PNG); None: none drawn


@dataclass(frozen=True)
class MethodResult:
    """What one training run measured."""

    method: str
    density: float
    test_accuracy: float
    train_loss: float
    seconds: float
    steps: int
    inference_flops: float = 1.0  # sparse / dense inference FLOPs (papers' convention)
    training_flops: float = 1.0  # the method's training FLOPs / dense training's
    size_mb: float = 0.0  # model size: active float32 weights + 1 bit per sparse weight + the rest
    # per masked weight at the end of training: its shape and active count (the per-layer
    # density figures), how many output units (filters, rows) hold no active weight and how many
    # inputs (channels, columns) no active weight reads; see structure()
    structure: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # TopologyScheduler.history: per topology update its step, drop fraction and per layer the
    # active / dropped / grown / regrown counts (plain numbers: the churn figures need no model)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    figures: list[str] = dataclasses.field(default_factory=list)  # the PNGs --figures wrote for this run


def parse_args(argv: list[str] | None = None) -> Config:
    """Build a :class:`Config` from command-line arguments (defaults from the dataclass)."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--density", type=float, default=defaults.density)
    parser.add_argument("--init", default=defaults.init, help="layer-wise density distribution")
    parser.add_argument(
        "--budget", default=defaults.budget, choices=("params", "flops"),
        help="what --density fixes: the parameter count (params) or the inference FLOPs (flops)",
    )
    parser.add_argument("--delta-t", type=int, default=defaults.delta_t)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--end-fraction", type=float, default=defaults.end_fraction)
    parser.add_argument("--width", type=int, default=defaults.width, help="SmallCNN width")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument(
        "--methods",
        default=",".join(defaults.methods),
        help="comma-separated, from " + ", ".join(_ALL_METHODS),
    )
    parser.add_argument("--limit-train", type=int, default=None, help="use the first N images")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST directory")
    parser.add_argument("--out", default=None, help="write config and results to this JSON")
    parser.add_argument(
        "--figures", default=None, metavar="DIR",
        help="write pictures of each sparse run's topology there (PNG, needs matplotlib): demo_<method>_"
        "{density_bars,churn,masks}.png and the methods compared, demo_methods_{density,churn}.png",
    )
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(_ALL_METHODS))
    if unknown or not methods:
        parser.error(f"expected --methods from {', '.join(_ALL_METHODS)}, got {args.methods!r}")
    if args.budget == "flops" and "pruning" in methods:
        parser.error("--budget flops sizes the sparse start; pruning starts dense (use --budget params)")
    if args.limit_train is not None and args.limit_train < 1:
        parser.error(f"expected --limit-train >= 1, got {args.limit_train}")
    return dataclasses.replace(
        defaults,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        density=args.density,
        init=args.init,
        budget=args.budget,
        delta_t=args.delta_t,
        alpha=args.alpha,
        end_fraction=args.end_fraction,
        width=args.width,
        seed=args.seed,
        threads=args.threads,
        methods=methods,
        limit_train=args.limit_train,
        data_root=args.data_root,
        out=args.out or None,
        figures=args.figures or None,  # --figures "": none (scripts/demo.sh asks for them by default)
    )


# --- train and evaluate ------------------------------------------------------------------------


def run_method(
    method: str,
    cfg: Config,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> MethodResult:
    """Train one model with ``method`` ("dense" or a scheduler method) and evaluate it on ``test``.

    Every method starts from the same dense initialisation and sees the batches in the same
    order; the sparse methods also start from the same mask (same ``seed``); "pruning" starts
    dense and prunes to ``cfg.density``. Under ``torchrun`` each of the ranks takes its share of
    every global batch and the model is wrapped in DistributedDataParallel.
    """
    start = time.perf_counter()
    rank, world = _rank_and_world()
    torch.manual_seed(cfg.seed)
    model: nn.Module = small_cnn(num_classes=10, width=cfg.width)
    sparse: fxsparse.SparseGraphModule | None = None
    if method != "dense":
        density = 1.0 if method == "pruning" else cfg.density
        budget = "params" if method == "pruning" else cfg.budget
        example = train[0][:1] if budget == "flops" else None  # FLOPs depend on the input size
        sparse = fxsparse.sparsify(
            model, density=density, init=cfg.init, seed=cfg.seed, budget=budget, example_inputs=example
        )
        model = sparse
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)

    images, labels = train
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    )
    topology: fxsparse.RigLScheduler | None = None
    if sparse is not None:
        topology = fxsparse.RigLScheduler(
            sparse,
            optimizer,
            total_steps=total_steps,
            delta_t=cfg.delta_t,
            alpha=cfg.alpha,
            end_fraction=cfg.end_fraction,
            method=method,
            **({"density": cfg.density, "init": cfg.init} if method == "pruning" else {}),
        )

    order = torch.Generator().manual_seed(cfg.seed)
    running_loss = float("nan")
    model.train()
    with tqdm(total=total_steps, desc=f"{method:>6}", unit="step", leave=False, disable=rank != 0) as bar:
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(labels), generator=order)
            for batch in perm.split(cfg.batch_size):
                batch = batch[rank::world]  # this rank's share of the global batch
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                # A RigL topology update consumes this step's gradient: no weight step then.
                if topology is None or topology.step():
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()
                value = loss.item()
                smoothed = 0.98 * running_loss + 0.02 * value
                running_loss = value if math.isnan(running_loss) else smoothed
                bar.update()
                if bar.n % 25 == 0:
                    bar.set_postfix(loss=f"{running_loss:.3f}")

    accuracy = _evaluate(model, *test)
    density = 1.0 if sparse is None else float(sparse.density)
    seconds = time.perf_counter() - start
    pruning = topology.pruning if topology is not None else None
    costs = _costs(method, sparse if sparse is not None else model, images[:1], cfg, total_steps, pruning)
    history = list(topology.history) if topology is not None else []
    figures = _run_figures(method, sparse, history, cfg) if sparse is not None and cfg.figures and rank == 0 else []
    return MethodResult(
        method=method,
        density=density,
        test_accuracy=accuracy,
        train_loss=running_loss,
        seconds=seconds,
        steps=total_steps,
        structure=structure(sparse) if sparse is not None else {},
        history=history,
        figures=figures,
        **costs,
    )


def structure(sparse: fxsparse.SparseGraphModule) -> dict[str, dict[str, Any]]:
    """Per masked weight, in graph order: its ``shape`` and ``active`` count (all a per-layer
    density figure needs, so recipes/report.py draws one from the record alone) and, for a weight
    of two or more dims, ``outputs`` and ``inputs`` (its dims 0 and 1), ``empty_outputs`` (output
    units with no active weight: a filter or row that computes only its bias) and
    ``unread_inputs`` (input channels or columns that no active weight reads)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mask in sparse.named_masks():
        active = mask.detach().to(torch.bool).cpu()
        out[name] = {"shape": list(active.shape), "active": int(active.sum())}
        if mask.dim() < 2:
            continue
        per_output = active.flatten(1).any(dim=1)
        per_input = active.transpose(0, 1).flatten(1).any(dim=1)
        out[name] |= {
            "outputs": int(per_output.numel()),
            "inputs": int(per_input.numel()),
            "empty_outputs": int((~per_output).sum()),
            "unread_inputs": int((~per_input).sum()),
        }
    return out


def _run_figures(
    method: str, sparse: fxsparse.SparseGraphModule, history: list[dict[str, Any]], cfg: Config
) -> list[str]:
    """One sparse run's pictures (fxsparse.plot), drawn from the live module: where its budget
    went (density bars against ERK and uniform at the target density), how much its topology moved
    at each update (churn; only for a method that grows connections: static never updates and
    pruning only removes) and which connections are alive (mask heatmaps). Returns the paths."""
    import fxsparse.plot as plot

    out = Path(cfg.figures)  # type: ignore[arg-type]
    paths = [out / f"demo_{method}_density_bars.png", out / f"demo_{method}_masks.png"]
    plot.density_bars(sparse, compare=("erk", "uniform"), density=cfg.density, path=paths[0])
    plot.mask_heatmaps(sparse, path=paths[1])
    if any(layer["grown"] for update in history for layer in update["layers"].values()):
        paths.insert(1, out / f"demo_{method}_churn.png")
        plot.churn(history, path=paths[1])
    return [str(p) for p in paths]


def _comparison_figures(record: dict[str, Any], out: Path) -> list[str]:
    """The sparse methods side by side, drawn from the record as recipes/report.py draws a
    study's (so the demo's pictures and the results pages' are the same figures)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # imported as a module (tests, study.py) rather than run
        sys.path.insert(0, here)
    import report

    topologies, _ = report.record_topologies(record, "demo")
    return report.topology_figures(topologies, out, "demo")


def _matplotlib_or_note(cfg: Config, say: Any) -> Config:
    """``cfg`` as given when matplotlib is importable or no figures are asked for; else ``cfg``
    without figures, after a one-line note (matplotlib is optional: training never needs it)."""
    if cfg.figures is None:
        return cfg
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say(f'note: --figures {cfg.figures} needs matplotlib (pip install "fxsparse[plot]"): no figures written')
        return dataclasses.replace(cfg, figures=None)
    return cfg


def _costs(
    method: str, model: nn.Module, example: torch.Tensor, cfg: Config, total_steps: int,
    pruning: fxsparse.GradualPruning | None,
) -> dict[str, float]:
    """FLOP multipliers and model size of the trained model (fxsparse.flop_report); ``pruning``
    is the schedule the run's RigLScheduler followed (None unless it pruned)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    report = fxsparse.flop_report(
        model, example, delta_t=cfg.delta_t, total_steps=total_steps, end_fraction=cfg.end_fraction, pruning=pruning
    )
    return {
        "inference_flops": report.inference_multiplier,
        "training_flops": report.training(method).multiplier,
        "size_mb": report.size_bytes / 1e6,
    }


@torch.no_grad()
def _evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` in eval mode, as a fraction."""
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / len(labels)


# --- report ------------------------------------------------------------------------------------


def _table(results: list[MethodResult]) -> str:
    """Results as an aligned plain-text table."""
    header = ("method", "density", "test acc", "train loss", "time")
    rows = [
        (
            r.method,
            f"{r.density:.4f}",
            f"{100 * r.test_accuracy:.2f}%",
            f"{r.train_loss:.3f}",
            f"{r.seconds:.1f}s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        # Method names left-aligned, numbers right-aligned.
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _hardware() -> str:
    """A one-line description of the CPU and the threads torch uses."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed() -> None:
    """Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1): join the process group (gloo on
    CPU, NCCL with GPUs; this recipe trains on CPU)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def main(argv: list[str] | None = None) -> list[MethodResult]:
    """Run the demo end to end; return the per-method results."""
    cfg = parse_args(argv)
    _init_distributed()
    rank, world = _rank_and_world()
    say = print if rank == 0 else (lambda *args, **kwargs: None)  # one report: other ranks are silent
    cfg = _matplotlib_or_note(cfg, say)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()

    try:
        train = load_fashion_mnist(cfg.data_root, train=True)
        test = load_fashion_mnist(cfg.data_root, train=False)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")  # the message says how to install the data
    if cfg.limit_train is not None:
        train = (train[0][: cfg.limit_train], train[1][: cfg.limit_train])
    say(
        f"Fashion-MNIST: {len(train[1])} train / {len(test[1])} test images; "
        f"SmallCNN(width={cfg.width}), {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"density {cfg.density} ({cfg.init}); {_hardware()}"
        + (f"; {world} processes (torchrun), {cfg.batch_size // world} images each per step" if world > 1 else "")
    )

    results = [run_method(method, cfg, train, test) for method in cfg.methods]
    total = time.perf_counter() - start
    say(_table(results))
    say(f"total wall time {total:.1f}s")
    if rank != 0:
        return results

    record = {
        "recipe": "recipes/demo.py",
        "config": dataclasses.asdict(cfg),
        "results": [dataclasses.asdict(r) for r in results],
        "total_seconds": total,
        # CPU time of this process: what the run cost whatever else shared (or paused) the machine
        "cpu_seconds": time.process_time(),
        "finished_unix": time.time(),
        "hardware": _hardware(),
    }
    if cfg.figures is not None:
        figures = [f for r in results for f in r.figures] + _comparison_figures(record, Path(cfg.figures))
        say(f"wrote {len(figures)} figures to {cfg.figures}" if figures else "no sparse method: no figures")
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        say(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
