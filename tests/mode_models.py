"""Models whose computation depends on the mode, and models that pass weights into wrapped functions.

Both are what a symbolic trace or weight discovery got silently wrong before (issue 26): the first
kind bakes the mode it was traced in; the second hides product weights inside calls that the
graph keeps whole. The wrapped functions live at module level here, as ``torch.fx.wrap``
requires.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["MODE_FEATURES", "ModeNet", "HELPERS", "WrappedNet", "ComputedArgsNet", "RootNet", "drop_path"]

MODE_FEATURES = ("drop_path", "dropout", "sdpa_dropout", "train_branch", "mode_constant")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth as timm writes it (functional, the mode an argument)."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class ModeNet(nn.Module):
    """A small transformer-ish net with the mode-dependent pieces of ``features``.

    ``drop_path``: functional stochastic depth on each residual branch; ``dropout``:
    ``F.dropout(x, p, self.training)``; ``sdpa_dropout``: ``scaled_dot_product_attention`` with
    ``dropout_p=p if self.training else 0.``; ``train_branch``: an auxiliary head added to the
    output only in training; ``mode_constant``: a scale that is a constant of the mode.
    """

    def __init__(self, features: tuple[str, ...], width: int = 16, heads: int = 2, p: float = 0.3) -> None:
        super().__init__()
        unknown = set(features) - set(MODE_FEATURES)
        assert not unknown, unknown
        self.features, self.heads, self.p = tuple(features), heads, p
        self.embed = nn.Linear(6, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 5)
        self.aux = nn.Linear(width, 5)
        self.norm = nn.LayerNorm(width)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.p if self.training and "sdpa_dropout" in self.features else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training) if "drop_path" in self.features else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self._branch(self._attention(self.norm(x)))
        h = self.mlp(x)
        if "dropout" in self.features:
            h = F.dropout(h, self.p, self.training)
        x = x + self._branch(h)
        pooled = x.mean(1)
        out = self.head(pooled)
        if "mode_constant" in self.features:
            out = out * (2.0 if self.training else 0.5)
        if "train_branch" in self.features and self.training:
            out = out + 0.4 * self.aux(pooled)
        return out


# --- wrapped functions that receive weights ------------------------------------------------------
@torch.fx.wrap
def traceable_attention(x: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor, proj_w: torch.Tensor,
                        heads: int) -> torch.Tensor:
    """Windowed-attention style: the block's weights passed in, F.linear inside (traceable)."""
    b, n, c = x.shape
    q, k, v = F.linear(x, qkv_w, qkv_b).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(b, n, c), proj_w)


@torch.fx.wrap
def branchy_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Control flow on a shape: symbolic tracing cannot look inside (runs are watched)."""
    if x.shape[-1] == w.shape[1]:
        return F.linear(x, w)
    return F.linear(x[..., : w.shape[1]], w)


@torch.fx.wrap
def transposed_matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """The weight arrives as a view (``w.t()`` at the call) and is used by a matmul."""
    return x @ w_t


@torch.fx.wrap
def standardized_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weight standardization inside: the product reads a function of the weight."""
    return F.linear(x, (w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-5))


@torch.fx.wrap
def plain_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Given a weight computed outside it (normalized at the call): the product reads no parameter."""
    return F.linear(x, w)


@torch.fx.wrap
def windowed_linear(x: torch.Tensor, w: torch.Tensor, window: list[int]) -> torch.Tensor:
    """Mutates the list it is given, as torchvision's ``shifted_window_attention_3d`` pads its
    ``window_size``: an interpreter handing over the graph's immutable list cannot run it."""
    window[0] = min(window[0], x.shape[1])
    return F.linear(x, w)


@torch.fx.wrap
def add_position(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A matrix parameter passed in but used by no product (a position embedding)."""
    return x + pos


@torch.fx.wrap
def gated(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """Two weights, einsum inside (a GLU)."""
    return F.silu(torch.einsum("bnc,oc->bno", x, w_gate)) * torch.einsum("bnc,oc->bno", x, w_up)


@torch.fx.wrap
def call_layer(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A layer handed whole (tracing reads the module argument as a ``get_attr`` of its path)."""
    return layer(x)


# name -> (which of its weights a product reads: "product" | "computed" | "none", how the
# symbolic analysis can see it: True when tracing the body alone works)
HELPERS = {
    "traceable_attention": ("product", True),
    "branchy_linear": ("product", False),
    "transposed_matmul": ("product", True),
    "standardized_linear": ("computed", True),
    "add_position": ("none", True),
    "gated": ("product", True),
    "call_layer": ("product", True),
    "normalized_outside": ("computed", True),
    "scaled_into_branchy": ("computed", False),
    "windowed_linear": ("product", False),
}


class WrappedNet(nn.Module):
    """Tokens through the wrapped helpers named in ``helpers`` (each with its own weights), then a
    linear head; width 16, input ``(batch, 4, 16)``."""

    def __init__(self, helpers: tuple[str, ...], width: int = 16) -> None:
        super().__init__()
        self.helpers = tuple(helpers)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width, bias=False)
        self.branchy = nn.Parameter(torch.randn(width, width) * 0.2)
        self.transposed = nn.Parameter(torch.randn(width, width) * 0.2)
        self.standardized = nn.Parameter(torch.randn(width, width) * 0.2)
        self.pos = nn.Parameter(torch.randn(4, width) * 0.2)
        self.gate = nn.Parameter(torch.randn(width, width) * 0.2)
        self.up = nn.Parameter(torch.randn(width, width) * 0.2)
        self.layer = nn.Linear(width, width)
        self.normalized = nn.Parameter(torch.randn(width, width) * 0.2)
        self.scaled = nn.Parameter(torch.randn(width, width) * 0.2)
        self.windowed = nn.Parameter(torch.randn(width, width) * 0.2)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for helper in self.helpers:
            if helper == "traceable_attention":
                x = x + traceable_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, 2)
            elif helper == "branchy_linear":
                x = torch.tanh(branchy_linear(x, self.branchy))
            elif helper == "transposed_matmul":
                x = x + transposed_matmul(x, self.transposed.t())
            elif helper == "standardized_linear":
                x = torch.tanh(standardized_linear(x, self.standardized))
            elif helper == "add_position":
                x = add_position(x, self.pos)
            elif helper == "gated":
                x = x + gated(x, self.gate, self.up)
            elif helper == "call_layer":
                x = torch.tanh(call_layer(x, self.layer))
            elif helper == "normalized_outside":  # weight normalization at the call, then a wrapped linear
                x = torch.tanh(plain_linear(x, self.normalized / self.normalized.norm(dim=1, keepdim=True)))
            elif helper == "scaled_into_branchy":  # a computed weight into a function tracing cannot enter
                x = torch.tanh(branchy_linear(x, self.scaled * 0.5))
            elif helper == "windowed_linear":
                x = torch.tanh(windowed_linear(x, self.windowed, [8, 8]))
        return self.head(x.mean(1))

    # the parameter each helper is given, and its kind (see HELPERS)
    WEIGHTS = {
        "traceable_attention": ("qkv.weight", "proj.weight"),
        "branchy_linear": ("branchy",),
        "transposed_matmul": ("transposed",),
        "standardized_linear": ("standardized",),
        "add_position": ("pos",),
        "gated": ("gate", "up"),
        "call_layer": ("layer.weight",),
        "normalized_outside": ("normalized",),
        "scaled_into_branchy": ("scaled",),
        "windowed_linear": ("windowed",),
    }


def declared_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Untraceable without inputs (a branch on a shape); its weight argument is declared in the
    test with ``fxsparse.register_leaf_function(declared_linear, weights=["w"])``."""
    if x.shape[0] > 0:
        x = x * scale.mean()
    return F.linear(x, w)


class DeclaredNet(nn.Module):
    def __init__(self, width: int = 8, computed: bool = False) -> None:
        super().__init__()
        self.computed = computed
        self.w = nn.Parameter(torch.randn(width, width))
        self.scale = nn.Parameter(torch.randn(width, width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.computed:  # the declared weight argument given a function of the parameter
            return self.head(declared_linear(x, self.w * 0.5, self.scale))
        return self.head(declared_linear(x, self.w, self.scale))


class ComputedArgsNet(nn.Module):
    """Weights computed at the call of a wrapped function: normalized into a traceable linear,
    scaled into an untraceable one, and a position embedding scaled into no product."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.normalized = nn.Parameter(torch.randn(width, width))
        self.scaled = nn.Parameter(torch.randn(width, width))
        self.pos = nn.Parameter(torch.randn(4, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = plain_linear(x, self.normalized / self.normalized.norm(dim=1, keepdim=True))
        x = branchy_linear(x, self.scaled * 0.5)
        return self.head(add_position(x, self.pos * 2.0).mean(1))


@torch.fx.wrap
def through_root(x: torch.Tensor, root: nn.Module) -> torch.Tensor:
    """Given the model itself: tracing cannot hold the root as a value."""
    return F.linear(x, root.inner.weight) + F.linear(x, root.matrix)


class RootNet(nn.Module):
    """Passes itself (``self``) into a wrapped function."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.matrix = nn.Parameter(torch.randn(width, width) * 0.2)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(through_root(x, self).mean(1))
