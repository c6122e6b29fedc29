"""Step time, update cost and peak memory of sparse training on a GPU, against dense.

Per model (timm resnet50 at 224x224, batch 32; timm vit_base_patch16_224, batch 32; a
GPT-2-small-sized decoder from a transformers config, 12 layers, width 768, batch 8 x 512 tokens,
no key/value cache), three variants built from the same seeded model: ``dense``, ``masked``
(``sparsify(density 0.1, ERK)``) and ``compact`` (``layout="compact"`` timed on the example batch:
the layers whose compact step wins on this device; "none" when none does). Every step is AdamW
under bf16 autocast with a ``RigLScheduler`` (``delta_t = 100``).

1. Ordinary step: the median of ``--steps`` interleaved rounds (one step of each variant, the
   device synchronized around each), and per-round ratios to dense, median [95% interval].
2. Update step: an armed step (the dense growth gradient recorded) plus ``rigl_step(0.3)``,
   median of 3; its extra cost over an ordinary step amortized over ``delta_t`` steps, as a
   percentage of an ordinary step.
3. Peak memory: ``torch.cuda.max_memory_allocated`` over 3 ordinary steps and an update step of
   each variant alone (built after the previous one is freed), as a ratio to dense.

Targets (issue 41): masked ordinary step <= 1.10x dense, update amortized <= 1% of a step, peak
memory <= 1.05x dense. ``scripts/gpu_check.sh OUTDIR`` runs it after the CUDA tests.

    python benchmarks/gpu_step.py --out gpu.md --json gpu.jsonl          # on a GPU machine
    python benchmarks/gpu_step.py --device cpu --tiny --steps 3           # the code path, on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
for path in (_HERE.parent, _HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import fxsparse  # noqa: E402
from measure import median_ci  # noqa: E402

MODELS = ("resnet50", "vit_b16", "gpt2")
VARIANTS = ("dense", "masked", "compact")
DELTA_T = 100  # RigL's update period: the update step's extra cost is spread over this many steps
TARGETS = {"masked / dense step": 1.10, "update, amortized % of a step": 1.0, "masked / dense peak memory": 1.05}


@dataclass
class Result:
    model: str
    device: str
    batch: str
    ms: dict[str, list[float]] = field(default_factory=dict)
    update_ms: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    compact_layers: str = ""
    notes: list[str] = field(default_factory=list)


def build(name: str, tiny: bool) -> tuple[torch.nn.Module, Any, str]:
    """The dense model, a batch in the form it is called with, and the batch's description."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = (GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, use_cache=False) if tiny
                  else GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, use_cache=False))
        batch, tokens = (2, 16) if tiny else (8, 512)
        ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=generator)
        return GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}, f"{batch} x {tokens} tokens"
    import timm

    size, batch = (32, 2) if tiny else (224, 32)
    timm_name = {"resnet50": "resnet18" if tiny else "resnet50",
                 "vit_b16": "vit_tiny_patch16_224" if tiny else "vit_base_patch16_224"}[name]
    extra = {"img_size": size} if name == "vit_b16" else {}
    model = timm.create_model(timm_name, pretrained=False, num_classes=10, **extra)
    x = torch.randn(batch, 3, size, size, generator=generator)
    return model, {"x": x, "y": torch.randint(0, 10, (batch,), generator=generator)}, f"{batch} at {size}x{size}"


def _to(batch: Any, device: str) -> Any:
    return {k: v.to(device) for k, v in batch.items()}


def _inputs(batch: dict[str, torch.Tensor]) -> Any:
    """What ``sparsify`` and the model take: the keyword batch of a decoder, the images otherwise."""
    return batch if "input_ids" in batch else batch["x"]


def _loss(model: Any, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.bfloat16):
        if "input_ids" in batch:
            return model(**batch)["loss"]
        return F.cross_entropy(model(batch["x"]).float(), batch["y"])


def make(variant: str, name: str, tiny: bool, device: str, density: float) -> tuple[Any, Any, Any, Any]:
    """``(module, optimizer, scheduler or None, batch)`` of one variant, on ``device``."""
    model, batch, _ = build(name, tiny)
    batch = _to(batch, device)
    model = model.to(device)
    if variant != "dense":
        layout = "compact" if variant == "compact" else "masked"
        model = fxsparse.sparsify(model, density, "erk", example_inputs=_inputs(batch), layout=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = None if variant == "dense" else fxsparse.RigLScheduler(model, opt, 10**6, delta_t=DELTA_T)
    return model, opt, scheduler, batch


def step(model: Any, opt: Any, scheduler: Any, batch: Any, device: str) -> None:
    _loss(model, batch, device).backward()
    if scheduler is None or scheduler.step():
        opt.step()
    opt.zero_grad(set_to_none=True)


def update_step(model: Any, opt: Any, batch: Any, device: str) -> None:
    """An armed step and a topology update (what ``RigLScheduler`` does every ``delta_t``)."""
    model.arm_growth(True)
    _loss(model, batch, device).backward()
    model.rigl_step(0.3, opt)
    opt.zero_grad(set_to_none=True)
    model.arm_growth(False)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def peak_memory(variant: str, name: str, tiny: bool, device: str, density: float) -> float | None:
    """MB allocated at the peak of 3 ordinary steps and an update step of the variant alone."""
    if device == "cpu":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, opt, scheduler, batch = make(variant, name, tiny, device, density)
    for _ in range(3):
        step(model, opt, scheduler, batch, device)
    if scheduler is not None:
        update_step(model, opt, batch, device)
    _sync(device)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del model, opt, scheduler, batch
    return peak


def measure(name: str, args: argparse.Namespace) -> Result:
    device = args.device
    result = Result(name, torch.cuda.get_device_name() if device == "cuda" else device, build(name, args.tiny)[2])
    for variant in VARIANTS:  # memory first, each variant alone
        try:
            peak = peak_memory(variant, name, args.tiny, device, args.density)
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            result.notes.append(f"{variant}: {type(error).__name__}: {str(error)[:300]}")
            continue
        if peak is not None:
            result.peak_mb[variant] = peak
    built = {}
    for variant in VARIANTS:
        if any(n.startswith(f"{variant}:") for n in result.notes):
            continue
        built[variant] = make(variant, name, args.tiny, device, args.density)
    if "compact" in built:
        chosen = sum(1 for c in built["compact"][0].layouts.values() if c.layout == "compact")
        result.compact_layers = f"{chosen} of {len(built['compact'][0].layouts)}"
    for variant, (model, opt, scheduler, batch) in built.items():  # warm-up
        for _ in range(args.warmup):
            step(model, opt, scheduler, batch, device)
        result.ms[variant] = []
    for round_ in range(args.steps):
        names = list(built)
        for variant in names[round_ % len(names):] + names[:round_ % len(names)]:
            model, opt, scheduler, batch = built[variant]
            _sync(device)
            start = time.perf_counter()
            step(model, opt, scheduler, batch, device)
            _sync(device)
            result.ms[variant].append((time.perf_counter() - start) * 1e3)
    for variant, (model, opt, _, batch) in built.items():
        if variant == "dense":
            continue
        times = []
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            update_step(model, opt, batch, device)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        result.update_ms[variant] = statistics.median(times)
    return result


def _ratio(result: Result, variant: str) -> tuple[float, float, float] | None:
    if variant not in result.ms or "dense" not in result.ms:
        return None
    return median_ci([a / b for a, b in zip(result.ms[variant], result.ms["dense"])])


def render(results: list[Result], args: argparse.Namespace, minutes: float) -> str:
    device = results[0].device if results else args.device
    lines = [
        "# Sparse training on a GPU: step time, update cost, peak memory",
        "",
        f"{device}, torch {torch.__version__}, bf16 autocast, AdamW, density {args.density} ERK, RigL every 100 steps; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.steps} interleaved rounds; the run "
        f"took {minutes:.1f} min. Ratios per round to dense, median [95% interval].",
        "",
        "```",
        f"python benchmarks/gpu_step.py {' '.join(sys.argv[1:])}",
        "```",
        "",
        "| model | batch | dense ms | masked / dense | compact / dense (layers) | update ms masked / compact "
        "| update amortized, % of a step | peak MB dense / masked / compact | masked / dense peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for r in results:
        dense = statistics.median(r.ms["dense"]) if r.ms.get("dense") else float("nan")
        masked, compact = _ratio(r, "masked"), _ratio(r, "compact")
        shown = {k: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in (("masked", masked), ("compact", compact)) if v}
        ordinary = statistics.median(r.ms["masked"]) if r.ms.get("masked") else None
        amortized = (100 * (r.update_ms["masked"] - ordinary) / DELTA_T / ordinary
                     if ordinary and "masked" in r.update_ms else None)
        peaks = " / ".join(f"{r.peak_mb[v]:.0f}" if v in r.peak_mb else "-" for v in VARIANTS)
        peak_ratio = r.peak_mb["masked"] / r.peak_mb["dense"] if {"masked", "dense"} <= set(r.peak_mb) else None
        lines.append(
            f"| {r.model} | {r.batch} | {dense:.1f} | {shown.get('masked', '-')} | {shown.get('compact', '-')} "
            f"({r.compact_layers or '-'}) | {r.update_ms.get('masked', float('nan')):.1f} / "
            f"{r.update_ms.get('compact', float('nan')):.1f} | {'-' if amortized is None else f'{amortized:.2f}%'} | "
            f"{peaks} | {'-' if peak_ratio is None else f'{peak_ratio:.3f}'} |"
        )
        for target, value in (("masked / dense step", masked[0] if masked else None),
                              ("update, amortized % of a step", amortized),
                              ("masked / dense peak memory", peak_ratio)):
            if value is not None:
                verdicts.append(f"| {r.model} | {target} | {value:.3f} | <= {TARGETS[target]} | "
                                f"{'met' if value <= TARGETS[target] else 'not met'} |")
    lines += ["", "| model | target | measured | target | verdict |", "|---|---|---|---|---|", *verdicts]
    notes = [f"- {r.model}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", "Variants that did not run:", *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="small configs: the code path in seconds (CPU smoke)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--json", default=None, help="append one record per model (JSON lines)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (--device cpu --tiny runs the code path on a CPU)")
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"expected --models from {', '.join(MODELS)}, got {unknown}")
    start = time.perf_counter()
    results = []
    for name in models:
        print(f"[{name}] measuring", file=sys.stderr, flush=True)
        results.append(measure(name, args))
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(asdict(results[-1])) + "\n")
    text = render(results, args, (time.perf_counter() - start) / 60)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
