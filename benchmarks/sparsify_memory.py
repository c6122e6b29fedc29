"""Peak extra memory of ``sparsify`` on a large model, copying it and in place.

Each variant runs in a child process of its own: it builds a Llama from a config (random
weights, fp32), resets the kernel's peak-resident-memory mark (``/proc/self/clear_refs``), runs
``fxsparse.sparsify(model, 0.2, example_inputs=...)`` through the torch.export front-end, and
reports the peak resident memory above what it held before the call, as a multiple of the
model's parameter bytes. ``inplace=True`` builds the sparse module on the model's own tensors:
the masks (1 byte a weight) and the capture are what remains.

    python benchmarks/sparsify_memory.py                       # the 248 M-parameter Llama of docs/transformers.md
    python benchmarks/sparsify_memory.py --layers 2 --width 128 --vocab 1000   # the smoke run of the tests
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
from measure import run_variants, status_kb  # noqa: E402


def child(args: argparse.Namespace) -> dict:
    import gc
    import time

    import torch
    import transformers

    import fxsparse

    torch.set_num_threads(args.threads)
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.intermediate or int(2.75 * args.width),
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64), max_position_embeddings=256,
        use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ids = torch.randint(1, args.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
        f.write("5")
    began = time.perf_counter()
    sparse = fxsparse.sparsify(model, 0.2, example_inputs={"input_ids": ids}, inplace=args.variant == "inplace")
    seconds = time.perf_counter() - began
    peak = status_kb("VmHWM")
    masks_mb = sum(m.numel() for m in sparse.masks.values()) / 2**20
    return {"variant": args.variant, "params": params, "model_mb": model_mb, "peak_extra_mb": (peak - before) / 1024,
            "masks_mb": masks_mb, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["copy", "inplace"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="append the records to this file")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    results = run_variants(__file__, sys.argv[1:], ["copy", "inplace"], _REPO_ROOT)
    first = results["copy"]
    print(f"Llama, {first['params'] / 1e6:.0f} M parameters ({first['model_mb']:.0f} MB fp32), density 0.2, torch.export "
          f"front-end, {args.threads} threads")
    print("| sparsify | peak extra memory (MB) | x the model | masks (MB) | seconds |")
    print("|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['variant']} | {r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / r['model_mb']:.2f}x | "
              f"{r['masks_mb']:.0f} | {r['seconds']:.1f} |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), **results}) + "\n")


if __name__ == "__main__":
    main()
