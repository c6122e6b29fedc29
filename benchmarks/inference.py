"""Inference latency, throughput and file size of fxsparse.export_inference against dense.

Per model (an MLP 4096-4096-4096-10 on 4096 features; WRN-22-2 and timm resnet18 at 32x32; timm
vit_tiny_patch16_224 at 224x224; 10 classes, random weights; ``llama``: a transformers Llama
decoder built from a config, width 512, 4 layers, 8 heads, MLP 1376, vocabulary 1000, called
with ``input_ids`` of 32 tokens a sequence as ``model(input_ids=ids)`` (no key/value cache), so captured by
torch.export and exported from keyword inputs) and density (0.1, 0.05, 0.02; ERK
masks at random, as sparsify draws them), three variants of the same weights in eval mode under
``torch.no_grad()``: ``dense`` (the model with the masked weights, computing every zero),
``masked`` (the SparseGraphModule) and ``exported`` (``export_inference`` for that batch size,
which measured each layer's kernels on it). Latency at batch 1 and throughput at batch 32 are
timed interleaved: a round is one timed call of each variant, in a new random order each
round, a call being several forwards when one takes under 10 ms; the headline is the
per-round ratio exported / dense, its median and a distribution-free 95% interval. Rounds
during which other processes used more than 15% of the CPU are run again (up to 3x). File size:
``torch.save`` of the dense state_dict, of the SparseGraphModule's state_dict (weights, masks),
and of the whole exported module (compressed weights and its code).

Run (about 10 minutes on 2 cores):

    python benchmarks/inference.py --out docs/inference.md
    python benchmarks/inference.py --models mlp --densities 0.05 --rounds 5   # smoke
"""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

import timm  # noqa: E402

import fxsparse  # noqa: E402
import fxsparse.models  # noqa: E402
from fxsparse.export import export_inference  # noqa: E402
from measure import OtherLoad, RoundOrder, cpu_name, median_ci  # noqa: E402

warnings.filterwarnings("ignore", message=".*[Ss]parse CSR.*")

MODELS = {"mlp": 0, "wrn22_2": 32, "resnet18": 32, "vit_tiny_patch16_224": 224}
OTHER_MODELS = {"llama": 32}  # run when named: tokens a sequence
TOKENS = 32
VARIANTS = ("dense", "masked", "exported")
MAX_OTHER_LOAD = 0.15


class MLP(nn.Sequential):
    def __init__(self, width: int = 4096, classes: int = 10) -> None:
        super().__init__(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP()
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128, use_cache=False)
        return LlamaForCausalLM(config)
    if name == "wrn22_2":
        return fxsparse.models.wrn22_2(num_classes=10)
    return timm.create_model(name, pretrained=False, num_classes=10)


def batch_of(name: str, n: int) -> Any:
    """The model's inputs for a batch of ``n``, in the form it is called with: a tensor, or a dict
    of keyword inputs (``model(**batch)``)."""
    generator = torch.Generator().manual_seed(n)
    if name == "mlp":
        return torch.randn(n, 4096, generator=generator)
    if name == "llama":
        return {"input_ids": torch.randint(0, 1000, (n, TOKENS), generator=generator)}
    size = MODELS[name]
    return torch.randn(n, 3, size, size, generator=generator)


def call(module: Any, x: Any) -> torch.Tensor:
    """``module`` called as the model is (keywords for a dict); its logits for a transformers model."""
    out = module(**x) if isinstance(x, dict) else module(x)
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out


def saved_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


@dataclass
class Result:
    model: str
    density: float
    batch: int
    calls: int = 1
    rounds: int = 0
    discarded: int = 0
    ms: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    export_s: float = 0.0
    kernels: dict[str, int] = field(default_factory=dict)
    kept: str = "chosen"
    bytes: dict[str, int] = field(default_factory=dict)

    def ratio(self, variant: str) -> tuple[float, float, float]:
        return median_ci([a / b for a, b in zip(self.ms[variant], self.ms["dense"])])

    def median(self, variant: str) -> float:
        return statistics.median(self.ms[variant]) / self.calls


def measure(name: str, density: float, batch: int, rounds: int) -> Result:
    print(f"[{name} d={density:g} batch={batch}] building and exporting", file=sys.stderr, flush=True)
    x = batch_of(name, batch)
    sparse = fxsparse.sparsify(build(name), density=density, init="erk", seed=0,
                               example_inputs=x if isinstance(x, dict) else None).eval()
    dense = build(name).eval()
    with torch.no_grad():  # the dense model computes with the very same (masked) weights
        call(sparse, x)
        for fqn, weight in sparse.sparse_weights.items():
            dense.get_parameter(fqn).copy_(weight)
    start = time.perf_counter()
    exported = export_inference(sparse, x)
    result = Result(name, density, batch, export_s=time.perf_counter() - start)
    result.kernels = dict(collections.Counter(f"{c.kind}:{c.kernel}" for c in exported.fxsparse_choices))
    result.kept = exported.fxsparse_kept
    result.bytes = {"dense": saved_bytes(dense.state_dict()), "masked": saved_bytes(sparse.state_dict()),
                    "exported": saved_bytes(exported)}
    modules = {"dense": dense, "masked": sparse, "exported": exported}
    with torch.no_grad():
        reference = call(dense, x)
        assert torch.allclose(call(exported, x), reference, rtol=1e-3, atol=1e-4), "exported output differs"
        start = time.perf_counter()
        call(dense, x)
        once = time.perf_counter() - start
        result.calls = max(1, int(0.010 / max(once, 1e-6)))
        for module in modules.values():  # warm-up
            call(module, x)
        monitor, orders = OtherLoad(), RoundOrder(list(VARIANTS), 0)
        for index in range(3 * rounds):
            if result.rounds == rounds:
                break
            monitor.start()
            times = {}
            for variant in orders.next():
                module = modules[variant]
                start = time.perf_counter()
                for _ in range(result.calls):
                    call(module, x)
                times[variant] = (time.perf_counter() - start) * 1e3
            if monitor.share() > MAX_OTHER_LOAD and index < 3 * rounds - (rounds - result.rounds):
                result.discarded += 1
                continue
            for variant, ms in times.items():
                result.ms[variant].append(ms)
            result.rounds += 1
    return result


def _ci(value: tuple[float, float, float]) -> str:
    return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def render(results: list[Result], args: argparse.Namespace, minutes: float) -> str:
    lines = [
        "# Inference: exported sparse models against dense on CPU",
        "",
        f"`fxsparse.export_inference` on {cpu_name()}, torch {torch.__version__}, "
        f"`torch.set_num_threads({args.threads})`, eval mode under `torch.no_grad()`; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the run took {minutes:.1f} min.",
        "",
        "Models: an MLP 4096-4096-4096-10 (4096 input features), WRN-22-2 and timm resnet18 at 32x32, timm "
        "vit_tiny_patch16_224 at 224x224 (llama, when named: a transformers Llama decoder from a config, width 512, "
        "4 layers, sequences of 32 tokens, called with keywords), random weights, ERK masks as `sparsify` draws "
        "them (a trained RigL mask "
        "may differ: it can leave whole filters empty, which the export also exploits). `dense` is the model "
        "holding the same masked weights and computing every zero; `masked` the SparseGraphModule; `exported` "
        "the module `export_inference(sparse, x)` built for that batch size (each layer's kernel measured on "
        "it, then the whole module timed with those choices, with only their clear wins and all dense; the kept "
        "configuration in parentheses). A round is one timed call of each variant, in a new random order each round; a call is several forwards when one takes "
        "under 10 ms. Ratios are per round, median [95% interval]; below 1 the export is faster.",
        "",
        "Produced by:",
        "",
        "```",
        ".venv/bin/python benchmarks/inference.py --out docs/inference.md",
        "```",
        "",
    ]
    for batch, what in ((1, "Latency at batch 1"), (32, "Throughput at batch 32")):
        rows = [r for r in results if r.batch == batch]
        if not rows:
            continue
        unit = "ms per forward" if batch == 1 else "samples / s"
        lines += [f"## {what}", "", f"| model | density | rounds | dense ({unit}) | masked | exported | exported / dense | masked / dense | layers (kind:kernel) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            def shown(variant: str) -> str:
                ms = r.median(variant)
                return f"{ms:.3f}" if batch == 1 else f"{batch / ms * 1e3:.1f}"
            kernels = ", ".join(f"{k} {v}" for k, v in sorted(r.kernels.items())) + f" ({r.kept})"
            lines.append(f"| {r.model} | {r.density:g} | {r.rounds} | {shown('dense')} | {shown('masked')} | "
                         f"{shown('exported')} | {_ci(r.ratio('exported'))} | {_ci(r.ratio('masked'))} | {kernels} |")
        lines.append("")
    lines += ["## File size", "",
              "`torch.save` bytes: the dense model's state_dict, the SparseGraphModule's state_dict (dense weights "
              "and bool masks), and the whole exported module (active values, int32 column indices and row "
              "offsets, biases, norms, the graph's code).", "",
              "| model | density | dense MB | masked MB | exported MB | exported / dense | export time (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.batch != 1:
            continue
        b = r.bytes
        lines.append(f"| {r.model} | {r.density:g} | {b['dense'] / 1e6:.2f} | {b['masked'] / 1e6:.2f} | "
                     f"{b['exported'] / 1e6:.2f} | {b['exported'] / b['dense']:.3f} | {r.export_s:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--densities", default="0.1,0.05,0.02")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = []
    for name in args.models.split(","):
        for density in (float(d) for d in args.densities.split(",")):
            for batch in (1, 32):
                results.append(measure(name, density, batch, args.rounds if batch == 1 else max(3, args.rounds // 2)))
    text = render(results, args, (time.perf_counter() - start) / 60)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
