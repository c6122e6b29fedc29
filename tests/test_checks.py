"""fxsparse.checks' own attributions: a failure the model causes is named as the model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse


class SqrtOfSquares(nn.Module):
    """``sqrt(h^2)``: its derivative at h = 0 is 0 * inf, NaN, when a whole output row of the
    second layer is inactive."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 4), nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.second(self.first(x)) ** 2).sum(-1)


def test_non_finite_gradients_of_the_model_itself_are_attributed_to_it():
    """The gradients check names the model's numerics when eager computes them non-finite too
    (timm's efficientnet_cc_b0_4e at density 0.1 on 64x64 inputs), and a NaN at an active
    position is not reported as a gradient on inactive weights."""
    from fxsparse.checks import _blame_model_numerics

    torch.manual_seed(0)
    model, x = SqrtOfSquares(), torch.randn(3, 6)
    masks = {"first.weight": torch.ones(4, 6, dtype=torch.bool),
             "second.weight": torch.tensor([[False] * 4, [True] * 4])}
    sparse = fxsparse.sparsify(model, None, init=masks)
    sparse(x).sum().backward()
    grad = sparse.get_parameter("first.weight").grad
    assert not bool(torch.isfinite(grad).all())  # NaN at active positions: the model's own
    with pytest.raises(AssertionError, match="the model's own gradients are not finite"):
        _blame_model_numerics(model, sparse.masks, (x,), {}, ["first.weight"])
    _blame_model_numerics(model, {"first.weight": masks["first.weight"], "second.weight": ~masks["second.weight"] | True},
                          (x,), {}, ["first.weight"])  # all active: finite, nothing raised
