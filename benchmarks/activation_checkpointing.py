"""Peak memory of a sparse training step with and without activation checkpointing.

Each variant runs in a child process of its own (a Llama built from a config, sparsified at
density 0.1 from an example batch by the torch.export front-end, AdamW), which reports the peak
resident memory of a training step above its resident memory before the step (``ru_maxrss``
read before and after, in a process whose allocator returns freed memory), and the bytes of the
tensors autograd kept for the backward outside checkpoints. The ratio checkpointed / plain is
the figure this benchmark exists for; both variants run the same losses (printed).

    python benchmarks/activation_checkpointing.py                      # 8 layers, 256 wide, batch 4 x 512
    python benchmarks/activation_checkpointing.py --layers 2 --seq 64  # the smoke run of the tests
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
from measure import run_variants, status_kb  # noqa: E402


def child(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    import fxsparse

    torch.set_num_threads(args.threads)
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=1000, hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(1, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    sparse = fxsparse.sparsify(model, 0.1, example_inputs=batch)
    del model
    if args.variant == "checkpointed":
        sparse.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
    sparse(**batch)["loss"].backward()  # warm: optimizer state, allocator, first-call work
    opt.step()
    opt.zero_grad(set_to_none=True)
    kept = 0

    def pack(t):
        nonlocal kept
        if not isinstance(t, torch.nn.Parameter):
            kept += t.numel() * t.element_size()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = status_kb("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sparse(**batch)["loss"]
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "loss": float(loss), "step_peak_mb": (max(peak, before) - base) / 1024,
            "kept_mb": kept / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="append the records to this file")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    results = run_variants(__file__, sys.argv[1:], ["plain", "checkpointed"], _REPO_ROOT)
    plain, ckpt = results["plain"], results["checkpointed"]
    print(f"Llama {args.layers} layers x {args.width}, batch {args.batch} x {args.seq} tokens, density 0.1, "
          f"{args.threads} threads")
    print("| variant | loss | step peak above the step's start (MB) | activations kept (MB) |")
    print("|---|---|---|---|")
    for r in (plain, ckpt):
        print(f"| {r['variant']} | {r['loss']:.6f} | {r['step_peak_mb']:.0f} | {r['kept_mb']:.1f} |")
    print(f"checkpointed / plain: step peak {ckpt['step_peak_mb'] / plain['step_peak_mb']:.2f}x, "
          f"activations kept {ckpt['kept_mb'] / plain['kept_mb']:.2f}x; same loss: {ckpt['loss'] == plain['loss']}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), **results}) + "\n")


if __name__ == "__main__":
    main()
