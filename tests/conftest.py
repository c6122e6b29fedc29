"""Hypothesis profiles, the slow marker, and small shared fixtures.

Profiles: ``ci`` (200 examples a property; chosen when CI=true), ``dev`` (50, the default) and
``thorough`` (1000). Pick one with HYPOTHESIS_PROFILE=name. Tests marked ``slow`` are skipped
when CI=true; run them with ``pytest -m slow``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _CI else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _CI or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: skipped when CI=true; run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
