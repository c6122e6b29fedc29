"""The compact layout: a sparse weight stored as its active values only, computed by sparse kernels.

The layout (:class:`CompactLayout`) holds each weight it takes in a :class:`CompactWeight` under
the sparse module's ``fxsparse_compact`` submodule, and its graph calls :func:`compact_linear`
where the masked layout multiplied weight and mask. Its parts:

- :mod:`.weight`: :class:`CompactWeight` (values and CSR indices), its topology update, and the
  autograd Functions of a linear layer / ``x @ W`` / 1x1 convolution and of a kxk convolution;
- :mod:`.kernels`: the products, one class per technology (numba's CPU loops, ``torch.sparse``);
  :mod:`.loops`: numba's compiled loops, imported when a numba kernel first runs;
- :mod:`fxsparse.layouts.reads` (shared by layouts that compute products): which weights
  qualify (every read a linear layer, ``x @ W``, ``addmm`` or a convolution of one group; this
  layout takes convolutions without dilation, at any stride), and the rewrite of their reads.

A layer's active count is fixed (methods that move counts between layers, and pruning, refuse
it); it is not sharded by ``fully_shard``; a module holding one is not captured again. Its
checkpoint is in the masked layout's format, so checkpoints move between layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse.layouts.base import DenseCall, Layout, Plan
from fxsparse.layouts.compact.kernels import KERNELS, kernels_for, preferred
from fxsparse.layouts.reads import product_reads, replace_reads
from fxsparse.layouts.compact.weight import (
    SPATIAL_BREAK_EVEN, CompactWeight, compact_linear, dense_product, density_rule,
)
from fxsparse.masking import MASKER, Masker
from fxsparse.registry import register_leaf_function

__all__ = ["CompactLayout", "CompactWeight", "compact_linear", "HOLDER"]

HOLDER = "fxsparse_compact"  # the submodule of a SparseGraphModule holding its compact layers
# a symbolic trace of a sparse module (a nested sparsify) keeps the compact call as one node
register_leaf_function(compact_linear)


class CompactLayout(Layout):
    """Active values and CSR indices per weight, products by sparse kernels (module docstring)."""

    name = "compact"
    fixed_count = True
    keeps_parameter = False
    shardable = False
    recapturable = False
    graph_functions = (compact_linear,)

    # ------------------------------------------------------------------------ choosing, installing
    def plan(self, sparse: Any, fqn: str, graphs: Sequence[torch.fx.Graph]) -> tuple[Plan | None, str]:
        site = sparse._fxsparse.sites[fqn]
        conv = len(site.shape) == 4
        if site.opaque:
            return None, "used inside an opaque module"
        if site.kernel:
            return None, "read through a kernel computed from it (weight standardization)"
        if not (len(site.shape) == 2 or conv):
            return None, "not a 2-D weight or a convolution kernel"
        kind = product_reads(graphs, MASKER, fqn)
        options = None
        if kind is not None and kind.startswith("conv2d") == conv:
            options = _conv_options(kind, site.shape) if conv else {"stride": None, "padding": None}
        if options is None:
            return None, ("read other than as a linear layer's weight, the right operand of x @ W, a 1x1 convolution "
                          "without padding or groups, or a kxk convolution without dilation or groups")
        spatial = options["padding"] is not None  # a kxk convolution: its stride is the convolution's
        product = (dense_product(False, None, options["padding"], options["stride"]) if spatial
                   else dense_product(kind == "matmul", options["stride"], None))
        return Plan(kind, product, options), ""  # type: ignore[arg-type]

    def install(self, sparse: Any, graphs: Sequence[torch.fx.Graph], fqn: str, plan: Plan, kernel: str | None) -> None:
        """Moves ``fqn`` into a compact layer: the graphs call it, the parameter and mask go."""
        site = sparse._fxsparse.sites[fqn]
        if not hasattr(sparse, HOLDER):
            sparse.add_module(HOLDER, nn.Module())
        holder = sparse.get_submodule(HOLDER)
        name = fqn.replace(".", "_")
        while hasattr(holder, name):
            name += "_"
        weight, mask = sparse.get_parameter(fqn), sparse.get_buffer(site.mask)
        holder.add_module(name, _layer(fqn, weight.detach(), mask, plan, kernel))
        holder.get_submodule(name).values.requires_grad_(weight.requires_grad)
        for graph in graphs:
            replace_reads(graph, MASKER, fqn, f"{HOLDER}.{name}", compact_linear)
        for target in (fqn, site.mask):
            owner, _, attr = target.rpartition(".")
            delattr(sparse.get_submodule(owner) if owner else sparse, attr)
        site.layout, site.storage = self.name, f"{HOLDER}.{name}"

    def timed_steps(self, sparse: Any, fqn: str, plan: Plan, x: torch.Tensor) -> dict[str, Callable[[], None]]:
        """The compact layer's step on ``x`` with each kernel technology that runs on it."""
        masker = Masker()
        masker.armed = False
        mask = sparse.get_buffer(sparse._fxsparse.sites[fqn].mask)
        layer = _layer(fqn, sparse.get_parameter(fqn).detach(), mask, plan)
        layer.values.requires_grad_()
        x = x.detach().clone().requires_grad_()

        def step(kernel: str) -> Callable[[], None]:
            def run() -> None:
                layer.kernel = kernel
                compact_linear(x, layer, masker).sum().backward()
                layer.values.grad = x.grad = None
            return run

        return {f"{self.name}/{k}": step(k) for k in KERNELS if kernels_for(k, layer.values).name == k}

    def without_inputs(self, sparse: Any, fqn: str, plan: Plan) -> tuple[bool, str]:
        site = sparse._fxsparse.sites[fqn]
        density = site.active / math.prod(site.shape)
        spatial = plan.kind.startswith("conv2d") and tuple(site.shape[2:]) != (1, 1)
        wins, limit = density_rule(density, spatial), SPATIAL_BREAK_EVEN if spatial else 0.2
        return wins, f"density {density:.3f} {'<=' if wins else '>'} {limit:g} (no example_inputs to time on)"

    def default_kernel(self, sparse: Any, fqn: str) -> str | None:
        weight = sparse.get_parameter(fqn)  # asked before the weight moves in
        return preferred(weight.device, weight.dtype)

    # ---------------------------------------------------------------------------------- views
    def _layer(self, sparse: Any, fqn: str) -> CompactWeight:
        return sparse.get_submodule(sparse._fxsparse.sites[fqn].storage)  # type: ignore[return-value]

    def mask(self, sparse: Any, fqn: str) -> torch.Tensor:
        return self._layer(sparse, fqn).mask()

    def weight(self, sparse: Any, fqn: str) -> torch.Tensor:
        return self._layer(sparse, fqn).dense()

    def trainable(self, sparse: Any, fqn: str) -> torch.Tensor:
        return self._layer(sparse, fqn).values

    def active_values(self, sparse: Any, fqn: str) -> torch.Tensor | None:
        layer = self._layer(sparse, fqn)
        order = layer.weight_order()
        return layer.values.detach() if order is None else layer.values.detach()[order]

    # -------------------------------------------------------------------------------- updates
    def apply(self, sparse: Any, fqn: str, result: Any, states: list[torch.Tensor], zero_grad: bool) -> None:
        """The decision applied to the active values: kept ones keep value, gradient and state."""
        layer = self._layer(sparse, fqn)
        grad = [] if layer.values.grad is None else [layer.values.grad]
        layer.move(result.dropped_idx, result.grown_idx, grad + states)

    # ---------------------------------------------------------------------- checkpoint, graphs
    def save(self, sparse: Any, fqn: str, destination: dict[str, Any], prefix: str) -> None:
        layer = self._layer(sparse, fqn)
        destination[prefix + fqn] = layer.dense()
        destination[prefix + sparse._fxsparse.sites[fqn].mask] = layer.mask()

    def take(self, sparse: Any, fqn: str, state_dict: dict[str, Any], prefix: str,
             missing_keys: list[str] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        keys = (prefix + fqn, prefix + sparse._fxsparse.sites[fqn].mask)
        if all(k in state_dict for k in keys):
            return state_dict.pop(keys[0]), state_dict.pop(keys[1])
        if missing_keys is not None:
            missing_keys.extend(k for k in keys if k not in state_dict)
        return None

    def load(self, sparse: Any, fqn: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
        self._layer(sparse, fqn).load(weight, mask)

    def call_operands(self, args: Sequence[Any]) -> tuple[Any, Any, Any]:
        x, layer, _, bias = args  # compact_linear(x, layer, masker, bias)
        return x, layer, bias

    def dense_call(self, storage: Any) -> tuple[str, DenseCall]:
        return storage.fqn, storage.dense_product()

    def stored_spec(self, storage: Any) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(storage.shape), storage.values.dtype

    def stored_weight(self, storage: Any) -> torch.Tensor:
        return storage.dense()

    def reads(self, sparse: Any, fqn: str, graph: torch.fx.Graph) -> int:
        """The calls of its compact layer in ``graph``."""
        storage = sparse._fxsparse.sites[fqn].storage
        return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is compact_linear
                   and getattr(n.args[1], "target", None) == storage)


def _conv_options(kind: str, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """A convolution weight of ``shape`` read as :func:`~fxsparse.layouts.reads.product_reads`'
    ``"conv2d:S0xS1:P:D0xD1"``: ``{"stride", "padding"}`` for :class:`CompactWeight` when a compact
    layer computes it (a 1x1 kernel without padding, any kernel without dilation, at any stride;
    "same" padding of an odd kernel included), else None."""
    _, stride, padding, dilation = kind.split(":")
    s0, s1 = (int(v) for v in stride.split("x"))
    kh, kw = shape[2:]
    if (kh, kw) == (1, 1) and padding in ("0x0", "same"):
        return {"stride": (s0, s1), "padding": None}
    if dilation != "1x1":
        return None
    if padding == "same":  # torch takes it at stride 1 only
        return {"stride": (1, 1), "padding": ((kh - 1) // 2, (kw - 1) // 2)} if kh % 2 and kw % 2 else None
    p0, p1 = (int(v) for v in padding.split("x"))
    return {"stride": (s0, s1), "padding": (p0, p1)}


def _layer(fqn: str, weight: torch.Tensor, mask: torch.Tensor, plan: Plan, kernel: str | None = None) -> CompactWeight:
    return CompactWeight(fqn, weight, mask, plan.kind == "matmul", kernel=kernel, **plan.options)

