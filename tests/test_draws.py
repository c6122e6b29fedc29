"""Random draws outside torch while a model is captured: the graph freezes them, fxsparse says so,
and the ``modes`` check catches a module that repeats one draw."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.checks import check_model
from fxsparse.draws import OutsideDraws, seed_everything


class NumpyTimeMask(nn.Module):
    """SpecAugment as transformers' speech models draw it: a time mask from numpy in training."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.training:
            keep = torch.from_numpy(np.random.rand(2, 5) > 0.5)  # the example's batch and length
            h = h * keep.unsqueeze(-1).to(h.dtype)
        return self.head(h).mean(1)


class PythonLayerDrop(nn.Module):
    """Layer drop decided by Python's ``random`` (older transformers code)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.training and random.random() < 0.5:
                continue
            x = layer(x)
        return x


class TorchDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x * (torch.rand(x.shape[:2]) > 0.5).unsqueeze(-1)
        return self.proj(x)


def _frozen_warnings(model: nn.Module, capture: str) -> list[str]:
    x = torch.randn(2, 5, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxsparse.sparsify(model, 0.5, example_inputs=(x,), capture=capture)
    return [str(w.message) for w in caught if "outside torch" in str(w.message)]


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_numpy_draw_while_captured_is_reported_with_its_site(capture: str) -> None:
    (message,) = _frozen_warnings(NumpyTimeMask(), capture)
    assert "numpy.random.rand at" in message and "test_draws.py" in message
    assert "constant" in message and "mask_time_prob=0" in message


def test_python_random_draw_while_captured_is_reported() -> None:
    (message,) = _frozen_warnings(PythonLayerDrop(), "symbolic")
    assert "random.random at" in message and "test_draws.py" in message


def test_torch_draws_are_graph_nodes_and_not_reported() -> None:
    assert _frozen_warnings(TorchDropout(), "export") == []


def test_frozen_draw_is_really_frozen_and_torch_draw_is_not() -> None:
    """What the warning claims: the captured module repeats the numpy draw on every call."""
    x = torch.randn(2, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = fxsparse.sparsify(NumpyTimeMask(), 1.0, example_inputs=(x,), capture="export")
    live = fxsparse.sparsify(TorchDropout(), 1.0, example_inputs=(x,), capture="export")
    with torch.no_grad():
        seed_everything(0)
        a, b = frozen(x), live(x)
        seed_everything(1)
        assert torch.equal(frozen(x), a)
        assert not torch.equal(live(x), b)


def test_watch_restores_the_generators_and_ignores_seeded_generators() -> None:
    rand, py_random = np.random.rand, random.random
    with OutsideDraws() as draws:
        np.random.default_rng(3).random()
        assert np.random.rand is not rand
    assert draws.sites == {}
    assert np.random.rand is rand and random.random is py_random
    with OutsideDraws() as draws:
        np.random.default_rng()
        random.shuffle([1, 2])
    assert sorted(s.split(" at ")[0] for s in draws.sites) == ["numpy.random.default_rng", "random.shuffle"]


def test_seed_everything_seeds_numpy_python_and_torch() -> None:
    seed_everything(5)
    first = (np.random.rand(), random.random(), torch.rand(()).item())
    seed_everything(5)
    assert (np.random.rand(), random.random(), torch.rand(()).item()) == first


def test_modes_check_fails_a_module_that_repeats_one_draw() -> None:
    """Before the check seeded numpy and compared two seeds, a frozen draw could pass it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_model(NumpyTimeMask(), (torch.randn(2, 5, 6),), density=0.5, capture="export")
        assert report.passed["density_one"] and not report.passed["modes"]
        assert "torch.export's own graph" in (report.failure or "")
        assert check_model(TorchDropout(), (torch.randn(2, 5, 6),), density=0.5, capture="export").ok

