"""RigL on a Llama from a config under FSDP2: ``fully_shard`` on each decoder layer and on the root.

Runs anywhere: under ``torchrun`` (one process per GPU, NCCL), or on this machine's CPUs as
``--spawn 2`` gloo processes. Each rank trains on its part of a random-token batch, the topology
updates are those of one process with the whole batch, and a tensors-only DCP checkpoint is
written and read back at the end::

    .venv/bin/python examples/fsdp_llama.py --spawn 2 --steps 20          # 2 CPU processes
    torchrun --nproc-per-node 8 examples/fsdp_llama.py --steps 1000       # 8 GPUs

``--trainer`` trains the same model with ``transformers.Trainer(fsdp=...)`` instead (accelerate's
FSDP2 plugin, which runs on accelerators only: a GPU machine, under ``torchrun``). The decoder
layers ``keep_blocks()`` keeps are one class named as the model's (``LlamaDecoderLayer``), so the
plugin's ``transformer_layer_cls_to_wrap`` finds them as it finds the dense model's.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxsparse


def llama(layers: int, width: int, vocab: int) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def sparse_llama(args: argparse.Namespace) -> fxsparse.SparseGraphModule:
    example = torch.randint(0, args.vocab, (1, args.length))
    # captured as training calls it (with labels): under fully_shard a new call signature cannot be captured
    sparse = fxsparse.sparsify(llama(args.layers, args.width, args.vocab), args.density, "erk",
                               example_inputs=((), {"input_ids": example, "labels": example}))
    sparse.keep_blocks()  # the decoder layers as modules whose forward runs: FSDP gathers one at a time
    return sparse


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    sparse = sparse_llama(args).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in sparse.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sparse, mesh=mesh)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, args.steps, delta_t=args.delta_t)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        batch = torch.randint(0, args.vocab, (args.batch, args.length), generator=gen)
        ids = batch[rank * args.batch // world:(rank + 1) * args.batch // world].to(device)
        out = sparse(input_ids=ids, labels=ids)
        out.loss.backward()
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {out.loss.item():.4f}, density {sparse.density:.4f}, updates {len(scheduler.history)}", flush=True)
    checkpoint = args.checkpoint or os.path.join(tempfile.gettempdir(), "fxsparse_fsdp_llama")
    fxsparse.dcp.save(checkpoint, sparse, optimizer, scheduler)
    fxsparse.dcp.load(checkpoint, sparse, optimizer, scheduler)
    local = sum(m._local_tensor.numel() for m in sparse.masks.values())
    total = sum(m.numel() for m in sparse.masks.values())
    if rank == 0:
        print(f"checkpoint {checkpoint} written and read back; rank 0 holds {local:,} of {total:,} mask entries", flush=True)


def trainer(args: argparse.Namespace) -> None:
    import transformers

    if not torch.cuda.is_available():
        raise SystemExit("accelerate's FSDP plugin runs on accelerators only: run --trainer on a GPU machine under torchrun")
    sparse = sparse_llama(args)
    gen = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, args.vocab, (args.steps * args.batch, args.length), generator=gen)]
    training = transformers.TrainingArguments(
        output_dir=args.checkpoint or "fsdp_llama_trainer", per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-3, report_to=[], fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    from fxsparse.integrations.transformers import SparseTrainingCallback

    transformers.Trainer(model=sparse, args=training, train_dataset=rows,
                         callbacks=[SparseTrainingCallback(delta_t=args.delta_t)]).train()


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, world, args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawn", type=int, default=0, help="start this many gloo processes on the CPU (else: torchrun's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--delta-t", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--checkpoint", default=None, help="the DCP checkpoint directory")
    parser.add_argument("--trainer", action="store_true", help="transformers.Trainer(fsdp=...) (GPU, torchrun)")
    args = parser.parse_args(argv)
    if args.trainer:
        trainer(args)
    elif args.spawn:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.spawn, port, args), nprocs=args.spawn, join=True)
    else:  # under torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
