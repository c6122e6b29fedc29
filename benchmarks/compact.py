"""The compact layout against dense training and the masked layout: step time and memory, CPU.

Per model and density (AdamW, lr 1e-3; the fixed random batch of each model):

1. The median wall time of an ordinary training step (forward, loss, backward, the scheduler's
   step, AdamW step, zero_grad) of ``dense``, ``masked`` (``sparsify(..., layout="masked")``) and
   ``compact`` (``layout="compact"``: every layer that qualifies and whose timed step at sparsify
   time wins), timed interleaved in a random order each round; the headline figures are the
   per-round ratios compact / dense, compact / masked and masked / dense, as a median with a
   distribution-free 95% interval (benchmarks/measure.py).
2. The cost of one topology update step (armed forward and backward, ``rigl_step(0.3)``), masked
   and compact, in ms (median of 3).
3. Memory: the bytes of weights + gradients + AdamW state (and the masks or index buffers), from
   the tensors themselves, as a ratio to dense; and the peak resident memory (VmHWM) of a fresh
   process running 3 ordinary steps of the variant and one update step (``--child``).

Models: ``mlp`` (4096-4096-4096-10, batch 256), ``gpt2char`` (the gpt2char-shakespeare recipe's
GPT-2: 2 layers, width 96, context 64, vocabulary 65, batch 32; its tied embedding/head stays
dense), ``gpt2block`` (one GPT-2-small block: width 768, MLP 3072, 12 heads, 4 sequences of 128
tokens a step, vocabulary 65), ``wrn22_2`` (the CIFAR recipe's WRN-22-2, batch 128 at 32x32: its
stride-1 3x3 convolutions can be compact), ``vit_tiny`` (timm vit_tiny_patch16_224, batch 32) and ``resnet18`` (timm, batch 32 at
32x32: convolutions stay masked), at densities 0.1, 0.05 and 0.02 (ERK).

Run from the repository root (the full run takes about 40 minutes on 2 cores):

    python benchmarks/compact.py --out docs/compact.md                          # everything
    python benchmarks/compact.py --models mlp --densities 0.1 --rounds 3 --no-memory  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (_REPO_ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import fxsparse  # noqa: E402
from measure import RoundOrder, ci_text, cpu_name, median_ci  # noqa: E402

MODELS = ("mlp", "gpt2char", "gpt2block", "wrn22_2", "vit_tiny", "resnet18")
DENSITIES = (0.1, 0.05, 0.02)
CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# the targets: (model, density) -> (compact / dense step time at most, what)
TARGETS = {("mlp", 0.1): 0.20, ("mlp", 0.05): 0.12, ("gpt2block", 0.1): 0.45, ("wrn22_2", 0.05): 0.7,
           ("gpt2char", 0.1): 0.6, ("gpt2char", 0.05): 0.4}
STATE_TARGET = 0.25  # weights + gradients + AdamW state, compact / dense, at density 0.1


# --- models and batches ---------------------------------------------------------------------------


def build(name: str, seed: int = 0, width: int = 4096) -> tuple[nn.Module, Any, Any]:
    """``(model, example inputs, loss function of the model's output)``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        x, y = torch.randn(256, width, generator=generator), torch.randint(0, 10, (256,), generator=generator)
        return model, x, lambda out: F.cross_entropy(out, y)
    if name in ("gpt2char", "gpt2block"):
        from transformers import GPT2Config, GPT2LMHeadModel

        small = name == "gpt2char"
        config = GPT2Config(vocab_size=65, n_positions=64 if small else 128, n_embd=96 if small else 768,
                            n_layer=2 if small else 1, n_head=4 if small else 12, use_cache=False,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            tie_word_embeddings=True)
        model = GPT2LMHeadModel(config)
        tokens = torch.randint(0, 65, (32, 64) if small else (4, 128), generator=generator)
        return model, {"input_ids": tokens, "labels": tokens}, lambda out: out.loss
    if name == "wrn22_2":  # the CIFAR recipe's model and batch
        from fxsparse.models import wrn22_2

        model = wrn22_2(10)
        x, y = torch.randn(128, 3, 32, 32, generator=generator), torch.randint(0, 10, (128,), generator=generator)
        return model, x, lambda out: F.cross_entropy(out, y)
    import timm

    size = 224 if name == "vit_tiny" else 32
    model = timm.create_model("vit_tiny_patch16_224" if name == "vit_tiny" else name, pretrained=False, num_classes=10)
    x, y = torch.randn(32, 3, size, size, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    return model, x, lambda out: F.cross_entropy(out, y)


@dataclass
class Variant:
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    sparse: Any = None

    def step(self, inputs: Any, loss_of: Any) -> None:
        out = self.module(**inputs) if isinstance(inputs, dict) else self.module(inputs)
        loss_of(out).backward()
        if self.scheduler is None or self.scheduler.step():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_variant(name: str, model: nn.Module, density: float, inputs: Any, update_at: int = 10**6) -> Variant:
    """``dense``, ``masked`` or ``compact``; the scheduler's first update comes at ``update_at``."""
    if name == "dense":
        module = model
        return Variant(name, module, torch.optim.AdamW(module.parameters(), lr=1e-3))
    sparse = fxsparse.sparsify(model, density, "erk", example_inputs=inputs, layout=name)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, total_steps=10 * update_at, delta_t=update_at)
    return Variant(name, sparse, optimizer, scheduler, sparse)


def state_bytes(variant: Variant) -> int:
    """Weights + gradients + optimizer state + masks and index buffers of ``variant``, in bytes
    (every gradient counted as present, as during a step)."""
    module = variant.module
    total = 0
    for parameter in module.parameters():
        total += 2 * parameter.numel() * parameter.element_size()
        state = variant.optimizer.state.get(parameter, {})
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor) and t.dim())
    for name, buffer in module.named_buffers():
        if name.endswith("_mask") or name.startswith("fxsparse_compact."):
            total += buffer.numel() * buffer.element_size()
    return total


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    density: float
    ms: dict[str, list[float]] = field(default_factory=dict)
    update_ms: dict[str, float] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    update_peak_mb: dict[str, float] = field(default_factory=dict)
    compact_layers: str = ""
    kernels: str = ""  # the compact layers' kernels, e.g. "numba 3"

    def ratios(self, a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(self.ms[a], self.ms[b])]


def measure(model_name: str, densities: list[float], rounds: int, seed: int, width: int = 4096) -> list[Result]:
    model, inputs, loss_of = build(model_name, seed, width)
    variants = {"dense": make_variant("dense", model, 1.0, inputs)}
    results = []
    for density in densities:
        for layout in ("masked", "compact"):
            variants[f"{layout}@{density}"] = make_variant(layout, model, density, inputs)
        result = Result(model_name, density)
        compact = variants[f"compact@{density}"].sparse
        chosen = sum(c.layout == "compact" for c in compact.layouts.values())
        result.compact_layers = f"{chosen} of {len(compact.layouts)}"
        kernels = [c.kernel for c in compact.layouts.values() if c.layout == "compact"]
        result.kernels = ", ".join(f"{k} {kernels.count(k)}" for k in sorted(set(kernels)))
        results.append(result)
    for variant in variants.values():  # warm up (and create the AdamW state)
        for _ in range(2):
            variant.step(inputs, loss_of)
    order = RoundOrder(list(variants), seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(rounds):
        for name in order.next():
            start = time.perf_counter()
            variants[name].step(inputs, loss_of)
            times[name].append((time.perf_counter() - start) * 1e3)
        print(f"[{model_name}] round {index + 1}/{rounds}", file=sys.stderr, flush=True)
    for result in results:
        d = result.density
        result.ms = {"dense": times["dense"], "masked": times[f"masked@{d}"], "compact": times[f"compact@{d}"]}
        result.state_bytes = {"dense": state_bytes(variants["dense"]), "masked": state_bytes(variants[f"masked@{d}"]),
                              "compact": state_bytes(variants[f"compact@{d}"])}
        for layout in ("masked", "compact"):
            result.update_ms[layout] = update_step_ms(variants[f"{layout}@{d}"], inputs, loss_of)
    return results


def update_step_ms(variant: Variant, inputs: Any, loss_of: Any, repeats: int = 3) -> float:
    """One armed forward/backward and ``rigl_step(0.3)``: what an update step costs, armed as
    ``RigLScheduler`` arms it after steps of one backward (growth candidates kept as the
    backward runs, instead of the dense gradient)."""
    from fxsparse.scheduler import growth_candidate_counts

    sparse, samples = variant.sparse, []
    for _ in range(repeats):
        start = time.perf_counter()
        sparse.arm_growth(True, candidates=growth_candidate_counts(sparse, 0.3))
        out = sparse(**inputs) if isinstance(inputs, dict) else sparse(inputs)
        loss_of(out).backward()
        sparse.rigl_step(0.3, variant.optimizer)
        variant.optimizer.zero_grad(set_to_none=True)
        samples.append((time.perf_counter() - start) * 1e3)
        sparse.arm_growth(False)
    return statistics.median(samples)


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status (this benchmark expects Linux)")


def run_child(model_name: str, layout: str, density: float, seed: int, width: int = 4096) -> None:
    """3 ordinary steps and one update step of one variant in this process; prints VmHWM."""
    model, inputs, loss_of = build(model_name, seed, width)
    variant = make_variant(layout, model, density, inputs, update_at=4)
    del model
    for _ in range(3):
        variant.step(inputs, loss_of)
    peak = _status_kb("VmHWM")
    update_peak = None
    if variant.scheduler is not None:
        variant.step(inputs, loss_of)  # step 4: the update
        update_peak = _status_kb("VmHWM")
    print(json.dumps({"peak_kb": peak, "update_peak_kb": update_peak}))


def measure_memory(result: Result, seed: int, threads: int, width: int = 4096) -> None:
    for layout in ("dense", "masked", "compact"):
        command = [sys.executable, str(Path(__file__).resolve()), "--child", result.model, layout, str(result.density),
                   "--seed", str(seed), "--threads", str(threads), "--mlp-width", str(width)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=_REPO_ROOT, env={**os.environ, **CHILD_MALLOC})
        if done.returncode != 0 or not done.stdout.strip():
            print(f"[{result.model}] memory of {layout} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        report = json.loads(done.stdout.strip().splitlines()[-1])
        result.peak_mb[layout] = report["peak_kb"] / 1024
        if report["update_peak_kb"] is not None:
            result.update_peak_mb[layout] = report["update_peak_kb"] / 1024


# --- the report ---------------------------------------------------------------------------------


def _verdict(values: list[float], target: float | None) -> str:
    if target is None:
        return ""
    median, _, high = median_ci(values)
    return "met" if high <= target else ("met (median)" if median <= target else "not met")


def render(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {cpu_name()}, torch {torch.__version__}, "
        f"{args.threads} threads, AdamW, {args.rounds} interleaved rounds; ratios per round, median [95% CI].",
        "",
        "Reproduce: `" + " ".join(["python benchmarks/compact.py", *sys.argv[1:]]) + "`",
        "",
        "## Step time (an ordinary step)",
        "",
        "| model | density | compact layers | dense ms | compact / dense | compact / masked | masked / dense | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        target = TARGETS.get((r.model, r.density))
        lines.append(
            f"| {r.model} | {r.density} | {r.compact_layers}{f' ({r.kernels})' if r.kernels else ''} | "
            f"{statistics.median(r.ms['dense']):.1f} | {ci_text(r.ratios('compact', 'dense'))} | {ci_text(r.ratios('compact', 'masked'))} | "
            f"{ci_text(r.ratios('masked', 'dense'))} | {'<= ' + str(target) if target else ''} | "
            f"{_verdict(r.ratios('compact', 'dense'), target)} |"
        )
    lines += [
        "",
        "## Memory",
        "",
        "Weights + gradients + AdamW state (+ masks or indices), from the tensors; peak RSS of a fresh process "
        "(3 ordinary steps, then an update step).",
        "",
        "| model | density | state compact / dense | state masked / dense | peak MB dense / masked / compact "
        "| update-step peak MB masked / compact | update step ms masked / compact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sb = r.state_bytes
        peaks = " / ".join(f"{r.peak_mb[k]:.0f}" if k in r.peak_mb else "-" for k in ("dense", "masked", "compact"))
        update_peaks = " / ".join(f"{r.update_peak_mb[k]:.0f}" if k in r.update_peak_mb else "-" for k in ("masked", "compact"))
        target = f" (target <= {STATE_TARGET})" if r.density == 0.1 else ""
        lines.append(
            f"| {r.model} | {r.density} | {sb['compact'] / sb['dense']:.3f}{target} | {sb['masked'] / sb['dense']:.3f} | "
            f"{peaks} | {update_peaks} | {r.update_ms['masked']:.1f} / {r.update_ms['compact']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# 1x1 convolutions: (in, out, spatial size, batch) at CNN widths (a ResNet bottleneck's, a
# MobileNet block's) and one wide enough for the sparse kernel
POINTWISE = ((64, 256, 16, 8), (256, 64, 16, 8), (512, 2048, 4, 32), (2048, 2048, 4, 32))


def pointwise(densities: list[float], threads: int) -> str:
    """What sparsify's timing measures for 1x1 convolutions (one layer each, uniform density):
    the ms of a training step of the layer, masked and compact, and the layout it keeps."""
    rows = ["| in -> out | HxW, batch | density | masked ms | compact ms | compact / masked | kept |", "|---|---|---|---|---|---|---|"]
    for c_in, c_out, size, batch in POINTWISE:
        for density in densities:
            torch.manual_seed(0)
            model = torch.nn.Conv2d(c_in, c_out, 1)
            x = torch.randn(batch, c_in, size, size)
            choice = fxsparse.sparsify(model, density, "uniform", dense=[], example_inputs=x, layout="compact").layouts["weight"]
            ms = choice.ms
            rows.append(f"| {c_in} -> {c_out} | {size}x{size}, {batch} | {density:g} | {ms['masked']:.2f} | {ms['compact']:.2f} | "
                        f"{ms['compact'] / ms['masked']:.2f} | {choice.layout} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp-width", type=int, default=4096, help="the MLP's width (smaller for a smoke run)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", help="write the Markdown report here (its measured section)")
    parser.add_argument("--json", default="benchmarks/results/compact.jsonl", help="append one record per model/density")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "LAYOUT", "DENSITY"), help=argparse.SUPPRESS)
    parser.add_argument("--pointwise", action="store_true", help="only time 1x1 convolutions as sparsify does")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pointwise:
        print(pointwise([float(d) for d in args.densities.split(",")], args.threads))
        return
    if args.child:
        run_child(args.child[0], args.child[1], float(args.child[2]), args.seed, args.mlp_width)
        return
    densities = [float(d) for d in args.densities.split(",")]
    results = []
    for name in args.models.split(","):
        for result in measure(name, densities, args.rounds, args.seed, args.mlp_width):
            if not args.no_memory:
                measure_memory(result, args.seed, args.threads, args.mlp_width)
            results.append(result)
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps({**result.__dict__, "rounds": args.rounds, "threads": args.threads}) + "\n")
    report = render(results, args)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
