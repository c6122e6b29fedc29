"""Hypothesis strategies: small generated MLPs and CNNs, and densities.

The generated networks cover what weight discovery must handle: convolutions with random widths,
kernel sizes, strides and groups (depthwise included), bias on and off, residual additions, a
module called twice (shared), a parameter owned by two modules (tied), and a raw parameter used
functionally twice (``x @ w``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fxsparse
import torch.nn.functional as F
from hypothesis import assume, settings
from hypothesis import strategies as st
from torch import nn

__all__ = ["ConvSpec", "NetSpec", "GeneratedNet", "net_specs", "densities", "build", "sparsify"]


@dataclass(frozen=True)
class ConvSpec:
    out: int
    kernel: int
    stride: int
    depthwise: bool
    bias: bool
    residual: bool


@dataclass(frozen=True)
class NetSpec:
    kind: str  # "cnn" | "mlp"
    width: int  # input channels (cnn) or features (mlp)
    convs: tuple[ConvSpec, ...]
    hidden: tuple[int, ...]
    shared: bool  # one module called twice
    tied: bool  # two modules holding one parameter
    functional: bool  # a raw parameter used by two matmuls
    bias: bool
    seed: int
    capture: str = "symbolic"  # the front-end the property test sparsifies with (tests/frontends.py)

    def capture_args(self) -> dict[str, object]:
        """``sparsify`` keywords for this spec's front-end (export runs on an example input)."""
        if self.capture == "export":
            return {"capture": "export", "example_inputs": self.input(2)}
        return {"capture": "symbolic"}

    def input(self, batch: int = 3) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1)
        if self.kind == "cnn":
            return torch.randn(batch, self.width, 9, 9, generator=gen)
        return torch.randn(batch, self.width, generator=gen)


class GeneratedNet(nn.Module):
    def __init__(self, spec: NetSpec, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.convs = nn.ModuleList()
        channels = spec.width
        self.residual: list[bool] = []
        for c in spec.convs:
            out = channels if c.depthwise else c.out
            # decided here, not on traced shapes: fx cannot branch on a Proxy
            self.residual.append(c.residual and c.stride == 1 and out == channels)
            self.convs.append(
                nn.Conv2d(channels, out, c.kernel, c.stride, padding=c.kernel // 2,
                          groups=channels if c.depthwise else 1, bias=c.bias)
            )
            channels = out
        features = channels
        self.linears = nn.ModuleList()
        for h in spec.hidden:
            self.linears.append(nn.Linear(features, h, bias=spec.bias))
            features = h
        if spec.shared:
            self.shared = nn.Linear(features, features, bias=spec.bias)
        if spec.tied:
            self.tie_a = nn.Linear(features, features, bias=spec.bias)
            self.tie_b = nn.Linear(features, features, bias=False)
            self.tie_b.weight = self.tie_a.weight
        if spec.functional:
            self.proj = nn.Parameter(torch.randn(features, features) / features**0.5)
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, residual in zip(self.convs, self.residual):
            y = F.relu(conv(x))
            if residual:
                y = y + x
            x = y
        if self.spec.kind == "cnn":
            x = x.mean(dim=(2, 3))
        for linear in self.linears:
            x = torch.tanh(linear(x))
        if self.spec.shared:
            x = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        if self.spec.tied:
            x = torch.tanh(self.tie_b(torch.tanh(self.tie_a(x))))
        if self.spec.functional:
            x = torch.tanh(torch.tanh(x @ self.proj) @ self.proj)
        return self.head(x)


@st.composite
def conv_specs(draw: st.DrawFn) -> ConvSpec:
    return ConvSpec(
        out=draw(st.integers(1, 12)),
        kernel=draw(st.sampled_from([1, 3, 5])),
        stride=draw(st.sampled_from([1, 1, 2])),
        depthwise=draw(st.booleans()),
        bias=draw(st.booleans()),
        residual=draw(st.booleans()),
    )


@st.composite
def net_specs(draw: st.DrawFn) -> NetSpec:
    kind = draw(st.sampled_from(["cnn", "mlp"]))
    convs = tuple(draw(st.lists(conv_specs(), min_size=1, max_size=3))) if kind == "cnn" else ()
    return NetSpec(
        kind=kind,
        width=draw(st.integers(1, 6) if kind == "cnn" else st.integers(1, 24)),
        convs=convs,
        hidden=tuple(draw(st.lists(st.integers(1, 24), max_size=3))),
        shared=draw(st.booleans()),
        tied=draw(st.booleans()),
        functional=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        # a quarter of the examples under torch.export: both front-ends in one example budget
        capture=draw(st.sampled_from(["symbolic", "symbolic", "symbolic", "export"])),
    )


def densities() -> st.SearchStrategy[float]:
    """Target densities in (0, 1], edges included."""
    return st.one_of(
        st.sampled_from([1.0, 0.5, 0.1, 0.01, 1e-6]),
        st.floats(min_value=1e-3, max_value=1.0, allow_nan=False, exclude_min=False),
    )


def build(spec: NetSpec) -> GeneratedNet:
    return GeneratedNet(spec)


def sparsify(model: nn.Module, density: float, init: str = "erk", **kwargs: object) -> fxsparse.SparseGraphModule:
    """``fxsparse.sparsify``, assuming away inputs it rightly refuses.

    With ``init="uniform"`` the first layer is dense by default and comes out of the budget; a
    generated net whose first layer alone holds more than ``density`` of all weights cannot meet
    that budget (sparsify says so; test_budgets checks the error).
    """
    spec = getattr(model, "spec", None)
    if isinstance(spec, NetSpec):
        kwargs = {**spec.capture_args(), **kwargs}
    if init == "uniform" and "dense" not in kwargs:
        sizes = [m.numel() for m in fxsparse.sparsify(model, 1.0).masks.values()]
        assume(len(sizes) == 1 or sizes[0] < density * sum(sizes) * (1 - 1e-9))
    return fxsparse.sparsify(model, density, init, **kwargs)


def heavy() -> settings:
    """Half the loaded profile's examples (at least 25), for the properties whose every example
    sparsifies, copies or captures and trains several generated models: CI's 200 become 100
    (docs/invariants.md says which), the suite stays under its time budget."""
    return settings(max_examples=max(25, settings.default.max_examples // 2))
