"""Every mask key is the name ``named_parameters()`` gives its weight, on the original and on the
sparse module, in the original's module order, however modules are shared or weights tied.

Code that pairs ``sparse.named_parameters()`` with ``sparse.masks`` (weight-decay groups,
per-layer learning rates, logging) must find every mask.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxsparse


class SharedNet(nn.Module):
    """Square linear layers registered under several parents (in a drawn order), some weights
    tied, and a forward that calls them through drawn paths in a drawn order."""

    def __init__(self, width, placements, calls, ties, functional):
        super().__init__()
        torch.manual_seed(len(placements))
        layers = [nn.Linear(width, width, bias=i % 2 == 0) for i in range(1 + max(i for _, i in placements))]
        for a, b in ties:
            layers[b].weight = layers[a].weight
        for parent, index in placements:
            if not hasattr(self, parent):
                self.add_module(parent, nn.Module())
            getattr(self, parent).add_module(f"l{index}", layers[index])
        self.width = width
        self.calls = calls
        self.functional = functional
        if functional:  # a raw parameter used by a matmul, registered after the modules
            self.proj = nn.Parameter(torch.randn(width, width) / width)

    def forward(self, x):
        for parent, index in self.calls:
            x = torch.tanh(getattr(getattr(self, parent), f"l{index}")(x))
        if self.functional:
            x = x @ self.proj
        return x


@st.composite
def shared_nets(draw):
    n = draw(st.integers(1, 4))
    parents = ["a", "b", "c"]
    placements = [(draw(st.sampled_from(parents)), i) for i in range(n)]  # every layer somewhere
    placements += draw(st.lists(st.tuples(st.sampled_from(parents), st.integers(0, n - 1)), max_size=4))
    placements = list(dict.fromkeys(draw(st.permutations(placements))))
    placed = sorted(set(placements))
    calls = draw(st.lists(st.sampled_from(placed), min_size=1, max_size=5))
    ties = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda t: t[0] < t[1]), max_size=2))
    return SharedNet(draw(st.integers(2, 6)), placements, calls, ties, draw(st.booleans()))


def _check_names(model, sparse):
    original = [name for name, _ in model.named_parameters()]
    ours = [name for name, _ in sparse.named_parameters()]
    assert ours == original  # the same names, in the same order
    params = dict(sparse.named_parameters())
    keys = list(sparse.masks)
    for fqn, mask in sparse.masks.items():
        assert fqn in params, f"{fqn} is not a name sparse.named_parameters() gives"
        assert params[fqn] is sparse.sparse_weights[fqn] and params[fqn].shape == mask.shape
    assert keys == [name for name in original if name in sparse.masks]  # module order
    assert set(model.state_dict()) <= set(sparse.state_dict())


@pytest.mark.soak
@given(shared_nets(), st.floats(0.2, 0.9), st.sampled_from(["symbolic", "symbolic", "symbolic", "export"]))
def test_mask_keys_are_the_names_named_parameters_gives(model, density, capture):
    x = torch.randn(3, model.width)
    sparse = fxsparse.sparsify(model, density, "erk", capture=capture, example_inputs=x)
    _check_names(model, sparse)
    sparse(x).sum().backward()  # every named weight is the one the graph trains
    for fqn, mask in sparse.masks.items():
        grad = dict(sparse.named_parameters())[fqn].grad
        assert grad is not None and bool(grad[~mask].eq(0).all())


def test_shared_submodules_of_coat_tiny_are_named_as_named_parameters_names_them():
    timm = pytest.importorskip("timm")
    model = timm.create_model("coat_tiny", pretrained=False, num_classes=10)
    _check_names(model, fxsparse.sparsify(model, 0.1))
