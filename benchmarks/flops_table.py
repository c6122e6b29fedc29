"""FLOPs and model size of sparse WRN-22-2 and ResNet-50, in the layout of the RigL papers' tables.

For WRN-22-2 at 32x32 (CIFAR, 10 classes; densities 0.05, 0.1, 0.2, 0.5) and timm ``resnet50`` at
224x224 (ImageNet, 1000 classes; sparsities 0.8, 0.9, 0.95, 0.965, 0.99), uniform and ERK: dense
inference FLOPs per sample, the sparse inference and RigL training (delta_t = 100) FLOPs as
multiples of dense, and the model size (4 bytes per active weight, 1 bit per mask entry, dense
parameters). Uniform keeps the first layer dense (the papers' convention), as does ERK at 0.99
sparsity; both keep the total active count at the target (``sparsify``'s budgets). Everything
is computed by ``fxsparse.flop_report`` on fake tensors: nothing is trained or run for real.

Run:
    .venv/bin/python benchmarks/flops_table.py --out docs/flops.md
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import timm
import torch

import fxsparse
import fxsparse.models  # noqa: F401  (registers "wrn22_2" with timm)
from fxsparse.accounting import flop_report

__all__ = ["main", "table"]

MODELS = {
    "wrn22_2": {"size": 32, "classes": 10, "densities": [0.05, 0.1, 0.2, 0.5], "first": "conv1.weight"},
    "resnet50": {"size": 224, "classes": 1000, "densities": [0.2, 0.1, 0.05, 0.035, 0.01], "first": "conv1.weight"},
}


def table(name: str, delta_t: int = 100) -> list[str]:
    """Markdown lines of one model's table."""
    spec = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=spec["classes"])
    x = torch.zeros(1, 3, spec["size"], spec["size"])
    dense = flop_report(model, x, delta_t=delta_t)
    lines = [
        f"### {name} at {spec['size']}x{spec['size']}, {spec['classes']} classes",
        "",
        f"Dense: {dense.dense_flops:.3e} inference FLOPs per sample, {3 * dense.dense_flops:.3e} per "
        f"training sample, {dense.dense_size_bytes / 1e6:.2f} MB.",
        "",
        "| sparsity | distribution | dense layers | inference FLOPs (x dense) | RigL training FLOPs (x dense) "
        "| static / SET training (x dense) | model size MB (x dense) |",
        "|---|---|---|---|---|---|---|",
        f"| 0 | dense | all | {dense.dense_flops:.3e} (1.00x) | 1.00x | 1.00x | {dense.dense_size_bytes / 1e6:.2f} (1.00x) |",
    ]
    for density in spec["densities"]:
        sparsity = round(1 - density, 3)
        for init in ("uniform", "erk"):
            first_dense = init == "uniform" or sparsity >= 0.99
            dense_layers = [spec["first"]] if first_dense else []
            sparse = fxsparse.sparsify(model, density, init, example_inputs=x, dense=dense_layers)
            report = flop_report(sparse, x, delta_t=delta_t)
            rigl = report.training("rigl").multiplier
            static = report.training("static").multiplier
            lines.append(
                f"| {sparsity:g} | {init.upper() if init == 'erk' else init} | "
                f"{'first' if first_dense else '-'} | {report.sparse_flops:.3e} ({report.inference_multiplier:.2f}x) | "
                f"{rigl:.2f}x | {static:.2f}x | {report.size_bytes / 1e6:.2f} "
                f"({report.size_bytes / report.dense_size_bytes:.2f}x) |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--delta-t", type=int, default=100)
    parser.add_argument("--out", default=None, help="write the Markdown here")
    args = parser.parse_args(argv)
    command = "benchmarks/flops_table.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# FLOPs and model size",
        "",
        "Inference FLOPs per sample count convolutions, linear layers and matrix products at 2 FLOPs "
        "per multiply-accumulate (BatchNorm, activations, pooling, additions not counted); a sparse "
        "layer costs its density times its dense FLOPs. Training FLOPs per step in forward passes "
        "(f_S sparse, f_D dense): dense 3 f_D, static and SET 3 f_S, RigL "
        f"(3 f_S dt + 2 f_S + f_D) / (dt + 1) with dt = {args.delta_t}; multipliers are to dense training. "
        "Model size: 4 bytes per active weight + 1 bit per weight of each sparse layer (its mask) + every "
        "dense parameter. Uniform keeps the first layer dense, as does ERK at 0.99 sparsity; the other "
        "layers share the rest so that the active weights are exactly (1 - sparsity) of the sparsified "
        "weights. Computed by `fxsparse.flop_report` from the fx graph on fake tensors "
        f"({datetime.date.today().isoformat()}, torch {torch.__version__}, timm {timm.__version__}).",
        "",
        "Produced by:",
        "",
        "```",
        f".venv/bin/python {command.strip()}",
        "```",
        "",
    ]
    for name in args.models.split(","):
        lines += table(name, args.delta_t)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
