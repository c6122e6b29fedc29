"""Hypothesis profiles, the slow marker, and small shared fixtures.

Profiles: ``ci`` (200 examples a property; chosen when CI=true), ``dev`` (50, the default),
``thorough`` (1000) and ``soak`` (10,000). Pick one with HYPOTHESIS_PROFILE=name. Tests marked
``slow`` are skipped when CI=true; run them with ``pytest -m slow``. ``pytest -m soak`` runs the
properties marked ``soak`` (the invariant-3 edit-path suite and the naming property) with the
soak profile; add ``--hypothesis-show-statistics`` for the count of examples each ran.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.register_profile("soak", max_examples=10_000, derandomize=False, print_blob=True, **_COMMON)
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _CI else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    if "soak" in (config.getoption("-m") or "") and "HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("soak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _CI or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: skipped when CI=true; run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fashion(tmp_path_factory):
    """A tiny Fashion-MNIST in the idx layout (96 train, 32 test images; labels drawn as stripes)."""
    from fxsparse.data import write_idx

    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), labels * 2, :] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root




@pytest.fixture(params=["symbolic", "export"])
def front_end(request, monkeypatch):
    """Runs a test under both front-ends of sparsify (tests/frontends.py)."""
    if request.param == "export":
        from frontends import use_export

        use_export(monkeypatch)
    return request.param
