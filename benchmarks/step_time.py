"""Step time, topology-update cost, sparsify time and peak memory of fxsparse on CPU.

What it measures, per model (WRN-22-2 and timm resnet18 / resnet50 at 32x32, timm
vit_tiny_patch16_224 at 224x224; 10 classes, batch 32, one fixed random batch):

1. The median wall time of one training step (forward, cross-entropy backward, SGD step with
   lr 0.01, momentum 0.9, weight decay 5e-4, zero_grad) for five variants built from the same
   seeded dense model: ``dense``; ``fxsparse`` (density 0.1, ERK, trained with its RigLScheduler:
   an ordinary step between topology updates); ``rigl-torch`` (the peer library's RigLScheduler at
   dense_allocation 0.1, timed on its non-update steps only); ``dense+compile`` and
   ``fxsparse+compile`` (``torch.compile``, inductor; compile time reported, not timed).
   The variants are timed interleaved, one step of each in turn (a round), so that the
   machine's drift hits them all alike; the headline figures are per-round ratios of two
   variants (fxsparse / dense, fxsparse / rigl-torch, compiled / compiled dense), their median
   and a distribution-free 95% confidence interval, judged against the performance targets.
2. The cost of one topology update (fxsparse ``rigl_step(0.3)``, rigl-torch ``_rigl_step()``),
   each after the armed backward (fxsparse's reduction to growth candidates counted), as a multiple of the dense
   eager step and amortized over delta_t = 100 steps.
3. The wall time of ``fxsparse.sparsify()`` (median of 3).
4. Peak resident memory (VmHWM) of 5 ordinary training steps of each variant and of one more
   step that updates the topology, each variant in a fresh subprocess (``--child MODEL
   VARIANT``) with glibc's mmap threshold fixed (see ``CHILD_MALLOC``).

The peer library goes into the same environment first (``pip install -e .[bench]`` installs
``rigl-torch==0.5.2``; ``--no-peer`` leaves it out). Run (from the repository root; the full
run takes about 30 minutes on 2 cores):

    python benchmarks/step_time.py --out docs/performance.md          # everything
    python benchmarks/step_time.py --models wrn22_2 --steps 5 --no-compile --no-memory  # smoke

It prints the tables to stdout, progress to stderr, writes the raw timings to ``--json`` and,
with ``--out``, a Markdown report.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(_REPO_ROOT))

import timm  # noqa: E402

import fxsparse  # noqa: E402
import fxsparse.models  # noqa: E402  (registers "wrn22_2" with timm)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/measure.py, however this file is loaded
from measure import (  # noqa: E402, F401
    LibraryClock, OtherLoad, RoundOrder, ci_text, cpu_name, median_ci, quiet_repeats, timed_ms, verdict,
)

__all__ = ["Config", "ModelResult", "main", "parse_args"]

# model name -> input resolution
MODELS: dict[str, int] = {
    "wrn22_2": 32,
    "resnet18": 32,
    "resnet50": 32,
    "vit_tiny_patch16_224": 224,
}
VARIANTS = ("dense", "fxsparse", "fxsparse-plain", "rigl-torch", "dense+compile", "fxsparse+compile")
NUM_CLASSES = 10


# --- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Everything that determines a run; every field has a command-line override."""

    models: tuple[str, ...] = tuple(MODELS)
    steps: int = 60  # timed rounds (one step of each variant) per model at 32x32
    large_steps: int = 20  # ... per model at 224x224 (about ten times slower a step)
    warmup: int = 3  # untimed steps per variant (the first one compiles the compiled variants)
    update_reps: int = 5
    library_steps: int = 10  # instrumented steps per library (time inside its own code)
    sparsify_reps: int = 3
    memory_steps: int = 5
    max_other_load: float = 0.15  # a repeat is redone when other processes took more CPU
    max_attempts: int = 3  # ... at most this many times the wanted number of repeats in all
    batch: int = 32
    density: float = 0.1
    init: str = "erk"
    drop_fraction: float = 0.3
    delta_t: int = 100  # for the amortized update overhead
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    threads: int = 2
    seed: int = 0
    compile: bool = True
    no_compile_models: tuple[str, ...] = ()
    peer: bool = True
    memory: bool = True
    out: str | None = None
    json: str | None = "benchmarks/results/step_time.json"
    report_from: str | None = None  # render the report from this JSON instead of measuring

    def steps_for(self, model: str) -> int:
        return self.large_steps if MODELS[model] >= 224 else self.steps

    def variants(self, model: str) -> tuple[str, ...]:
        compiled = self.compile and model not in self.no_compile_models
        return tuple(
            v for v in VARIANTS
            if (self.peer or v != "rigl-torch") and (compiled or not v.endswith("+compile"))
        )


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None = None) -> tuple[Config, tuple[str, str] | None]:
    """A :class:`Config` from the command line, and ``(model, variant)`` when run as a child."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(defaults.models),
                        help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="timed rounds per model at 32x32")
    parser.add_argument("--large-steps", type=int, default=defaults.large_steps,
                        help="timed rounds per model at 224x224")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--update-reps", type=int, default=defaults.update_reps)
    parser.add_argument("--library-steps", type=int, default=defaults.library_steps,
                        help="instrumented steps per library (time inside its own code)")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--density", type=float, default=defaults.density)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-other-load", type=float, default=defaults.max_other_load,
                        help="redo a timed repeat when other processes used more of the CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip the +compile variants")
    parser.add_argument("--no-compile-models", default="",
                        help="comma list of models whose compile is skipped (too slow)")
    parser.add_argument("--no-peer", action="store_true", help="skip rigl-torch")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--json", default=defaults.json, help="raw results ('' to skip)")
    parser.add_argument("--report-from", default=None, metavar="JSON",
                        help="measure nothing: render the report from a --json file of a run")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"),
                        help="internal: train one variant and print its peak RSS")
    args = parser.parse_args(argv)

    models = _comma_list(args.models)
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"expected --models from {', '.join(MODELS)}, got {args.models!r}")
    if min(args.steps, args.large_steps, args.warmup, args.update_reps, args.library_steps) < 1:
        parser.error("expected --steps, --large-steps, --warmup, --update-reps and "
                     "--library-steps >= 1")
    if args.child and (args.child[0] not in MODELS or args.child[1] not in VARIANTS):
        parser.error(f"expected --child MODEL VARIANT from {list(MODELS)} x {list(VARIANTS)}")
    cfg = dataclasses.replace(
        defaults,
        models=models,
        steps=args.steps,
        large_steps=args.large_steps,
        warmup=args.warmup,
        update_reps=args.update_reps,
        library_steps=args.library_steps,
        batch=args.batch,
        density=args.density,
        threads=args.threads,
        seed=args.seed,
        max_other_load=args.max_other_load,
        compile=not args.no_compile,
        no_compile_models=_comma_list(args.no_compile_models),
        peer=not args.no_peer,
        memory=not args.no_memory,
        out=args.out,
        json=args.json or None,
        report_from=args.report_from,
    )
    return cfg, (tuple(args.child) if args.child else None)  # type: ignore[return-value]


# --- models and variants -----------------------------------------------------------------------


def build_dense(name: str, seed: int) -> nn.Module:
    """The seeded dense model every variant of ``name`` starts from."""
    torch.manual_seed(seed)
    if name == "wrn22_2":
        model = fxsparse.models.wrn22_2(num_classes=NUM_CLASSES)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    return model.train()


def make_batch(name: str, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    size = MODELS[name]
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch, 3, size, size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (cfg.batch,), generator=generator)
    return images, labels


@dataclass
class Trainer:
    """One variant: the module that is called, its optimizer and, for the peer, its scheduler."""

    variant: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    sparse: fxsparse.SparseGraphModule | None = None  # the eager fxsparse module
    peer: Any = None  # rigl_torch.RigL.RigLScheduler
    topology: fxsparse.RigLScheduler | None = None  # fxsparse's scheduler

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(self.module(images), labels)
        loss.backward()
        # both libraries' loops: the scheduler is called after every backward and says whether
        # the optimizer steps (False on update steps, which the timed window avoids)
        if self.peer is not None:
            go = self.peer()
        elif self.topology is not None:
            go = self.topology.step()
        else:
            go = True
        if go:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def peer_delta(cfg: Config, steps_before_update: int) -> int:
    """rigl-torch's delta: ``cfg.delta_t`` unless the run is long enough to reach an update.

    Its backward hooks keep a dense gradient on the step before an update (step % delta ==
    delta - 1), so delta must exceed every step count the timed window reaches.
    """
    return max(cfg.delta_t, steps_before_update + 2)


def make_trainer(variant: str, dense: nn.Module, cfg: Config, *, own: bool = False, update_at: int | None = None) -> Trainer:
    """Builds ``variant`` from ``dense``: a copy unless ``own`` (sparsify() always copies).

    ``update_at``: the schedulers' first topology update falls on that step (the memory child
    measures an update step's peak); by default no step the benchmark runs is an update."""
    base = dense if own or variant.startswith("fxsparse") else copy.deepcopy(dense)

    def sgd(module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    if variant.startswith("fxsparse"):
        sparse = fxsparse.sparsify(dense, density=cfg.density, init=cfg.init, seed=cfg.seed)
        sparse.train()
        module: nn.Module = torch.compile(sparse) if variant.endswith("+compile") else sparse
        optimizer = sgd(sparse)
        if variant == "fxsparse-plain":  # a plain loop: no scheduler, nothing hooks the optimizer
            sparse.arm_growth(False)
            return Trainer(variant, module, optimizer, sparse=sparse)
        # the loop users run; no update falls inside the timed window, so every timed step is
        # an ordinary one (capture disarmed: no dense growth gradient kept)
        topology = fxsparse.RigLScheduler(sparse, optimizer, total_steps=10**9, delta_t=update_at or 10**8)
        return Trainer(variant, module, optimizer, sparse=sparse, topology=topology)
    if variant == "rigl-torch":
        from rigl_torch.RigL import RigLScheduler

        optimizer = sgd(base)
        torch.manual_seed(cfg.seed)  # its random initial masks come from the global generator
        scheduler = RigLScheduler(
            base, optimizer, dense_allocation=cfg.density, T_end=10**9,
            delta=update_at or peer_delta(cfg, cfg.warmup + max(cfg.max_attempts * cfg.steps, cfg.memory_steps)),
            alpha=cfg.drop_fraction,
        )
        return Trainer(variant, base, optimizer, peer=scheduler)
    module = torch.compile(base) if variant == "dense+compile" else base
    return Trainer(variant, module, sgd(base))


def masked_fraction(trainer: Trainer, total: int) -> float:
    """Fraction of the model's parameters that sit under a mask in this variant."""
    if trainer.sparse is not None:
        return sum(m.numel() for m in trainer.sparse.masks.values()) / total
    if trainer.peer is not None:
        return sum(n for n, s in zip(trainer.peer.N, trainer.peer.S) if s > 0) / total
    return 0.0


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


# --- measurements ------------------------------------------------------------------------------


@dataclass
class ModelResult:
    """Everything measured on one model (times in milliseconds, memory in MB)."""

    model: str
    image_size: int
    params: int
    steps_ms: dict[str, list[float]] = field(default_factory=dict)
    rounds: list[dict[str, float]] = field(default_factory=list)  # one step of each variant
    compile_s: dict[str, float] = field(default_factory=dict)
    graphs: dict[str, tuple[int, int]] = field(default_factory=dict)  # (graphs, graph breaks)
    masked_fraction: dict[str, float] = field(default_factory=dict)
    update_ms: dict[str, list[float]] = field(default_factory=dict)
    # variant -> part -> ms inside the library's own code, one value per instrumented step
    library_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sparsify_ms: list[float] = field(default_factory=list)
    baseline_mb: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)  # over the ordinary steps
    update_peak_mb: dict[str, float] = field(default_factory=dict)  # ... and one topology update after them
    errors: dict[str, str] = field(default_factory=dict)
    discarded: dict[str, int] = field(default_factory=dict)  # repeats run while the CPU was busy

    def median_step(self, variant: str) -> float | None:
        times = self.steps_ms.get(variant)
        return statistics.median(times) if times else None

    def paired(self, variant: str, reference: str) -> list[float]:
        """Per-round ratios ``variant / reference`` over the rounds where both ran: the two
        steps of a round are seconds apart, so the machine's drift cancels in each ratio."""
        return [r[variant] / r[reference] for r in self.rounds if variant in r and reference in r]


def measure_sparsify(dense: nn.Module, cfg: Config, result: ModelResult) -> None:
    times, discarded = quiet_repeats(
        lambda: timed_ms(fxsparse.sparsify, dense, cfg.density, cfg.init), cfg.sparsify_reps, "sparsify",
        max_other_load=cfg.max_other_load, max_attempts=cfg.max_attempts,
    )
    result.sparsify_ms = times
    result.discarded["sparsify"] = discarded


def build_and_warm_up(
    name: str, dense: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], cfg: Config,
    result: ModelResult,
) -> dict[str, Trainer]:
    """Every variant built and warmed up; a variant that fails is recorded and left out."""
    trainers: dict[str, Trainer] = {}
    for variant in cfg.variants(name):
        print(f"[{name}] {variant}: build and warm up", file=sys.stderr, flush=True)
        try:
            counters.clear()
            trainer = make_trainer(variant, dense, cfg)
            first_ms = timed_ms(trainer.step, *batch)
            for _ in range(cfg.warmup - 1):
                trainer.step(*batch)
            if variant.endswith("+compile"):
                result.compile_s[variant] = first_ms / 1e3
                # more than one graph means graph breaks or recompiles during the warm-up
                result.graphs[variant] = (
                    counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
                )
                print(f"[{name}] {variant}: compiled in {first_ms / 1e3:.1f} s (first step), "
                      f"graphs, graph breaks: {result.graphs[variant]}", file=sys.stderr,
                      flush=True)
        except Exception as error:  # recorded in the report instead of a number
            result.errors[variant] = _short(error)
            print(f"[{name}] {variant} FAILED: {result.errors[variant]}", file=sys.stderr)
            continue
        trainers[variant] = trainer
        result.masked_fraction[variant] = masked_fraction(trainer, result.params)
    return trainers


def time_interleaved(
    name: str, trainers: dict[str, Trainer], batch: tuple[torch.Tensor, torch.Tensor],
    cfg: Config, result: ModelResult,
) -> None:
    """Rounds of one step of each variant in turn (in a fresh random order each round), until
    ``cfg.steps`` rounds ran on a quiet machine."""
    orders = RoundOrder(list(trainers), cfg.seed)

    def one_round() -> dict[str, float]:
        times = {}
        for variant in orders.next():
            if variant in result.errors:
                continue
            try:
                times[variant] = timed_ms(trainers[variant].step, *batch)
            except Exception as error:
                result.errors[variant] = _short(error)
        return times

    rounds, result.discarded["steps"] = quiet_repeats(
        one_round, cfg.steps_for(name), f"{name} steps",
        max_other_load=cfg.max_other_load, max_attempts=cfg.max_attempts,
    )
    result.rounds = rounds
    for variant in trainers:
        if variant not in result.errors:
            result.steps_ms[variant] = [r[variant] for r in rounds if variant in r]


def _fxsparse_update_ms(
    trainer: Trainer, batch: tuple[torch.Tensor, torch.Tensor], cfg: Config
) -> float:
    """One update as the scheduler runs it: the armed backward reduces each layer's gradient
    to growth candidates (that time is counted), then ``rigl_step`` selects and applies."""
    from fxsparse.masking import Masker
    from fxsparse.scheduler import growth_candidate_counts

    sparse = trainer.sparse
    assert sparse is not None
    sparse.arm_growth(True, candidates=growth_candidate_counts(sparse, cfg.drop_fraction))
    clock = LibraryClock([(Masker, "_reduce", "reduce")], trainer.optimizer, None)
    with clock:
        F.cross_entropy(sparse(batch[0]), batch[1]).backward()
    elapsed = clock.parts["reduce"] + timed_ms(sparse.rigl_step, cfg.drop_fraction, trainer.optimizer)
    trainer.optimizer.zero_grad(set_to_none=True)
    sparse.arm_growth(False)
    return elapsed


def _peer_update_ms(trainer: Trainer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    scheduler = trainer.peer
    # Its hooks keep the dense gradient only when the next scheduler call is an update.
    scheduler.step = scheduler.delta_T - 1
    for hook in scheduler.backward_hook_objects:
        if hook is not None:
            hook.dense_grad = None
    F.cross_entropy(trainer.module(batch[0]), batch[1]).backward()
    elapsed = timed_ms(scheduler._rigl_step)  # what scheduler() runs on an update step
    trainer.optimizer.zero_grad(set_to_none=True)
    scheduler.step = 0
    return elapsed


def measure_updates(
    trainers: dict[str, Trainer], batch: tuple[torch.Tensor, torch.Tensor], cfg: Config,
    result: ModelResult,
) -> None:
    """``cfg.update_reps`` topology updates per library, interleaved, backward untimed."""
    jobs = {"fxsparse": lambda t: _fxsparse_update_ms(t, batch, cfg),
            "rigl-torch": lambda t: _peer_update_ms(t, batch)}
    jobs = {v: job for v, job in jobs.items() if v in trainers and v not in result.errors}

    def one_rep() -> dict[str, float]:
        # the timed calls only: the armed forward/backward before each is not part of the cost
        times = {}
        for variant, job in jobs.items():
            key = f"update:{variant}"
            if key in result.errors:
                continue
            try:
                times[variant] = job(trainers[variant])
            except Exception as error:
                result.errors[key] = _short(error)
        return times

    reps, result.discarded["updates"] = quiet_repeats(
        one_rep, cfg.update_reps, "updates", max_other_load=cfg.max_other_load, max_attempts=cfg.max_attempts
    )
    for variant in jobs:
        if f"update:{variant}" not in result.errors:
            result.update_ms[variant] = [r[variant] for r in reps if variant in r]


def library_entries(trainer: Trainer) -> tuple[list[tuple[Any, str, str]], str | None]:
    """What each library runs on an ordinary step, by part of the step."""
    if trainer.sparse is not None:
        from fxsparse import masking, scheduler

        return [
            (masking.Masker, "prologue", "forward prologue"),
            (masking.Masker, "__call__", "masked-weight nodes"),
            (masking._GradMaskHook, "__call__", "gradient mask"),
            (masking.Masker, "flush_gradients", "gradient mask"),
            (scheduler.RigLScheduler, "step", "scheduler"),
        ], None
    from rigl_torch import RigL

    return [
        (RigL.IndexMaskHook, "__call__", "gradient mask"),
        (RigL.RigLScheduler, "__call__", "scheduler"),
        (RigL.RigLScheduler, "reset_momentum", "optimizer hooks"),
        (RigL.RigLScheduler, "apply_mask_to_weights", "optimizer hooks"),
    ], None


def two_pass_floor_ms(sparse: fxsparse.SparseGraphModule) -> float:
    """The floor of exact masking that trusts nothing: two weight-sized in-place passes over
    every masked weight (one zeroing the inactive weights before a forward, one the inactive
    gradient entries after a backward), each with the fastest such kernel measured here
    (``bits *= mask``, ``benchmarks/mask_dtype.py``). Both passes run on the weights (the
    gradients are gone after ``zero_grad``): same sizes, dtypes and layouts; inactive entries
    are already zero, so the passes change nothing."""
    from fxsparse.masking import mask_on, zero_inactive_

    pairs = [(sparse._leaf_weight(f), mask_on(sparse.get_buffer(site.mask), sparse._leaf_weight(f)))
             for f, site in sparse._fxsparse.sites.items() if sparse.layout_of(f).keeps_parameter]
    start = time.perf_counter()
    for _ in range(2):
        for weight, mask in pairs:
            zero_inactive_(weight, mask)
    return (time.perf_counter() - start) * 1e3


def measure_library_time(
    trainers: dict[str, Trainer], batch: tuple[torch.Tensor, torch.Tensor], cfg: Config,
    result: ModelResult,
) -> None:
    """``cfg.library_steps`` ordinary eager steps per library with its entry points timed;
    after each fxsparse step, the two-pass floor (:func:`two_pass_floor_ms`), with the cache
    as the next step's prologue finds it."""
    for variant in ("fxsparse", "rigl-torch"):
        trainer = trainers.get(variant)
        if trainer is None or variant in result.errors:
            continue
        entries, hook_part = library_entries(trainer)
        samples: dict[str, list[float]] = {}
        floor: list[float] = []
        with LibraryClock(entries, trainer.optimizer, hook_part) as clock:
            for _ in range(cfg.library_steps):
                clock.reset()
                trainer.step(*batch)
                for part, ms in clock.parts.items():
                    samples.setdefault(part, []).append(ms)
                if trainer.sparse is not None:
                    floor.append(two_pass_floor_ms(trainer.sparse))
        samples["total"] = [sum(ms) for ms in zip(*samples.values())]
        if floor:
            samples["two-pass floor"] = floor
        result.library_ms[variant] = samples


# The memory children's allocator setting. glibc returns a block above its mmap threshold to the
# system when it is freed, and by default raises that threshold (up to 32 MiB) each time it
# frees such a block, so which blocks later stay cached in the heap depends on the order of
# earlier allocations: the peak RSS of one and the same run moved by +-15 MB (resnet18, dense:
# 918-934 MB in two runs). With the threshold fixed every block of 128 KiB or more is mapped
# when allocated and unmapped when freed, so the resident set follows the live tensors: repeats
# agree to 1 MB. Every variant runs under the same setting.
CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def measure_memory(name: str, cfg: Config, result: ModelResult) -> None:
    """Peak RSS of each variant, each in a fresh process running ``--child``."""
    for variant in cfg.variants(name):
        print(f"[{name}] {variant}: peak memory (subprocess)", file=sys.stderr, flush=True)
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child", name, variant,
            "--batch", str(cfg.batch), "--density", str(cfg.density),
            "--threads", str(cfg.threads), "--seed", str(cfg.seed), "--json", "",
        ]
        done = subprocess.run(command, capture_output=True, text=True, cwd=_REPO_ROOT,
                              env={**os.environ, **CHILD_MALLOC})
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            result.errors[f"memory:{variant}"] = f"exit {done.returncode}: {tail}"[:300]
            continue
        report = json.loads(lines[-1])
        result.baseline_mb[variant] = report["baseline_kb"] / 1024
        result.peak_mb[variant] = report["peak_kb"] / 1024
        if report.get("update_peak_kb") is not None:
            result.update_peak_mb[variant] = report["update_peak_kb"] / 1024


def _proc_status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status (this benchmark expects Linux)")


def run_child(name: str, variant: str, cfg: Config) -> None:
    """``cfg.memory_steps`` training steps of one variant, then (for the variants with a
    scheduler) one step that updates the topology; prints the peak RSS after each as JSON.

    The peak is VmHWM, the high-water mark of this process's own address space. ``ru_maxrss``
    is printed too but not used: after fork + exec it starts from the parent's peak (the parent
    of a full run holds every model), so every child would report the same number.
    """
    batch = make_batch(name, cfg)
    baseline_kb = _proc_status_kb("VmRSS")  # torch, timm and fxsparse imported, no model yet
    dense = build_dense(name, cfg.seed)
    trainer = make_trainer(variant, dense, cfg, own=True, update_at=cfg.memory_steps + 1)
    del dense
    for _ in range(cfg.memory_steps):
        trainer.step(*batch)
    peak_kb = _proc_status_kb("VmHWM")
    update_peak_kb = None
    if trainer.topology is not None or trainer.peer is not None:
        trainer.step(*batch)  # step memory_steps + 1: the dense growth gradient and the update
        update_peak_kb = _proc_status_kb("VmHWM")
        updated = trainer.topology.last_changes if trainer.topology is not None else trainer.peer.rigl_steps
        if not updated:
            raise RuntimeError(f"{variant}: step {cfg.memory_steps + 1} was expected to update the topology")
    print(json.dumps({
        "model": name, "variant": variant, "baseline_kb": baseline_kb,
        "peak_kb": peak_kb, "update_peak_kb": update_peak_kb,
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


def start_inductor() -> float:
    """Compiles a tiny model once; returns seconds. Inductor's one-time start-up (imports,
    compiler checks, worker pool) would otherwise be charged to the first compiled variant."""
    tiny = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(tiny)
    start = time.perf_counter()
    compiled(torch.randn(4, 8)).sum().backward()
    return time.perf_counter() - start


def run_model(name: str, cfg: Config) -> ModelResult:
    dense = build_dense(name, cfg.seed)
    batch = make_batch(name, cfg)
    result = ModelResult(name, MODELS[name], sum(p.numel() for p in dense.parameters()))
    torch._dynamo.reset()  # no compiled code or recompile budget carried over between models

    measure_sparsify(dense, cfg, result)
    trainers = build_and_warm_up(name, dense, batch, cfg, result)
    if "dense" not in trainers:
        raise RuntimeError(f"{name}: the dense baseline failed: {result.errors.get('dense')}")
    time_interleaved(name, trainers, batch, cfg, result)
    measure_library_time(trainers, batch, cfg, result)
    measure_updates(trainers, batch, cfg, result)
    del trainers
    return result


# --- report ------------------------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference <= 0:
        return "-"
    return f"{value / reference:.2f}x"


def _cell(result: ModelResult, variant: str, reference: float | None) -> str:
    if variant in result.errors:
        return f"failed ({result.errors[variant].split(':')[0]})"
    median = result.median_step(variant)
    if median is None:
        return "-"
    return f"{median:.1f} ({_ratio(median, reference)})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def step_table(results: list[ModelResult]) -> str:
    header = ["model", "input", "dense ms", *[f"{v} ms (x dense)" for v in VARIANTS[1:]],
              "fxsparse+compile / dense+compile"]
    rows = []
    for r in results:
        dense = r.median_step("dense")
        rows.append([
            r.model, f"{r.image_size}x{r.image_size}", f"{dense:.1f}",
            *[_cell(r, v, dense) for v in VARIANTS[1:]],
            _ratio(r.median_step("fxsparse+compile"), r.median_step("dense+compile")),
        ])
    return _table(header, rows)


# (variant, reference) pairs whose per-round ratios the report gives
PAIRS = (
    ("fxsparse", "dense"), ("fxsparse-plain", "dense"), ("rigl-torch", "dense"), ("fxsparse", "rigl-torch"),
    ("fxsparse+compile", "dense+compile"),
)

# The performance targets. Eager (issue 28, restating issue 3's fixed ratios to dense): the
# library's own time per ordinary step within FLOOR_TARGET of the two-pass floor, and the step
# below rigl-torch's; the compiled step over the compiled dense step, the update in dense steps,
# sparsify(resnet50) in ms, the update step's peak memory.
FLOOR_TARGET = 1.3
COMPILE_TARGET = 1.05
UPDATE_TARGET = 1.0
SPARSIFY_TARGET_MS = {"resnet50": 2000.0}
MEMORY_TARGET = 1.05  # whole-process peak RSS over dense's (issue 17), on these models
MEMORY_TARGET_MODELS = ("resnet18", "resnet50")


def _paired_cell(result: ModelResult, variant: str, reference: str) -> str:
    return ci_text(result.paired(variant, reference))


def paired_table(results: list[ModelResult]) -> str:
    header = ["model", "rounds", *[f"{v} / {ref}" for v, ref in PAIRS]]
    rows = [[r.model, str(len(r.rounds)), *[_paired_cell(r, v, ref) for v, ref in PAIRS]]
            for r in results]
    return _table(header, rows)


def target_rows(results: list[ModelResult]) -> list[list[str]]:
    """One row per target and model: what was measured, the target, the verdict."""
    rows = []

    def paired_row(what: str, r: ModelResult, variant: str, reference: str, target: float,
                   strict: bool = False) -> None:
        ratios = r.paired(variant, reference)
        if not ratios:
            rows.append([what, r.model, "not measured", f"{target:.2f}", "-"])
            return
        median, low, high = median_ci(ratios)
        rows.append([what, r.model, f"{median:.3f} [{low:.3f}, {high:.3f}]",
                     f"{'<' if strict else '<='} {target:.2f}",
                     verdict(median, high, target, strict)])

    for r in results:
        paired_row("fxsparse / rigl-torch, eager", r, "fxsparse", "rigl-torch", 1.0, strict=True)
    for r in results:
        if "fxsparse+compile" in r.steps_ms:
            paired_row("fxsparse+compile / dense+compile", r, "fxsparse+compile",
                       "dense+compile", COMPILE_TARGET)
    for r in results:
        ratios = floor_ratios(r.library_ms.get("fxsparse", {}))
        if ratios:
            median, low, high = median_ci(ratios)
            rows.append(["fxsparse own time / two-pass floor, ordinary step", r.model,
                         f"{median:.2f} [{low:.2f}, {high:.2f}]", f"<= {FLOOR_TARGET:.2f}",
                         verdict(median, high, FLOOR_TARGET)])
    for r in results:
        dense = r.median_step("dense")
        if "fxsparse" in r.update_ms and dense:
            cost = statistics.median(r.update_ms["fxsparse"]) / dense
            rows.append(["one update, in dense steps", r.model, f"{cost:.2f}",
                         f"<= {UPDATE_TARGET:.2f}", "met" if cost <= UPDATE_TARGET else "not met"])
    for r in results:
        dense = r.peak_mb.get("dense")
        for what, peaks in (("peak memory / dense, ordinary steps", r.peak_mb),
                            ("peak memory / dense, with an update step", r.update_peak_mb)):
            if r.model in MEMORY_TARGET_MODELS and dense and "fxsparse" in peaks:
                ratio = peaks["fxsparse"] / dense
                rows.append([what, r.model, f"{ratio:.3f}", f"<= {MEMORY_TARGET:.2f}",
                             "met" if ratio <= MEMORY_TARGET else "not met"])
    for r in results:
        if r.model in SPARSIFY_TARGET_MS and r.sparsify_ms:
            ms = statistics.median(r.sparsify_ms)
            target = SPARSIFY_TARGET_MS[r.model]
            rows.append(["sparsify() ms", r.model, f"{ms:.0f}", f"< {target:.0f}",
                         "met" if ms < target else "not met"])
    return rows


def targets_table(results: list[ModelResult]) -> str:
    return _table(["target", "model", "measured", "target", "verdict"], target_rows(results))


LIBRARY_PARTS = ("forward prologue", "masked-weight nodes", "gradient mask", "scheduler",
                 "optimizer hooks", "total", "two-pass floor")


def floor_ratios(parts: dict[str, list[float]]) -> list[float]:
    """Per instrumented step: the library's own time over the two-pass floor of that step."""
    return [t / f for t, f in zip(parts.get("total", []), parts.get("two-pass floor", [])) if f > 0]


def library_table(results: list[ModelResult]) -> str:
    header = ["model", "library", *[f"{part} ms" for part in LIBRARY_PARTS], "total / floor",
              "total / dense step"]
    rows = []
    for r in results:
        dense = r.median_step("dense")
        for variant, parts in r.library_ms.items():
            cells = [f"{statistics.median(parts[p]):.2f}" if p in parts else "-"
                     for p in LIBRARY_PARTS]
            total = statistics.median(parts["total"])
            ratios = floor_ratios(parts)
            rows.append([r.model, variant, *cells, f"{statistics.median(ratios):.2f}" if ratios else "-",
                         f"{100 * total / dense:.2f}%" if dense else "-"])
    return _table(header, rows)


def compile_table(results: list[ModelResult]) -> str:
    header = ["model", "dense+compile first step (s)", "graphs / breaks",
              "fxsparse+compile first step (s)", "graphs / breaks"]
    rows = []
    for r in results:
        cells = []
        for v in ("dense+compile", "fxsparse+compile"):
            if v in r.errors:
                cells += [f"failed ({r.errors[v].split(':')[0]})", "-"]
            elif v in r.compile_s:
                graphs, breaks = r.graphs[v]
                cells += [f"{r.compile_s[v]:.1f}", f"{graphs} / {breaks}"]
            else:
                cells += ["skipped", "-"]
        rows.append([r.model, *cells])
    return _table(header, rows)


def update_table(results: list[ModelResult], cfg: Config) -> str:
    header = ["model", "dense step ms",
              "fxsparse rigl_step ms", "x dense step", f"amortized / {cfg.delta_t} steps",
              "rigl-torch _rigl_step ms", "x dense step", f"amortized / {cfg.delta_t} steps"]
    rows = []
    for r in results:
        dense = r.median_step("dense")
        row = [r.model, f"{dense:.1f}"]
        for v in ("fxsparse", "rigl-torch"):
            error = r.errors.get(v) or r.errors.get(f"update:{v}")
            if error:
                row += [f"failed ({error.split(':')[0]})", "-", "-"]
            elif v in r.update_ms:
                cost = statistics.median(r.update_ms[v])
                multiple = cost / dense
                row += [f"{cost:.1f}", f"{multiple:.2f}", f"{100 * multiple / cfg.delta_t:.2f}%"]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    return _table(header, rows)


def sparsify_table(results: list[ModelResult]) -> str:
    header = ["model", "parameters", "sparsify() ms (median of 3)",
              "params under a mask: fxsparse", "rigl-torch"]
    rows = [[
        r.model, f"{r.params / 1e6:.2f} M", f"{statistics.median(r.sparsify_ms):.0f}",
        f"{100 * r.masked_fraction['fxsparse']:.1f}%" if "fxsparse" in r.masked_fraction else "-",
        f"{100 * r.masked_fraction['rigl-torch']:.1f}%" if "rigl-torch" in r.masked_fraction
        else "-",
    ] for r in results]
    return _table(header, rows)


def memory_table(results: list[ModelResult]) -> str:
    header = ["model", "variant", "peak RSS MB", "x dense", "peak - after imports MB", "x dense",
              "with an update step MB", "x dense"]
    rows = []
    for r in results:
        dense_peak = r.peak_mb.get("dense")
        dense_extra = dense_peak - r.baseline_mb["dense"] if dense_peak is not None else None
        for v in VARIANTS:
            if f"memory:{v}" in r.errors:
                rows.append([r.model, v, "failed", "-", "-", "-", "-", "-"])
            elif v in r.peak_mb:
                extra = r.peak_mb[v] - r.baseline_mb[v]
                update = r.update_peak_mb.get(v)
                rows.append([r.model, v, f"{r.peak_mb[v]:.0f}", _ratio(r.peak_mb[v], dense_peak),
                             f"{extra:.0f}", _ratio(extra, dense_extra),
                             "-" if update is None else f"{update:.0f}", _ratio(update, dense_peak)])
    return _table(header, rows)


def mask_memory_note(results: list[ModelResult]) -> str:
    """Where fxsparse's memory above dense goes: its mask per sparse weight, and on an update
    step the growth candidates."""
    sizes = [
        f"{r.model} {r.params * r.masked_fraction['fxsparse'] / 2**20:.0f} MB"
        for r in results if "fxsparse" in r.masked_fraction
    ]
    return (
        "fxsparse keeps one mask per sparse weight, the bool buffer of the state_dict (1 byte a "
        f"weight: {', '.join(sizes)}); the forward's zeroing and the gradient mask multiply the "
        "weight's bits, viewed as integers, by it in place (integer x bool is about twice as fast as "
        "float x bool: `benchmarks/mask_dtype.py`). An update step does not hold the dense growth "
        "gradient (4 bytes a float32 weight, which the peer holds from its backward to its update): "
        "the backward reduces each layer's gradient, as it is produced, to the growth candidates the "
        "RigL update can choose from (the best inactive entries for the schedule's largest drop "
        "fraction and the active entries: `fxsparse.topology.growth_candidates`, exact), about 0.1 of "
        "the weights' bytes at density 0.1. "
        "rigl-torch keeps bool masks and multiplies floats by them: "
        "three float x bool passes a step (gradient, momentum, weight)."
    )


def peer_caveats(results: list[ModelResult]) -> list[str]:
    """Models where rigl-torch masks so little that its figures are those of a dense model."""
    notes = []
    for r in results:
        fraction = r.masked_fraction.get("rigl-torch")
        if fraction is not None and fraction < 0.5:
            notes.append(
                f"- rigl-torch on {r.model} masks only {100 * fraction:.1f}% of the parameters "
                "(it keeps the first layer and every `nn.Linear` dense and masks the other "
                "modules that have a `weight`, such as LayerNorm), so its step time and update "
                f"cost there are those of a nearly dense model; fxsparse masks "
                f"{100 * r.masked_fraction.get('fxsparse', float('nan')):.1f}%."
            )
    return notes


def failure_notes(results: list[ModelResult]) -> list[str]:
    return [f"- {r.model}, {what}: `{error}`" for r in results for what, error in r.errors.items()]


def command_line() -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        python = Path("python")
    return shlex.join([str(python), *sys.argv])


@dataclass
class RunInfo:
    """Where, with what and how a run was made: stored with the raw results, so that
    ``--report-from`` renders a report that still names the machine and command measured."""

    command: str
    finished: str  # UTC
    minutes: float
    inductor_startup_s: float | None
    cpu: str = field(default_factory=cpu_name)
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    isa: str = field(default_factory=lambda: torch.backends.cpu.get_cpu_capability())
    torch: str = torch.__version__
    timm: str = timm.__version__
    peer: str = field(default_factory=lambda: _peer_version())

    @classmethod
    def now(cls, minutes: float, startup_s: float | None) -> RunInfo:
        finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return cls(command_line(), finished, minutes, startup_s)


def render_report(results: list[ModelResult], cfg: Config, info: RunInfo) -> str:
    minutes, startup_s = info.minutes, info.inductor_startup_s
    sections = [
        "# Performance: step time, update cost and memory on CPU",
        "",
        "Training-step cost of fxsparse against the dense model and the peer library rigl-torch "
        f"{info.peer}, eager and under `torch.compile`. Measured on {info.cpu} "
        f"({info.cores} cores visible, {info.isa} kernels), torch {info.torch}, timm {info.timm}, "
        f"`torch.set_num_threads({cfg.threads})`, batch {cfg.batch}, density {cfg.density} "
        f"({cfg.init.upper()} for fxsparse), SGD(lr {cfg.lr}, momentum {cfg.momentum}, "
        f"weight decay {cfg.weight_decay}); {info.finished}; the whole run took {minutes:.1f} "
        "min.",
        "",
        f"Each variant had {cfg.warmup} untimed warm-up steps (the first one compiles the "
        f"`+compile` variants), then {cfg.steps} timed rounds ({cfg.large_steps} for the "
        "models at 224x224), a round being one step of each variant, in a new random order "
        "each round (so that no variant always follows the same one). This machine is shared and noisy: "
        "one step's time "
        "scatters by about +-5% and drifts by 20% over minutes. The headline figures are "
        "therefore paired: the ratio of two variants' steps within each round (seconds apart, "
        "so drift cancels), their median over the rounds and a distribution-free 95% "
        "confidence interval for that median (order statistics). A round (and a "
        "sparsify or update repeat) during which other processes used more than "
        f"{100 * cfg.max_other_load:.0f}% of the CPU (read from /proc/stat) was run again, "
        f"up to {cfg.max_attempts}x the wanted count: two programs sharing 2 cores make OpenMP "
        "steps 10-20x slower. Discarded: "
        + "; ".join(
            f"{r.model} {', '.join(f'{k} {v}' for k, v in r.discarded.items())}" for r in results
        ) + ".",
        "",
        "Produced by:",
        "",
        "```",
        info.command,
        "```",
        "",
        "## Targets",
        "",
        "Each performance target, judged on the paired median; 'met' means the whole 95% "
        "interval is within the target, 'met (median only)' that the median is but the "
        "interval reaches past it. `fxsparse / rigl-torch` below 1 is 'fxsparse's step ratio "
        "to dense is below rigl-torch's' measured directly, round by round.",
        "",
        targets_table(results),
        "",
        "## Step time: paired ratios (median over rounds [95% CI])",
        "",
        paired_table(results),
        "",
        "## Time inside each library's own code",
        "",
        f"Median over {cfg.library_steps} ordinary eager steps per library, run after the "
        "timed rounds, of the wall time spent inside the library's per-step code, timed by "
        "wrapping its entry points (the nested calls they make included): fxsparse's forward "
        "prologue (`Masker.prologue`: it zeroes every inactive weight, every forward), its "
        "masked-weight nodes (`Masker.__call__`), its post-accumulate-grad hooks "
        "(`_GradMaskHook`: they note each weight) with the pass that masks the gradients when the backward ends "
        "(`Masker.flush_gradients`) and `RigLScheduler.step` (fxsparse hooks no optimizer); rigl-torch's gradient hooks (`IndexMaskHook`), its `scheduler()` and the "
        "`reset_momentum` / `apply_mask_to_weights` its wrapped `optimizer.step` runs. This is "
        "the step-time overhead without the noise of whole steps: everything else in a step "
        "(forward and backward kernels, the optimizer's own update) is the dense model's work. "
        "'two-pass floor': after each of those steps, the time of two in-place passes over every "
        "masked weight with the fastest exact masking kernel (`bits *= mask`), the least any "
        "masking that trusts nothing must do each step (zero the inactive weights before a "
        "forward, the inactive gradient entries after a backward); 'total / floor' is the median "
        "of the per-step ratios (target <= 1.3).",
        "",
        library_table(results),
        "",
        "## Step time (median ms per step, ratio of medians to dense eager)",
        "",
        step_table(results),
        "",
        "`fxsparse` is an ordinary step between topology updates, in the loop users run "
        "(`loss.backward(); if scheduler.step(): opt.step()` with `fxsparse.RigLScheduler`); "
        "`fxsparse-plain` is the same sparse module in a plain `loss.backward(); opt.step()` loop "
        "without any scheduler (static sparse training, or a loop calling `rigl_step` itself): "
        "nothing in fxsparse hooks the optimizer, so it does the same work; "
        "`rigl-torch` is `loss.backward(); if scheduler(): opt.step()` on steps that are not "
        "updates.",
        "",
        "## Compile",
        "",
        "Wall time of the first step under `torch.compile` (default inductor backend): "
        "compiling forward and backward plus one step, with an empty inductor cache (a fresh "
        "`TORCHINDUCTOR_CACHE_DIR` per run). Not included in the step times above. Inductor's "
        "one-time start-up was paid beforehand on a tiny model"
        + (f" ({startup_s:.1f} s). " if startup_s is not None else ". ")
        + "'graphs / breaks': dynamo graphs compiled during the warm-up and graph breaks "
        "(1 / 0: the whole training forward is one graph, no recompiles).",
        "",
        compile_table(results),
        "",
        "## Topology update cost",
        "",
        f"Median of {cfg.update_reps} updates, each after a forward/backward armed as the "
        "schedulers arm an update step: fxsparse's backward keeps each layer's growth candidates "
        "(the time of that reduction, inside the backward, is counted) and then "
        f"`rigl_step({cfg.drop_fraction}, optimizer)` selects and applies; "
        "rigl-torch's backward keeps the dense gradient (untimed), then `_rigl_step()` (what its `scheduler()` runs on an update step, drop fraction "
        f"{cfg.drop_fraction}). Amortized: update cost / {cfg.delta_t}, as a percent of a dense "
        "step.",
        "",
        update_table(results, cfg),
        "",
        "## sparsify() time",
        "",
        sparsify_table(results),
        "",
        "The last two columns give how much of each model the two libraries put under a mask: "
        "rigl-torch's defaults (`sparsity_distribution='uniform'`, the only one it accepts, and "
        "`ignore_linear_layers=True`) leave the first layer and every `nn.Linear` dense, and it "
        "masks any other module with a `weight` (LayerNorm included), so its density is not "
        f"{cfg.density} of the same weights.",
        "",
    ]
    if any(r.peak_mb for r in results):
        sections += [
            "## Peak memory",
            "",
            "Peak resident set (VmHWM) of a fresh process that builds one variant and runs "
            f"{cfg.memory_steps} training steps (`--child MODEL VARIANT`), and of the same process "
            f"after one more step that updates the topology (step {cfg.memory_steps + 1}: the "
            "variants with a scheduler, fxsparse's RigLScheduler and rigl-torch's, at delta_t "
            f"{cfg.memory_steps + 1}). Not `ru_maxrss`: a "
            "child started by fork + exec inherits its parent's `ru_maxrss`, which would give "
            "every variant the parent's peak. Each child runs with glibc's mmap threshold fixed "
            "at 128 KiB (`MALLOC_MMAP_THRESHOLD_=131072`): every block of that size or more is "
            "unmapped when it is freed, so the resident set follows the live tensors (by default "
            "glibc raises the threshold as blocks are freed and the same run's peak moved by "
            "+-15 MB between repeats). 'after imports' is the child's resident set "
            "(VmRSS) just before the model is built (torch, timm and fxsparse imported, batch "
            "made). For the compiled variants the peak includes compilation in the same process "
            "(inductor's worker processes are not counted), with inductor's on-disk cache "
            "already filled by the timing run.",
            "",
            memory_table(results),
            "",
            mask_memory_note(results),
            "",
        ]
    notes = failure_notes(results)
    sections += ["## Failures", "", *(notes or ["None."]), ""]
    caveats = peer_caveats(results)
    if caveats:
        sections += ["## Notes", "", *caveats, ""]
    return "\n".join(sections)


def _peer_version() -> str:
    try:
        from importlib.metadata import version

        return version("rigl-torch")
    except Exception:
        return "(not installed)"


# --- main --------------------------------------------------------------------------------------


def save_json(results: list[ModelResult], cfg: Config, info: RunInfo) -> None:
    """Raw timings, config and run info; rewritten after every model so a crash keeps what was
    done. ``--report-from`` renders the report again from this file."""
    if not cfg.json:
        return
    path = Path(cfg.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": dataclasses.asdict(cfg), "run": dataclasses.asdict(info),
        "results": [dataclasses.asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


def load_json(path: str) -> tuple[list[ModelResult], Config, RunInfo]:
    """The results, config and run info that :func:`save_json` wrote."""
    try:
        payload = json.loads(Path(path).read_text())
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()}
        known = {f.name for f in dataclasses.fields(Config)}
        cfg = Config(**{k: v for k, v in config.items() if k in known})
        info = RunInfo(**payload["run"])
        results = [ModelResult(**r) for r in payload["results"]]
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise SystemExit(
            f"--report-from {path}: expected the JSON that step_time.py --json writes "
            f"({type(error).__name__}: {error})"
        ) from None
    return results, cfg, info


def main(argv: list[str] | None = None) -> None:
    cfg, child = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    if child is not None:
        run_child(*child, cfg)
        return
    if cfg.report_from:
        results, measured, info = load_json(cfg.report_from)
        write_report(render_report(results, measured, info), cfg.out)
        return

    if cfg.peer and importlib.util.find_spec("rigl_torch") is None:
        raise SystemExit(
            "the peer library rigl-torch is not installed in this environment: install it with "
            "`pip install -e .[bench]` (or `pip install rigl-torch==0.5.2`), or pass --no-peer"
        )
    start = time.perf_counter()
    # A fresh inductor cache, so the compile times are cold ones; the memory children inherit it
    # through the environment and reuse what the timing run compiled.
    cache = None
    startup_s = None
    if cfg.compile:
        cache = tempfile.mkdtemp(prefix="fxsparse-step-time-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        startup_s = start_inductor()
        print(f"inductor start-up: {startup_s:.1f} s", file=sys.stderr, flush=True)
    results: list[ModelResult] = []
    for name in cfg.models:
        model_start = time.perf_counter()
        result = run_model(name, cfg)
        if cfg.memory:
            measure_memory(name, cfg, result)
        results.append(result)
        save_json(results, cfg, RunInfo.now((time.perf_counter() - start) / 60, startup_s))
        print(f"[{name}] done in {(time.perf_counter() - model_start) / 60:.1f} min",
              file=sys.stderr, flush=True)
    info = RunInfo.now((time.perf_counter() - start) / 60, startup_s)
    save_json(results, cfg, info)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    write_report(render_report(results, cfg, info), cfg.out)
    if cfg.json:
        print(f"wrote {cfg.json}", file=sys.stderr)


def write_report(report: str, out: str | None) -> None:
    print(report)
    if out:
        Path(out).write_text(report)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
