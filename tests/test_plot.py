"""fxsparse.plot: the figures draw the numbers they claim (read back from the Axes), PNGs are
written, matplotlib stays optional, and log_tensorboard writes the scalars and mask images."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import fxsparse
import fxsparse.plot as plot
from fxsparse import budgets

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

DELTA_T, STEPS = 2, 12  # updates at steps 2, 4, 6, 8 (until 0.75 * 12 = 9)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 4),
    )


@pytest.fixture(scope="module")
def trained():
    """A conv net at density 0.2 (ERK) after a short RigL run: ``(sparse, scheduler)``."""
    torch.manual_seed(0)
    sparse = fxsparse.sparsify(conv_net(), density=0.2, init="erk")
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    scheduler = fxsparse.TopologyScheduler(sparse, opt, total_steps=STEPS, delta_t=DELTA_T)
    for _ in range(STEPS):
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
        nn.functional.cross_entropy(sparse(x), y).backward()
        if scheduler.step():
            opt.step()
        opt.zero_grad()
    sparse.verify()
    return sparse, scheduler


def mask_densities(sparse) -> dict[str, float]:
    return {fqn: int(m.sum()) / m.numel() for fqn, m in sparse.masks.items()}


def bars(ax) -> dict[str, list[float]]:
    """``{series label: bar heights}`` of a bar chart."""
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def line(ax, label: str):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


# ------------------------------------------------------------------------------ density_bars
def test_init_densities_are_what_sparsify_gives():
    for init in ("erk", "er", "uniform"):
        fresh = fxsparse.sparsify(conv_net(), 0.2, init)
        expected = {row["name"]: row["density"] for row in fresh.summary().rows}
        assert plot.init_densities(fresh, init, 0.2) == pytest.approx(expected, abs=1e-12), init
    uniform = plot.init_densities(fresh, "uniform", 0.2)
    assert uniform["0.weight"] == 1.0  # the papers' convention: the first layer dense


def test_density_bars_heights_are_the_budgets_and_the_current_densities(trained):
    sparse, _ = trained
    fig = plot.density_bars(sparse, compare=("erk", "uniform"))
    ax = fig.axes[0]
    heights = bars(ax)
    d = sparse.density
    assert list(heights) == [f"erk at {d:.3g}", f"uniform at {d:.3g}", "current"]
    fqns = list(sparse.masks)
    shapes = {fqn: tuple(m.shape) for fqn, m in sparse.masks.items()}
    erk = budgets.active_counts(shapes, budgets.layer_densities(shapes, d, "erk"))
    assert heights[f"erk at {d:.3g}"] == pytest.approx([erk[f] / math.prod(shapes[f]) for f in fqns])
    uniform = plot.init_densities(sparse, "uniform")
    assert heights[f"uniform at {d:.3g}"] == pytest.approx([uniform[f] for f in fqns])
    assert heights["current"] == pytest.approx([mask_densities(sparse)[f] for f in fqns])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "5", "7"]
    assert ax.get_ylabel().startswith("density")


def test_density_bars_current_follows_the_masks():
    """A layer pruned below its budget shows its new density next to the unchanged ERK bar."""
    sparse = fxsparse.sparsify(conv_net(), 0.3, "erk")
    before = mask_densities(sparse)
    sparse.prune({"5.weight": sparse._fxsparse.sites["5.weight"].active // 2})
    heights = bars(plot.density_bars(sparse, compare=("erk",), density=0.3).axes[0])
    assert heights["erk at 0.3"] == pytest.approx(list(before.values()))
    assert heights["current"] == pytest.approx(list(mask_densities(sparse).values()))
    assert heights["current"][2] < heights["erk at 0.3"][2]


def test_density_bars_draws_into_a_given_axes_with_labels(trained):
    sparse, _ = trained
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plot.density_bars(sparse, compare=(), labels={"0.weight": "stem"}, ax=ax) is fig
    assert list(bars(ax)) == ["current"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stem", "2", "5", "7"]
    fig2 = plot.density_bars(sparse, compare="er", labels=["a", "b", "c", "d"])
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()] == ["a", "b", "c", "d"]


def test_density_bars_errors_say_what_was_expected(trained):
    sparse, _ = trained
    with pytest.raises(TypeError, match="SparseGraphModule returned by fxsparse.sparsify.*got Sequential"):
        plot.density_bars(conv_net())
    with pytest.raises(ValueError, match=r"expected init to be one of \[.*'erk'.*got 'erkk'"):
        plot.density_bars(sparse, compare=("erkk",))
    with pytest.raises(ValueError, match="expected 4 labels"):
        plot.density_bars(sparse, labels=["a"])
    with pytest.raises(ValueError, match="unknown"):
        plot.density_bars(sparse, labels={"nope": "x"})


# ------------------------------------------------------------------------------------- churn
def test_churn_lines_are_the_history(trained):
    _, scheduler = trained
    history = scheduler.history
    assert [r["step"] for r in history] == [2, 4, 6, 8]
    fig = plot.churn(history, top=2)
    top, bottom = fig.axes
    steps = [r["step"] for r in history]
    churn = line(top, "churn: grown / active")
    expected = [sum(v["grown"] for v in r["layers"].values()) / sum(v["active"] for v in r["layers"].values())
                for r in history]
    assert list(churn.get_xdata()) == steps
    assert list(churn.get_ydata()) == pytest.approx(expected)
    assert list(line(top, "drop fraction").get_ydata()) == pytest.approx([r["drop_fraction"] for r in history])
    assert all(c <= f + 1e-12 for c, f in zip(expected, (r["drop_fraction"] for r in history)))
    assert any(c > 0 for c in expected)  # the run really changed the topology
    # per layer: the two layers of largest mean churn, each line its grown / active
    per_layer = {fqn: [r["layers"][fqn]["grown"] / r["layers"][fqn]["active"] for r in history]
                 for fqn in history[0]["layers"]}
    best = sorted(per_layer, key=lambda f: -sum(per_layer[f]))[:2]
    assert [ln.get_label() for ln in bottom.get_lines()] == [f.removesuffix(".weight") for f in best]
    for ln, fqn in zip(bottom.get_lines(), best):
        assert list(ln.get_ydata()) == pytest.approx(per_layer[fqn])


def test_churn_heatmap_and_scheduler_input(trained):
    _, scheduler = trained
    fig = plot.churn(scheduler, per_layer="heatmap")  # the scheduler itself is accepted
    heat = fig.axes[1].images[0].get_array()
    table = plot.churn_table(scheduler.history)
    assert heat.shape == (4, len(scheduler.history))
    np.testing.assert_allclose(heat, [table["layers"][f] for f in table["layers"]])
    assert len(plot.churn(scheduler, per_layer=None).axes) == 1


def test_churn_errors():
    with pytest.raises(ValueError, match="at least one topology update"):
        plot.churn([])
    with pytest.raises(TypeError, match="TopologyScheduler.history"):
        plot.churn([{"step": 1}])
    with pytest.raises(ValueError, match="per_layer"):
        plot.churn([{"step": 1, "drop_fraction": 0.3, "layers": {}}], per_layer="bars")


# ----------------------------------------------------------------------------- mask_heatmaps
def test_reduce_mask_by_hand():
    g = torch.Generator().manual_seed(0)
    conv = torch.rand(4, 3, 2, 2, generator=g) < 0.5
    reduced = plot.reduce_mask(conv)
    by_hand = [[sum(bool(conv[o, i, a, b]) for a in range(2) for b in range(2)) / 4 for i in range(3)] for o in range(4)]
    np.testing.assert_allclose(reduced.numpy(), by_hand, rtol=1e-6)
    assert plot.reduce_mask(torch.tensor([True, False, True])).tolist() == [[1.0, 0.0, 1.0]]
    assert plot.reduce_mask(torch.ones(2, 5, 4, dtype=torch.bool)).shape == (2, 5)


def test_reduce_mask_block_averages_large_masks():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(600, 10, generator=g) < 0.3
    reduced = plot.reduce_mask(mask, max_size=256)  # 600 rows: blocks of 3
    assert reduced.shape == (200, 10)
    assert reduced[7].tolist() == pytest.approx(mask[21:24].float().mean(0).tolist())
    ragged = plot.reduce_mask(torch.rand(257, 513, generator=g) < 0.5, max_size=256)  # blocks of 2 and 3
    assert ragged.shape == (129, 171)
    big = torch.zeros(257, 3, dtype=torch.bool)
    big[256] = True  # the last, one-row block: its cell is that row alone, not diluted by padding
    assert plot.reduce_mask(big, max_size=256)[-1].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(TypeError, match="at least one dimension"):
        plot.reduce_mask(torch.tensor(True))


def test_mask_heatmaps_show_the_reduced_masks(trained):
    sparse, _ = trained
    fig = plot.mask_heatmaps(sparse)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 4
    masks = sparse.masks
    conv = masks["2.weight"]  # (8, 6, 3, 3): each cell the fraction of a kernel's 9 taps active
    by_hand = [[int(conv[o, i].sum()) / 9 for i in range(6)] for o in range(8)]
    np.testing.assert_allclose(images[1].images[0].get_array(), by_hand, rtol=1e-6)
    assert images[3].images[0].get_array().tolist() == masks["7.weight"].float().tolist()
    assert "8x6x3x3" in images[1].get_title()


def test_mask_heatmaps_layer_choice(trained):
    sparse, _ = trained
    fig = plot.mask_heatmaps(sparse, max_layers=2)
    assert sum(bool(ax.images) for ax in fig.axes) == 2
    assert "first 2 of 4" in fig.get_suptitle()
    fig = plot.mask_heatmaps(sparse, layers=["5.weight"], max_size=16)
    (ax,) = [ax for ax in fig.axes if ax.images]
    assert ax.images[0].get_array().shape == (10, 16)  # 20 x 288 in blocks of 2 rows and 18 columns
    with pytest.raises(ValueError, match="expected layers among the sparse weights"):
        plot.mask_heatmaps(sparse, layers=["5.bias"])


def test_mask_heatmaps_draw_outputs_down_whatever_the_storage():
    class Stored(nn.Module):  # GPT-2's Conv1D: weight (in, out), addmm(bias, x, weight); and an einsum
        def __init__(self) -> None:
            super().__init__()
            self.conv1d = nn.Parameter(torch.randn(12, 5))
            self.linear = nn.Linear(5, 7)
            self.mixed = nn.Parameter(torch.randn(7, 7))

        def forward(self, x):
            h = torch.addmm(torch.zeros(5), x, self.conv1d)
            return torch.einsum("bi,io->bo", self.linear(h), self.mixed)

    sparse = fxsparse.sparsify(Stored(), 0.5, "uniform", dense=[])
    assert fxsparse.oneshot.output_axes(sparse) == {"conv1d": 1, "linear.weight": 0, "mixed": None}
    fig = plot.mask_heatmaps(sparse)
    drawn = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.images}
    conv1d, linear, mixed = drawn["conv1d"], drawn["linear"], drawn["mixed"]
    assert conv1d.images[0].get_array().tolist() == sparse.masks["conv1d"].t().float().tolist()  # 5 outputs down
    assert (conv1d.get_ylabel(), conv1d.get_xlabel()) == ("output", "input") and "12x5" in conv1d.get_title()
    assert linear.images[0].get_array().tolist() == sparse.masks["linear.weight"].float().tolist()
    assert mixed.images[0].get_array().tolist() == sparse.masks["mixed"].float().tolist()
    assert mixed.get_ylabel().startswith("dim 0") and mixed.get_xlabel() == "dim 1"


# ----------------------------------------------------------------------------- files, import
def test_path_writes_png_files(trained, tmp_path):
    sparse, scheduler = trained
    out = tmp_path / "figures" / "nested"
    plot.density_bars(sparse, path=out / "bars.png")
    plot.churn(scheduler.history, path=out / "churn.png")
    plot.mask_heatmaps(sparse, path=out / "masks.png")
    for name in ("bars.png", "churn.png", "masks.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_missing_matplotlib_says_how_to_install(trained, monkeypatch):
    sparse, scheduler = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for draw in (lambda: plot.density_bars(sparse), lambda: plot.churn(scheduler),
                 lambda: plot.mask_heatmaps(sparse)):
        with pytest.raises(ImportError, match=r'pip install "fxsparse\[plot\]"'):
            draw()
    calls = FakeWriter()  # neither the reduction nor TensorBoard logging needs matplotlib
    plot.log_tensorboard(calls, sparse, scheduler)
    assert calls.images


def test_importing_fxsparse_imports_neither_plot_nor_matplotlib():
    code = (
        "import sys, fxsparse\n"
        "assert 'fxsparse.plot' not in sys.modules and 'matplotlib' not in sys.modules, 'core'\n"
        "import fxsparse.plot\n"
        "assert 'matplotlib' not in sys.modules, 'fxsparse.plot'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------- TensorBoard
class FakeWriter:
    """Records what a SummaryWriter is asked to write."""

    def __init__(self) -> None:
        self.scalars: dict[str, tuple[float, int | None]] = {}
        self.images: dict[str, tuple[torch.Tensor, int | None, str]] = {}

    def add_scalar(self, tag, value, global_step=None):
        assert tag not in self.scalars, f"{tag} written twice"
        self.scalars[tag] = (value, global_step)

    def add_image(self, tag, image, global_step=None, dataformats="CHW"):
        self.images[tag] = (image, global_step, dataformats)


def test_log_tensorboard_writes_scalars_and_mask_images(trained):
    sparse, scheduler = trained
    writer = FakeWriter()
    written = plot.log_tensorboard(writer, sparse, scheduler)
    assert written == {tag: value for tag, (value, _) in writer.scalars.items()}
    assert {step for _, step in writer.scalars.values()} == {scheduler.step_count}
    assert writer.scalars["fxsparse/density"][0] == pytest.approx(sparse.density)
    for fqn, density in mask_densities(sparse).items():
        assert writer.scalars[f"fxsparse/density/{fqn}"][0] == pytest.approx(density)
    stats = scheduler.stats()
    assert stats["updates"] == 4
    for name, value in stats.items():
        assert writer.scalars[f"fxsparse/{name}"][0] == pytest.approx(value)
    assert set(writer.images) == {f"fxsparse/mask/{fqn}" for fqn in sparse.masks}
    image, step, formats = writer.images["fxsparse/mask/2.weight"]
    assert formats == "CHW" and step == scheduler.step_count and image.dtype == torch.float32
    assert image.shape == (1, 8, 6) and torch.equal(image[0], plot.reduce_mask(sparse.masks["2.weight"]))


def test_log_tensorboard_without_scheduler_or_images(trained):
    sparse, _ = trained

    class ScalarsOnly:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, global_step=None):
            self.calls.append((tag, value, global_step))

    writer = ScalarsOnly()
    plot.log_tensorboard(writer, sparse, step=7, images=False)
    assert [c[0] for c in writer.calls] == ["fxsparse/density", *(f"fxsparse/density/{f}" for f in sparse.masks)]
    assert {c[2] for c in writer.calls} == {7}
    with pytest.raises(TypeError, match=r"SummaryWriter.*without \['add_image'\]"):
        plot.log_tensorboard(ScalarsOnly(), sparse)
    with pytest.raises(TypeError, match="SparseGraphModule"):
        plot.log_tensorboard(FakeWriter(), conv_net())


def test_log_tensorboard_with_a_real_summary_writer(trained, tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    sparse, scheduler = trained
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        written = plot.log_tensorboard(writer, sparse, scheduler)
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert set(logged.Tags()["scalars"]) == set(written)
    assert set(logged.Tags()["images"]) == {f"fxsparse/mask/{fqn}" for fqn in sparse.masks}
    assert logged.Scalars("fxsparse/density")[0].value == pytest.approx(sparse.density, rel=1e-6)
