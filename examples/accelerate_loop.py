"""RigL in a loop of your own with Hugging Face ``accelerate``: the demo's SmallCNN on Fashion-MNIST.

    python examples/accelerate_loop.py                   # 2 epochs, ~1 min on 2 CPU cores
    accelerate launch --num_processes 2 examples/accelerate_loop.py   # several processes

The loop is accelerate's usual one with one added call, ``sparse.step()`` before
``optimizer.step()`` (docs/accelerate.md); ``accelerator.save_state`` keeps the scheduler.
"""

from __future__ import annotations

import argparse

import accelerate
import torch

import fxsparse
from fxsparse.data import load_fashion_mnist
from fxsparse.integrations.accelerate import SparseTraining, optimizer_steps
from fxsparse.models import SmallCNN


def loader(limit: int | None, synthetic: bool) -> torch.utils.data.DataLoader:
    images = labels = None
    if not synthetic:
        try:
            images, labels = load_fashion_mnist(train=True)
        except (FileNotFoundError, OSError) as e:
            print(f"Fashion-MNIST not found ({e}); training on random images")
    if images is None:
        gen = torch.Generator().manual_seed(0)
        images, labels = torch.randn(2048, 1, 28, 28, generator=gen), torch.randint(0, 10, (2048,), generator=gen)
    data = torch.utils.data.TensorDataset(images[:limit], labels[:limit])
    return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> SparseTraining:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--precision", default="no", help='"no", "bf16" or "fp16"')
    parser.add_argument("--limit", type=int, default=None, help="use the first N training images")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--out", default="runs/accelerate_loop")
    args = parser.parse_args(argv)

    accelerator = accelerate.Accelerator(gradient_accumulation_steps=args.accumulate, mixed_precision=args.precision)
    torch.manual_seed(0)
    net = fxsparse.sparsify(SmallCNN(num_classes=10), args.density, "erk")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    model, optimizer, data = accelerator.prepare(net, optimizer, loader(args.limit, args.synthetic))
    sparse = SparseTraining(accelerator, model, optimizer, optimizer_steps(accelerator, data, args.epochs), delta_t=50)
    accelerator.register_for_checkpointing(sparse)
    for epoch in range(args.epochs):
        for x, y in data:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                sparse.step()  # on a topology-update iteration the step below updates nothing
                optimizer.step()
                optimizer.zero_grad()
        accelerator.print(f"epoch {epoch}: loss {loss.item():.3f}", sparse.stats())
    accelerator.save_state(args.out)
    accelerator.print(net.summary())
    return sparse


if __name__ == "__main__":
    main()
