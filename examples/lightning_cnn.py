"""RigL inside Lightning: the demo's SmallCNN on Fashion-MNIST, one ``Callback``.

    python examples/lightning_cnn.py                     # 2 epochs, ~1 min on 2 CPU cores
    python examples/lightning_cnn.py --devices 2         # DDP on 2 CPU processes
    python examples/lightning_cnn.py --resume            # continue from --out/last.ckpt

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (``bash scripts/demo.sh`` installs
it); without it the example trains on random images (``--synthetic`` forces that). Mixed
precision, accumulation and the strategy are Lightning's own options (docs/lightning.md).
"""

from __future__ import annotations

import argparse

import lightning
import torch

import fxsparse
from fxsparse.data import load_fashion_mnist
from fxsparse.integrations.lightning import SparseTrainingCallback
from fxsparse.models import SmallCNN


class SparseClassifier(lightning.LightningModule):
    def __init__(self, density: float = 0.1, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = fxsparse.sparsify(SmallCNN(num_classes=10), density, "erk")
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def data(synthetic: bool, train: bool, limit: int | None) -> torch.utils.data.DataLoader:
    if not synthetic:
        try:
            images, labels = load_fashion_mnist(train=train)
        except (FileNotFoundError, OSError) as e:
            print(f"Fashion-MNIST not found ({e}); training on random images")
            synthetic = True
    if synthetic:
        gen = torch.Generator().manual_seed(int(train))
        images, labels = torch.randn(2048, 1, 28, 28, generator=gen), torch.randint(0, 10, (2048,), generator=gen)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=128, shuffle=train)


def main(argv: list[str] | None = None) -> SparseClassifier:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--precision", default="32-true", help='e.g. "bf16-mixed"')
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of each split")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--out", default="runs/lightning_cnn")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    model = SparseClassifier(args.density)
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=args.out, save_last=True)
    trainer = lightning.Trainer(
        max_epochs=args.epochs, accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", precision=args.precision, accumulate_grad_batches=args.accumulate,
        callbacks=[SparseTrainingCallback(delta_t=50, alpha=0.3, end_fraction=0.75), checkpoint],
        default_root_dir=args.out, log_every_n_steps=20, enable_progress_bar=False,
    )
    trainer.fit(model, data(args.synthetic, True, args.limit), data(args.synthetic, False, args.limit),
                ckpt_path=f"{args.out}/last.ckpt" if args.resume else None)
    if trainer.is_global_zero:
        print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})
        print(model.net.summary())
    return model


if __name__ == "__main__":
    main()
