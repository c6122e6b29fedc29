"""Why the masked op multiplies by a float copy of the mask: weight x mask, by mask dtype.

Times ``w * m`` on CPU for a float32 weight the size of a ResNet-18 layer-4 convolution
(512 x 512 x 3 x 3) with the mask as bool, uint8 and float32, plus the in-place forms the op
uses, and prints each as a multiple of the float32 out-of-place multiply. PyTorch's
mixed-dtype elementwise loop is not vectorized, so a bool mask costs several times more than a
float one of four times the bytes.

Run:
    .venv/bin/python benchmarks/mask_dtype.py [--threads 2] [--reps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["main"]


def _time(fn: Callable[[], object], reps: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--numel", type=int, default=512 * 512 * 3 * 3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.numel, generator=gen)
    bool_mask = torch.rand(args.numel, generator=gen) < 0.1
    masks = {"bool": bool_mask, "uint8": bool_mask.to(torch.uint8), "float32": bool_mask.float()}
    scratch = weight.clone()
    cases: dict[str, Callable[[], object]] = {f"w * mask ({k})": (lambda m=m: weight * m) for k, m in masks.items()}
    cases["w.mul_(mask) in place (bool)"] = lambda: scratch.mul_(bool_mask)
    cases["w.mul_(mask) in place (float32)"] = lambda: scratch.mul_(masks["float32"])
    cases["torch.where(mask, w, 0) (bool)"] = lambda: torch.where(bool_mask, weight, 0.0)
    # the in-place zeroing passes the masked op can make (weight and gradient)
    int_mask = torch.zeros(args.numel, dtype=torch.int32).masked_fill_(bool_mask, -1)
    inverse = ~bool_mask
    zero = torch.zeros(())
    bits = scratch.view(torch.int32)
    cases["bits(w) &= int mask, in place (int32)"] = lambda: bits.bitwise_and_(int_mask)
    cases["w.masked_fill_(~mask, 0), in place (bool, ~mask kept)"] = lambda: scratch.masked_fill_(inverse, 0.0)
    cases["w.masked_fill_(~mask, 0), in place (bool, ~mask made)"] = lambda: scratch.masked_fill_(~bool_mask, 0.0)
    cases["torch.where(mask, w, 0, out=w) (bool)"] = lambda: torch.where(bool_mask, scratch, zero, out=scratch)
    times = {name: _time(fn, args.reps) for name, fn in cases.items()}
    base = times["w * mask (float32)"]
    print(f"{args.numel} float32 weights, {args.threads} threads, torch {torch.__version__}")
    width = max(map(len, times))
    for name, seconds in times.items():
        print(f"{name:<{width}}  {seconds * 1e6:9.1f} us  {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
