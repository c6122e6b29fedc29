"""Both front-ends for the invariant tests: symbolic tracing and torch.export.

A test module that declares ``pytestmark = pytest.mark.usefixtures("front_end")`` runs every
test twice (conftest's ``front_end`` fixture); under ``"export"``, ``fxsparse.sparsify`` called
without a ``capture=`` captures with torch.export, on example inputs found by
:func:`example_for` when the test gave none. Property tests draw the front-end instead
(``NetSpec.capture`` in strategies.py), so that both share one example budget.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

import fxsparse

FRONT_ENDS = ("symbolic", "export")


def example_for(model: nn.Module) -> torch.Tensor:
    """A batch of 2 the model accepts: shaped for its first conv or linear layer, spatial size
    probed (the test nets flatten a fixed size into a linear layer)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if first is None:
        raise ValueError(f"no conv/linear layer in {type(model).__name__} to shape an example input for")
    if isinstance(first, nn.Linear):
        candidates = [torch.randn(2, first.in_features)]
    else:
        n = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
        candidates = [torch.randn(2, first.in_channels, *([size] * n)) for size in (8, 9, 28, 32, 16, 10, 12)]
    probe = copy.deepcopy(model).eval()
    for x in candidates:
        try:
            with torch.no_grad():
                probe(x)
        except Exception:  # the wrong size for this net: try the next
            continue
        return x
    raise ValueError(f"found no example input for {type(model).__name__}")


def use_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``fxsparse.sparsify`` capture with torch.export unless told otherwise."""
    real = fxsparse.sparsify

    @functools.wraps(real)
    def sparsify(model: nn.Module, *args: Any, **kwargs: Any) -> fxsparse.SparseGraphModule:
        if kwargs.get("capture", "auto") == "auto":
            kwargs["capture"] = "export"
            if kwargs.get("example_inputs") is None:
                kwargs["example_inputs"] = example_for(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fxsparse, "sparsify", sparsify)
