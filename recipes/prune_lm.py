"""One-shot pruning of the character-level GPT-2: magnitude against Wanda, then fine-tuning that keeps
the topology (static) or improves it (RigL).

Per seed: the dense model is trained by recipes/train.py's ``gpt2char-shakespeare`` recipe exactly
(the LM study's dense runs, docs/language_model.md); it is pruned one-shot to density 0.5 and 0.2
(50% and 80% sparsity; every linear weight of the blocks at that density, ``init="uniform",
dense=[]``; the tied embedding stays dense, as the LM recipe and Wanda keep it) with
``fxsparse.prune_oneshot``: by magnitude (compared over each layer) and by Wanda (``|W| * ||X||``,
compared within each output unit, the layers pruned in graph order on ``--calibration-batches``
training batches). Test bits per character are measured right after pruning, then each pruned
model is fine-tuned for ``--finetune-steps`` steps with ``method="static"`` (the one-shot
topology kept) and ``method="rigl"`` (drop and grow every ``delta_t`` steps, the recipe's RigL
settings), and measured again. The dense model fine-tuned for the same steps is the reference
for what the extra steps alone buy. Fine-tuning: AdamW (the recipe's weight decay), peak lr
``--finetune-lr``, 5% warm-up then cosine to 0, a fresh optimizer; every run of a seed sees the
same batches in the same order.

Records: one JSON per run under ``--out-dir`` (``dense-seed0``, ``dense-ft-seed0``,
``pruned-wanda-d0.2-seed0``, ``wanda-d0.2-rigl-seed0`` ...); a run whose record exists is
skipped, so an interrupted sweep resumes where it stopped. The dense weights the pruning starts
from are kept under ``--runs-dir`` (retrained when missing). Each run is its own
process with one torch thread, ``--workers`` at once; ``--workers 0`` runs everything in this
process. Flags this script does not know go to recipes/train.py (``--data-root`` ...).

Measured (docs/pruning.md; 3 seeds, 500 fine-tuning steps, 29 minutes with ``--workers 2`` on this
project's 2-core CPU, shared): Wanda's topology beats magnitude's right after pruning (2.96 against
3.00 test bits/char at 50% sparsity, 3.96 against 4.20 at 80%; dense 2.79), but after fine-tuning
the two are within seed noise of each other (2.73 / 2.83); RigL fine-tuning did not beat static in
any of the four cells (worse by 0.001 to 0.007 bits/char).

Run:
    python recipes/prune_lm.py --workers 2 --finetune-steps 500          # train what is missing
    python recipes/prune_lm.py --report --finetune-steps 500             # docs/pruning.md
    python recipes/prune_lm.py --smoke --workers 0 && python recipes/prune_lm.py --smoke --report
                                              # a few steps of each run on a toy corpus, under runs/prune_lm_smoke
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]
import fxsparse  # noqa: E402
from fxsparse.safe_io import load_torch  # noqa: E402  (weights_only: a checkpoint never runs code)
import lm  # noqa: E402  (recipes/lm.py: data, model, evaluation)
import train  # noqa: E402  (recipes/train.py: the config, the dense recipe, the lr schedule)
from fxsparse.oneshot import prune_oneshot  # noqa: E402
from report import _md_table  # noqa: E402  (recipes/report.py)

__all__ = ["DENSITIES", "SCORES", "METHODS", "jobs", "prune", "finetune", "render", "main"]

RECIPE = "gpt2char-shakespeare"
DENSITIES = (0.5, 0.2)
SCORES = ("magnitude", "wanda")
METHODS = ("static", "rigl")
WARMUP = 0.05  # of the fine-tuning steps
SMOKE = ["--batch-size", "4", "--context", "16", "--lm-width", "16", "--lm-heads", "2", "--delta-t", "2"]


# --- configuration -----------------------------------------------------------------------------


def config(args: argparse.Namespace, extra: list[str], seed: int) -> train.Config:
    """The LM recipe's config for ``seed``, ``--steps`` as 4 epochs (its warm-up and schedule)."""
    if args.steps % 4:
        raise SystemExit(f"error: --steps must be a multiple of 4 (the recipe's 4 epochs), got {args.steps}")
    return train.parse_args(["--recipe", RECIPE, "--method", "dense", "--seed", str(seed), "--epochs", "4",
                             "--steps-per-epoch", str(args.steps // 4), *extra])


def jobs(seeds: list[int], scores=SCORES, densities=DENSITIES, methods=METHODS) -> list[tuple[str, list[str]]]:
    """``(job, the records it writes)``: per seed the dense run, the dense fine-tuning reference,
    and per score and density one pruning (its record and one per fine-tuning method)."""
    out = []
    for s in seeds:
        out.append((f"dense-seed{s}", [f"dense-seed{s}"]))
        out.append((f"dense-ft-seed{s}", [f"dense-ft-seed{s}"]))
        for score in scores:
            for d in densities:
                out.append((f"prune-{score}-d{d}-seed{s}",
                            [f"pruned-{score}-d{d}-seed{s}", *(f"{score}-d{d}-{m}-seed{s}" for m in methods)]))
    return out


def _write(out_dir: Path, name: str, record: dict[str, Any]) -> None:
    partial = out_dir / f"{name}.json.tmp"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, out_dir / f"{name}.json")  # never a half-written record


# --- the runs ----------------------------------------------------------------------------------


_RUN_FIELDS = ("run_dir", "threads", "resume", "resume_from", "device")  # how a run ran, not what it trained


def dense_checkpoint(args: argparse.Namespace, extra: list[str], seed: int) -> Path | None:
    """The final checkpoint of the dense run of ``seed`` (recipes/train.py's), or None when it is
    missing or was trained with another config."""
    checkpoint = Path(args.runs_dir) / f"dense-seed{seed}" / train.CHECKPOINT
    if not checkpoint.exists():
        return None
    saved = load_torch(checkpoint, map_location="cpu", what="checkpoint")["config"]
    wanted = dataclasses.asdict(config(args, extra, seed))
    same = all(saved.get(k) == v for k, v in wanted.items() if k not in _RUN_FIELDS)
    return checkpoint if same else None


def train_dense(args: argparse.Namespace, extra: list[str], seed: int) -> None:
    """The LM recipe's dense run of ``seed`` (recipes/train.py, unchanged), its record written here."""
    began = time.time()
    record = train.main(["--recipe", RECIPE, "--method", "dense", "--seed", str(seed), "--epochs", "4",
                         "--steps-per-epoch", str(args.steps // 4), *extra,
                         "--run-dir", str(Path(args.runs_dir) / f"dense-seed{seed}")])
    _write(Path(args.out_dir), f"dense-seed{seed}", {**record, "name": f"dense-seed{seed}", "kind": "dense",
                                                     "seed": seed, "wall_seconds": time.time() - began})


def calibration(cfg: train.Config, tokens: torch.Tensor, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` training batches of the recipe's shape, fixed per seed (Wanda's calibration set)."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + 77)
    return [{"input_ids": (x := lm.sample(tokens, cfg.batch_size, cfg.context, gen)), "labels": x} for _ in range(n)]


def prune(cfg: train.Config, dense: torch.nn.Module, score: str, density: float,
          batches: list[dict[str, torch.Tensor]]) -> fxsparse.SparseGraphModule:
    """The dense model pruned one-shot: every block's linear weights at ``density``."""
    return prune_oneshot(dense, density, "uniform", dense=[], score=score, calibration=batches if score == "wanda" else None,
                         example_inputs=lm.example(cfg), seed=cfg.seed)


def finetune(cfg: train.Config, model: torch.nn.Module, method: str | None, tokens: torch.Tensor, steps: int,
             lr: float) -> float:
    """``steps`` steps of AdamW (warm-up, cosine) on ``model``; a sparse model's topology under
    ``method`` (``"static"``, ``"rigl"``), a dense one's (``None``) plain. Returns the seconds."""
    began = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    shape = dataclasses.replace(cfg, warmup_epochs=WARMUP, lr_schedule="cosine")
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, train._lr_lambda(shape, steps, steps))
    topology = None if method is None else fxsparse.TopologyScheduler(
        model, opt, steps, delta_t=cfg.delta_t, alpha=cfg.alpha, end_fraction=cfg.end_fraction, method=method)
    order = torch.Generator().manual_seed(cfg.seed * 100_003 + 991)  # the same batches for every run of a seed
    model.train()
    for _ in tqdm(range(steps), desc=f"fine-tune {method or 'dense'}", leave=False):
        x = lm.sample(tokens, cfg.batch_size, cfg.context, order)
        model(input_ids=x, labels=x).loss.backward()
        if topology is None or topology.step():
            opt.step()
        opt.zero_grad(set_to_none=True)
        lr_schedule.step()
    return time.perf_counter() - began


def _test(model: torch.nn.Module, data: dict[str, Any], cfg: train.Config) -> dict[str, float]:
    test = lm.evaluate(model, data["test"], cfg.context, torch.device("cpu"))
    return {"test_bits": test["bits"], "test_perplexity": test["perplexity"], "test_accuracy": test["accuracy"]}


def _magnitude_overlap(masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> float:
    """The fraction of the kept weights that magnitude pruning at the same counts keeps too."""
    shared = 0
    for fqn, mask in masks.items():
        top = weights[fqn].detach().abs().flatten().topk(int(mask.sum())).indices
        shared += int(mask.flatten()[top].sum())
    return shared / sum(int(m.sum()) for m in masks.values())


def run_job(args: argparse.Namespace, extra: list[str], job: str) -> None:
    """Trains what ``job`` (a name from :func:`jobs`) still lacks and writes its records."""
    seed = int(job.rsplit("seed", 1)[1])
    out_dir = Path(args.out_dir)
    if job.startswith("dense-seed"):
        train_dense(args, extra, seed)
        return
    checkpoint = dense_checkpoint(args, extra, seed)
    if checkpoint is None:
        raise SystemExit(f"error: no dense weights of seed {seed} under {args.runs_dir}: run job dense-seed{seed} first")
    cfg = config(args, extra, seed)
    data = train.load_data(cfg)
    dense = lm.build(cfg, len(data["vocab"]))
    dense.load_state_dict(load_torch(checkpoint, map_location="cpu", what="checkpoint")["model"])
    common = {"seed": seed, "steps": args.steps, "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
              "config": dataclasses.asdict(cfg)}
    began = time.time()
    if job.startswith("dense-ft"):
        model = copy.deepcopy(dense)
        seconds = finetune(cfg, model, None, data["train"], args.finetune_steps, args.finetune_lr)
        _write(out_dir, job, {"name": job, "kind": "dense-ft", **common, **_test(model, data, cfg),
                              "train_seconds": seconds, "wall_seconds": time.time() - began})
        return
    _, score, d, _ = job.split("-")
    batches = calibration(cfg, data["train"], args.calibration_batches)
    sparse = prune(cfg, dense, score, float(d[1:]), batches)
    pruned = {f: m.clone() for f, m in sparse.masks.items()}
    common.update(score=score, density=float(d[1:]), sparse_density=sparse.density,
                  calibration_batches=args.calibration_batches if score == "wanda" else 0,
                  overlap_with_magnitude=_magnitude_overlap(pruned, dict(dense.named_parameters())))
    name = f"pruned-{score}-{d}-seed{seed}"
    if not (out_dir / f"{name}.json").exists():
        _write(out_dir, name, {"name": name, "kind": "pruned", **common, **_test(sparse, data, cfg),
                               "wall_seconds": time.time() - began})
    for method in args.methods.split(","):
        name, began = f"{score}-{d}-{method}-seed{seed}", time.time()
        if (out_dir / f"{name}.json").exists():
            continue
        model = copy.deepcopy(sparse)
        seconds = finetune(cfg, model, method, data["train"], args.finetune_steps, args.finetune_lr)
        model.verify()
        moved = sum(int((m & ~pruned[f]).sum()) for f, m in model.masks.items()) / sum(int(m.sum()) for m in pruned.values())
        _write(out_dir, name, {"name": name, "kind": "finetuned", "method": method, **common, "mask_changed": moved,
                               **_test(model, data, cfg), "train_seconds": seconds, "wall_seconds": time.time() - began})


# --- the report --------------------------------------------------------------------------------


def mask_figures(args: argparse.Namespace, extra: list[str], directory: Path) -> dict[str, Path]:
    """Mask heatmaps of the first seed's model pruned one-shot at the lowest density, one figure
    per score (``pruning_masks_<score>.png``), from its dense weights; {} where those weights or
    matplotlib are missing (the page then has no figure)."""
    seed, density = int(args.seeds.split(",")[0]), min(float(d) for d in args.densities.split(","))
    checkpoint = dense_checkpoint(args, extra, seed)
    try:
        import fxsparse.plot
        import matplotlib  # noqa: F401
    except ImportError:
        print('note: --figures needs matplotlib (pip install "fxsparse[plot]"): no figures written')
        return {}
    if checkpoint is None:
        print(f"note: no dense weights of seed {seed} under {args.runs_dir}: no figures written")
        return {}
    cfg = config(args, extra, seed)
    data = train.load_data(cfg)
    dense = lm.build(cfg, len(data["vocab"]))
    dense.load_state_dict(load_torch(checkpoint, map_location="cpu", what="checkpoint")["model"])
    batches = calibration(cfg, data["train"], args.calibration_batches)
    figures = {}
    for score in args.scores.split(","):
        sparse = prune(cfg, dense, score, density, batches)
        figures[score] = directory / f"pruning_masks_{score}.png"
        fxsparse.plot.mask_heatmaps(sparse, max_layers=4, path=figures[score])
    return figures


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(by_seed: dict[int, float]) -> str:
    if not by_seed:
        return "-"
    mean, std = _stats(list(by_seed.values()))
    return f"{mean:.4f} +- {std:.4f}"


def _verdict(a_name: str, a: dict[int, float], b_name: str, b: dict[int, float]) -> str:
    """``b`` against ``a`` in bits/char, paired by seed (the runs of a seed start from the same
    dense model and see the same batches): the mean difference, its std over seeds, and in how
    many seeds ``b`` is lower. "beyond one std": the mean difference exceeds that std."""
    seeds = sorted(set(a) & set(b))
    gap, spread = _stats([b[s] - a[s] for s in seeds])
    wins = sum(b[s] < a[s] for s in seeds)
    return (f"{b_name} {'better' if gap < 0 else 'worse'} than {a_name} by {abs(gap):.4f} bits/char "
            f"(per-seed difference {gap:+.4f} +- {spread:.4f}, {'beyond' if abs(gap) > spread else 'within'} one std; "
            f"{b_name} lower in {wins} of {len(seeds)} seeds)")


def _table(records: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """The table's rows and the verdicts under it."""
    def bits(kind: str, **match: Any) -> dict[int, float]:
        return {r["seed"]: r["test_bits"] if kind != "dense" else r["results"][0]["test_bits"] for r in records
                if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items())}

    dense, dense_ft = bits("dense"), bits("dense-ft")
    rows = [["dense", "1", "0%", _cell(dense), "-", "-", "-", str(len(dense))],
            ["dense, fine-tuned alike", "1", "0%", "-", _cell(dense_ft), "-", "-", str(len(dense_ft))]]
    verdicts = []
    for d in DENSITIES:
        for score in SCORES:
            pruned = bits("pruned", score=score, density=d)
            static, rigl = (bits("finetuned", score=score, density=d, method=m) for m in ("static", "rigl"))
            if not (pruned or static or rigl):
                continue
            overlap = [r["overlap_with_magnitude"] for r in records if r.get("kind") == "pruned"
                       and r["score"] == score and r["density"] == d]
            rows.append([score, f"{d:g}", f"{1 - d:.0%}", _cell(pruned), _cell(static), _cell(rigl),
                         f"{statistics.mean(overlap):.3f}" if overlap else "-", str(len(pruned))])
            if static and rigl:
                verdicts.append(f"- density {d:g}, {score}: " + _verdict("static", static, "RigL", rigl) + ".")
            if static and dense_ft:
                verdicts.append(f"- density {d:g}, {score}, static: " + _verdict("dense fine-tuned alike", dense_ft,
                                                                                  "pruned", static) + ".")
        for stage in ("pruned", "static", "rigl"):
            kind, extra = ("pruned", {}) if stage == "pruned" else ("finetuned", {"method": stage})
            mag, wanda = bits(kind, score="magnitude", density=d, **extra), bits(kind, score="wanda", density=d, **extra)
            if mag and wanda:
                where = "right after pruning" if stage == "pruned" else f"after {stage} fine-tuning"
                verdicts.append(f"- density {d:g}, {where}: " + _verdict("magnitude", mag, "Wanda", wanda) + ".")
    return rows, verdicts


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int, int]:
    """``(mean of b - a, its std, seeds where b is lower, seeds)`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    gap, spread = _stats([b[s] - a[s] for s in seeds]) if seeds else (float("nan"), 0.0)
    return gap, spread, sum(b[s] < a[s] for s in seeds), len(seeds)


def _findings(records: list[dict[str, Any]]) -> list[str]:
    """What the table shows, in sentences computed from it (the same records, the same pairing)."""
    def bits(kind: str, **match: Any) -> dict[int, float]:
        return {r["seed"]: r["test_bits"] for r in records if r.get("kind") == kind
                and all(r.get(k) == v for k, v in match.items())}

    lines, rigl_cells, rigl_better, rigl_wins, rigl_seeds = [], 0, 0, 0, 0
    steps = next((r["finetune_steps"] for r in records if r.get("kind") == "finetuned"), "the")
    for d in DENSITIES:
        after = _paired(bits("pruned", score="magnitude", density=d), bits("pruned", score="wanda", density=d))
        tuned = _paired(bits("finetuned", score="magnitude", density=d, method="static"),
                        bits("finetuned", score="wanda", density=d, method="static"))
        if after[3] and tuned[3]:
            lines.append(
                f"- At {1 - d:.0%} sparsity Wanda's topology is {abs(after[0]):.3f} bits/char "
                f"{'better' if after[0] < 0 else 'worse'} than magnitude's right after pruning (lower in {after[2]} of "
                f"{after[3]} seeds); after {steps} static fine-tuning steps the difference is {tuned[0]:+.4f} +- "
                f"{tuned[1]:.4f} bits/char (Wanda - magnitude, per seed): "
                + ("within one std: after fine-tuning the two topologies are indistinguishable here." if abs(tuned[0]) <= tuned[1]
                   else f"beyond one std, part of the difference survives fine-tuning ({abs(tuned[0]) / abs(after[0]):.0%} "
                        "of it)."))
        for score in SCORES:
            gap, spread, wins, n = _paired(bits("finetuned", score=score, density=d, method="static"),
                                           bits("finetuned", score=score, density=d, method="rigl"))
            if n:
                rigl_cells += 1
                rigl_better += gap < 0 and abs(gap) > spread
                rigl_wins, rigl_seeds = rigl_wins + wins, rigl_seeds + n
        ft = _paired(bits("dense-ft"), bits("finetuned", score="wanda", density=d, method="static"))
        if ft[3]:
            lines.append(f"- Fine-tuned at {1 - d:.0%} sparsity (Wanda, static), the model trails the dense model "
                         f"fine-tuned alike by {ft[0]:.3f} bits/char ({ft[3]} seeds).")
    if rigl_cells:
        lines.append(
            f"- RigL beat static beyond one std in {rigl_better} of the {rigl_cells} (score, density) cells, and had the "
            f"lower test bits in {rigl_wins} of {rigl_seeds} seed-level comparisons: improving the one-shot topology "
            "during fine-tuning " + ("did not pay here." if rigl_better == 0 else "paid in the cells named above."))
    return lines


def render(records: list[dict[str, Any]], commands: list[str], figures: dict[str, str] | None = None) -> str:
    """The page (docs/pruning.md) from the records; ``figures``: {score: image path relative to the page}."""
    rows, verdicts = _table(records)
    cfg = next((r["config"] for r in records if r.get("kind") == "dense"), {})
    ft = next((r for r in records if r.get("kind") in ("finetuned", "dense-ft")), {})
    wanda = next((r for r in records if r.get("score") == "wanda"), {})
    moved = [r["mask_changed"] for r in records if r.get("method") == "rigl"]
    wall = sum(r.get("wall_seconds", 0.0) for r in records)
    lines = [
        "# One-shot pruning of the character-level GPT-2: magnitude and Wanda, then static or RigL fine-tuning",
        "",
        "`recipes/prune_lm.py` trains the dense 2-layer GPT-2 of docs/language_model.md "
        f"(`recipes/train.py --recipe gpt2char-shakespeare`, {cfg.get('epochs', 0) * cfg.get('steps_per_epoch', 0)} "
        "steps), prunes it one-shot with `fxsparse.prune_oneshot` to density 0.5 and 0.2 (every linear weight of the "
        "blocks at that density, `init=\"uniform\", dense=[]`; the tied embedding stays dense) by magnitude (`|W|`, "
        "compared over each layer) and by Wanda (Sun et al. 2023: `|W_ij| * ||X_j||_2`, compared within each output "
        "unit, the layers pruned one after the other in graph order on activations of the model pruned so far; "
        f"calibration: {wanda.get('calibration_batches', '-')} training batches of {cfg.get('batch_size')} x "
        f"{cfg.get('context')} characters), measures test bits per character right after pruning, then fine-tunes "
        f"each pruned model for {ft.get('finetune_steps', '-')} steps (AdamW, peak lr {ft.get('finetune_lr', '-')}, "
        f"{WARMUP:.0%} warm-up, cosine to 0, a fresh optimizer) with `method=\"static\"` (the one-shot topology "
        f"kept) and with `method=\"rigl\"` (drop and grow every {cfg.get('delta_t')} steps, alpha {cfg.get('alpha')}, "
        f"until {cfg.get('end_fraction', 0.75):.0%} of the fine-tuning), and measures again. Every run of a seed sees "
        "the same batches in the same order. The second dense row is the dense model fine-tuned the same way: what "
        "the extra steps buy without pruning.",
        "",
        "Test bits per character on the whole test split (lower is better), mean +- std over seeds; `overlap`: the "
        "fraction of the kept weights that magnitude pruning (over the layer, at the same counts) keeps too"
        + (f"; RigL replaced {statistics.mean(moved):.1%} of the one-shot topology on average during fine-tuning"
           if moved else "") + ".",
        "",
        *_md_table(["score", "density", "sparsity", "after pruning", "fine-tuned, static", "fine-tuned, RigL",
                    "overlap", "seeds"], rows),
        "",
        "## What it shows",
        "",
        *_findings(records),
        "",
        "Reading it: the first dense row is docs/language_model.md's dense runs (the same recipe and seeds). Wanda "
        "here prunes layer by layer (`sequential=True`), a finer variant of the paper's block by block, on far less "
        "calibration text than the paper's 128 sequences of 2,048 tokens; its published gains are on large language "
        "models, whose activations have a few features of outsized magnitude (why the input norm matters); how much "
        "of that a 2-layer model of width 96 has was not measured. Where RigL does not beat static, the likely reasons (not measured here) are the short "
        "fine-tuning (a handful of topology updates) and that each update replaces trained weights with connections "
        "that start at zero while the learning rate is already decaying; RigL's published gains come from long "
        "training from scratch, and on this model even that favoured SET (docs/language_model.md).",
        "",
        "## Verdicts",
        "",
        "Each comparison paired by seed (the runs of a seed start from the same dense model and see the same "
        "batches): the mean of the per-seed differences, their std, and in how many seeds the second is lower.",
        "",
        *verdicts,
        "",
        *_figure_section(figures or {}),
        f"{len(records)} records, {wall / 60:.1f} minutes of run time in all (each run one process with one torch "
        "thread, two at a time on a 2-core CPU shared with other work). A small model trained briefly on CPU: the "
        "table compares the methods at this budget, not at convergence or at scale.",
        "",
        "Reproduce:",
        "",
        "```",
        *commands,
        "```",
    ]
    return "\n".join(lines) + "\n"


def _figure_section(figures: dict[str, str]) -> list[str]:
    if not figures:
        return []
    lines = ["## The masks", "",
             "The first seed's model pruned one-shot at the lowest density, the first four masked layers (bright: "
             "kept), by score (`python recipes/prune_lm.py --report --figures docs/img`, "
             "`fxsparse.plot.mask_heatmaps`). GPT-2's `Conv1D` weights are stored `(in, out)`; the heatmaps draw "
             "them transposed, rows the output units and columns the input features, as for any layer "
             "(`fxsparse.oneshot.output_axes`). Wanda compares within each output unit, so every row keeps the same "
             "count, and its vertical stripes are input features of large activation norm; magnitude compares over "
             "the layer.", ""]
    for score, path in figures.items():
        lines += [f"{score}:", "", f"![{score} masks]({path})", ""]
    return lines


# --- main --------------------------------------------------------------------------------------


def _smoke_corpus(root: Path) -> Path:
    """A few hundred lines of toy verse, a plays folder as fxsparse.data.load_shakespeare reads."""
    plays = root / "smoke_plays" / "plays"
    plays.mkdir(parents=True, exist_ok=True)
    words = ["light", "window", "breaks", "sun", "moon", "night", "love", "sweet", "sorrow", "rose"]
    verse = "".join(f"**ROMEO**  \nBut soft, what {words[i % 10]} through yonder {words[(3 * i) % 10]} "
                    f"{words[(7 * i) % 10]}s?  \n" for i in range(400))
    (plays / "play.md").write_text(verse)
    return plays.parent


def _todo(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The jobs with a record missing; a seed's dense run too when its weights are missing (or
    were trained otherwise) and a job of that seed needs them."""
    out_dir = Path(args.out_dir)
    cells = jobs([int(s) for s in args.seeds.split(",")], args.scores.split(","),
                 [float(d) for d in args.densities.split(",")], args.methods.split(","))
    todo = [job for job, names in cells if not all((out_dir / f"{n}.json").exists() for n in names)]
    for seed in {int(j.rsplit("seed", 1)[1]) for j in todo if not j.startswith("dense-seed")}:
        if f"dense-seed{seed}" not in todo and dense_checkpoint(args, extra, seed) is None:
            todo.append(f"dense-seed{seed}")
    return sorted(todo, key=lambda j: (not j.startswith("dense-seed"), int(j.rsplit("seed", 1)[1])))


def _sweep(args: argparse.Namespace, extra: list[str], argv: list[str], todo: list[str]) -> None:
    """Runs ``todo``, ``--workers`` at once, each job after its seed's dense run."""
    ready = {int(j.rsplit("seed", 1)[1]): threading.Event() for j in todo}
    for seed, event in ready.items():
        if f"dense-seed{seed}" not in todo:
            event.set()

    def work(job: str) -> None:
        seed, began = int(job.rsplit("seed", 1)[1]), time.time()
        if not job.startswith("dense-seed"):
            ready[seed].wait()
        try:
            if args.workers == 0:
                run_job(args, extra, job)
                status = "done"
            else:
                done = subprocess.run([sys.executable, __file__, *argv, "--job", job], capture_output=True, text=True)
                status = "done" if done.returncode == 0 else "FAILED: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        finally:
            if job.startswith("dense-seed"):
                ready[seed].set()
        print(f"{job} {status} in {time.time() - began:.0f} s", flush=True)

    # the dense runs come first in the queue: a job waits for its seed's dense run only once every
    # dense run has a worker, so no worker waits on a run that has none
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        list(pool.map(work, todo))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=None, help="the records (default results/prune_lm; --smoke: under runs/)")
    parser.add_argument("--runs-dir", default=None, help="the dense weights the pruning starts from (default runs/prune_lm)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1000, help="dense training steps (the LM recipe's 1,000)")
    parser.add_argument("--finetune-steps", type=int, default=500)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="fine-tuning methods")
    parser.add_argument("--scores", default=",".join(SCORES))
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each a process; 0: all in this one")
    parser.add_argument("--report", action="store_true", help="write the page from the records (nothing is trained)")
    parser.add_argument("--out", default=None, help="the page (default docs/pruning.md; with --smoke, in --out-dir)")
    parser.add_argument("--figures", default=None, help="with --report: draw the masks into this folder (the page shows them)")
    parser.add_argument("--smoke", action="store_true", help="a toy corpus, a tiny model, a few steps of each run")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    home = "runs/prune_lm_smoke" if args.smoke else "runs/prune_lm"  # a smoke run never touches the real ones
    args.runs_dir = args.runs_dir or home
    args.out_dir = args.out_dir or (f"{home}/records" if args.smoke else "results/prune_lm")
    if args.smoke:
        args.steps, args.finetune_steps, args.calibration_batches = 8, 4, 2
        extra = ["--data-root", str(_smoke_corpus(Path(args.runs_dir))), *SMOKE, *extra]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.job is not None:  # one run, in a process of its own
        torch.set_num_threads(1)
        run_job(args, [*extra, "--threads", "1"], args.job)
        return
    if not args.report:
        todo = _todo(args, extra)
        print(f"{len(todo)} jobs to run, records in {args.out_dir}", flush=True)
        _sweep(args, extra, argv, todo)
    else:
        records = [json.loads(p.read_text()) for p in sorted(Path(args.out_dir).glob("*.json"))]
        out = Path(args.out or (Path(args.out_dir) / "pruning.md" if args.smoke else "docs/pruning.md"))
        flags = " --smoke" if args.smoke else f" --finetune-steps {args.finetune_steps}"
        drawn = mask_figures(args, extra, Path(args.figures)) if args.figures else {}
        figures = {score: os.path.relpath(path, out.parent) for score, path in drawn.items()}
        report = f"python recipes/prune_lm.py --report{flags}" + (f" --figures {args.figures}" if args.figures else "")
        out.write_text(render(records, [f"python recipes/prune_lm.py --workers 2{flags}", report], figures))
        print(f"wrote {out} from {len(records)} records")


if __name__ == "__main__":
    main()
