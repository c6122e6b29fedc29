"""Which exact kernel zeroes the inactive entries of a weight fastest on CPU: weight x mask by
mask dtype, and the in-place forms a masked op can use.

Times each on a float32 weight the size of a ResNet-18 layer-4 convolution (512 x 512 x 3 x 3),
repeated in the cache, as a multiple of the float32 out-of-place multiply: ``w * m`` with the
mask as bool, uint8 and float32, ``mul_``, ``where``, ``masked_fill_``, an integer ``and`` with a
4-byte integer copy of the mask (fxsparse before issue 17) and the integer-times-bool multiply of
the weight's bits that fxsparse uses (no copy of the mask; PyTorch converts the bool operand on
the fly). A bool or uint8 mask in a float multiply costs several times more.

``--large`` times instead the pass fxsparse makes over a large weight (its bits times the bool
mask, in place) whole and in the slices ``fxsparse.masking`` uses, at sizes from a ResNet
convolution to a language model's MLP matrix, with the caches flushed before every pass (as
in a training step, where the weights were last touched a whole forward and backward ago).

Run:
    .venv/bin/python benchmarks/mask_dtype.py [--threads 2] [--reps 50]
    .venv/bin/python benchmarks/mask_dtype.py --large [--threads 2] [--reps 10]
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


def _time_cold(fn: Callable[[], object], reps: int, flush: torch.Tensor) -> float:
    samples = []
    for _ in range(reps + 1):
        flush.add_(1.0)  # evicts the caches
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def large(args: argparse.Namespace) -> None:
    from fxsparse import masking

    flush = torch.empty(64 * 2**20)  # 256 MiB, several times the last-level cache
    print(f"bits(w) *= mask in place, caches flushed, {args.threads} threads, torch {torch.__version__}")
    print(f"{'weights':>10}  {'whole ns/weight':>15}  {'sliced ns/weight':>16}  {'whole / sliced':>14}")
    sliced_above = masking._SLICED_ABOVE
    for numel in (512 * 512 * 9, 4096 * 1024, 4096 * 2304, 4096 * 4096, 4096 * 11008):
        weight = torch.randn(numel)
        mask = torch.rand(numel) < 0.1
        bits = weight.view(torch.int32)
        times = {}
        for name, threshold in (("whole", numel), ("sliced", 0)):
            masking._SLICED_ABOVE = threshold
            times[name] = _time_cold(lambda: masking._mul_bits(bits, bits, mask), args.reps, flush) * 1e9 / numel
        masking._SLICED_ABOVE = sliced_above
        print(f"{numel:>10}  {times['whole']:>15.2f}  {times['sliced']:>16.2f}  {times['whole'] / times['sliced']:>13.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 50; 10 with --large)")
    parser.add_argument("--numel", type=int, default=512 * 512 * 3 * 3)
    parser.add_argument("--large", action="store_true", help="time the sliced pass over large weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.large:
        args.reps = args.reps or 10
        large(args)
        return
    args.reps = args.reps or 50
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
    cases["bits(w) *= mask, in place (int32 x bool: fxsparse)"] = lambda: bits.mul_(bool_mask)
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
