"""Where each sparse weight lives: ``sparsify(..., layout=...)``, the last step of sparsify.

``layout="masked"`` (the default) keeps every weight dense with a mask. ``layout="compact"``
moves each weight that qualifies (every read a linear layer or ``x @ W``, 2-D, not dense, not
used inside an opaque leaf) to :mod:`fxsparse.compact` where that is measured faster: with
``example_inputs``, one training step of the layer (forward, input and weight gradients) is
timed on the input it receives, masked against compact, and the compact one is kept when it wins
by ``MARGIN``; without inputs, by the measured break-even density (:func:`compact.density_rule`).
A ``{fqn pattern: "compact" | "masked"}`` mapping decides per layer instead (unnamed layers stay
masked; a wildcard selects the layers that qualify, a weight named exactly must qualify). Each decision, its reason and its timings are in ``sparse.layouts``.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse.capture import Runner, graph_inputs
from fxsparse.compact import SPATIAL_BREAK_EVEN, CompactWeight, compact_linear, density_rule
from fxsparse.csr_kernels import KERNELS, kernels_for, preferred
from fxsparse.masking import MASKER, Masker
from fxsparse.passes.compact import compact_reads, operands, to_compact

__all__ = ["LayoutChoice", "apply_layout", "LAYOUTS", "MARGIN"]

LAYOUTS = ("masked", "compact")
MARGIN = 0.05  # a compact layer must beat its masked step by this fraction to be chosen
_HOLDER = "fxsparse_compact"


@dataclass(frozen=True)
class LayoutChoice:
    """How one sparse weight is stored, and why.

    Attributes:
        layout: ``"compact"`` or ``"masked"``.
        reason: what decided it (asked for, timed, the density rule, or why it cannot be compact).
        ms: the median milliseconds of one training step of the layer in each layout, when timed:
            ``"masked"``, ``"compact"`` (with the faster kernels) and ``"compact/<kernels>"`` for
            each kernel technology timed (:mod:`fxsparse.csr_kernels`).
        kernel: the compact layer's kernels (``"numba"`` or ``"torch"``); None when masked.
    """

    layout: str
    reason: str
    ms: dict[str, float] = field(default_factory=dict)
    kernel: str | None = None


def check_layout(layout: Any) -> None:
    """Raises unless ``layout`` is ``"masked"``, ``"compact"`` or a ``{pattern: layout}`` mapping."""
    if isinstance(layout, str) and layout in LAYOUTS:
        return
    if isinstance(layout, Mapping) and all(isinstance(k, str) and v in LAYOUTS for k, v in layout.items()):
        return
    raise ValueError(
        f"expected layout to be 'masked', 'compact' or a {{fqn pattern: 'masked' | 'compact'}} dict, got {layout!r}"
    )


def _asked(layout: str | Mapping[str, str], fqn: str) -> str | None:
    """The layout asked for ``fqn``: None means "compact where measured faster"."""
    if isinstance(layout, str):
        return None if layout == "compact" else "masked"
    for pattern, value in layout.items():
        if fnmatch.fnmatchcase(fqn, pattern):
            return value
    return "masked"


def _named(layout: str | Mapping[str, str], fqn: str) -> bool:
    """Whether a mapping names ``fqn`` itself (a wildcard pattern only selects what qualifies)."""
    return not isinstance(layout, str) and fqn in layout


def apply_layout(sparse: Any, layout: str | Mapping[str, str], inputs: tuple[tuple[Any, ...], dict[str, Any]] | None) -> None:
    """Moves the weights ``layout`` selects into compact layers and records every decision in
    ``sparse._fxsparse.layouts``. Raises ValueError when a mapping asks for ``"compact"`` on a
    weight that cannot be (nothing has changed then)."""
    state = sparse._fxsparse
    graphs = list({id(g): g for g in (state.mode_graphs or {True: sparse.graph}).values()}.values())
    choices: dict[str, LayoutChoice] = {}
    candidates: dict[str, str] = {}
    refused = []
    for fqn, site in state.sites.items():
        asked = _asked(layout, fqn)
        conv = len(site.shape) == 4
        shaped = len(site.shape) == 2 or conv
        kind = None if site.opaque or site.kernel or not shaped else compact_reads(graphs, MASKER, fqn)
        if kind is not None and (kind.startswith("conv2d") != conv or conv and _conv_options(kind, site.shape) is None):
            kind = None
        why_not = ("used inside an opaque module" if site.opaque
                   else "read through a kernel computed from it (weight standardization)" if site.kernel
                   else "not a 2-D weight or a convolution kernel" if not shaped
                   else "read other than as a linear layer's weight, the right operand of x @ W, a 1x1 convolution "
                        "without padding or groups, or a kxk convolution of stride 1 without dilation or groups"
                   if kind is None
                   else "budgeted dense" if site.active == math.prod(site.shape) else "")
        if asked == "masked":
            choices[fqn] = LayoutChoice("masked", "asked" if not isinstance(layout, str) else "the default layout")
        elif why_not:
            choices[fqn] = LayoutChoice("masked", f"cannot be compact: {why_not}")
            if asked == "compact" and _named(layout, fqn):
                refused.append(f"{fqn} ({why_not})")
        else:
            candidates[fqn] = kind  # type: ignore[assignment]
    if refused:
        raise ValueError(
            f"layout asks for 'compact' on weight(s) that cannot be: {'; '.join(refused[:5])}. Compact layers hold "
            "the weights of linear layers, of products x @ W and of 1x1 convolutions without padding or groups; "
            "leave these out of the mapping"
        )
    to_time = {f: k for f, k in candidates.items() if _asked(layout, f) is None}
    timed = _time_layers(sparse, graphs[0], to_time, inputs) if inputs is not None and to_time else {}
    for fqn, kind in candidates.items():
        site = state.sites[fqn]
        density = site.active / math.prod(site.shape)
        default = preferred(sparse.get_parameter(fqn).device, sparse.get_parameter(fqn).dtype)
        if _asked(layout, fqn) == "compact":
            choices[fqn] = LayoutChoice("compact", "asked", timed.get(fqn, {}), _fastest(timed.get(fqn)) or default)
        elif fqn in timed:
            ms = timed[fqn]
            wins = ms["compact"] <= ms["masked"] * (1 - MARGIN)
            choices[fqn] = LayoutChoice("compact" if wins else "masked", "timed on example_inputs", ms,
                                        _fastest(ms) if wins else None)
        else:
            spatial = len(site.shape) == 4 and tuple(site.shape[2:]) != (1, 1)
            wins, limit = density_rule(density, spatial), SPATIAL_BREAK_EVEN if spatial else 0.2
            choices[fqn] = LayoutChoice("compact" if wins else "masked", f"density {density:.3f} {'<=' if wins else '>'} "
                                        f"{limit:g} (no example_inputs to time on)", kernel=default if wins else None)
    for fqn, choice in choices.items():
        if choice.layout == "compact":
            _install(sparse, graphs, fqn, candidates[fqn], choice.kernel)
    state.layouts = choices
    if any(c.layout == "compact" for c in choices.values()):
        sparse.recompile()


def _conv_options(kind: str, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """A convolution weight of ``shape`` read as :func:`~fxsparse.passes.compact.compact_reads`'
    ``"conv2d:S0xS1:P:D0xD1"``: ``{"stride", "padding"}`` for :class:`CompactWeight` when a compact
    layer computes it (a 1x1 kernel without padding at any stride; any kernel at stride 1 without
    dilation, "same" padding of an odd kernel included), else None."""
    _, stride, padding, dilation = kind.split(":")
    s0, s1 = (int(v) for v in stride.split("x"))
    kh, kw = shape[2:]
    if (kh, kw) == (1, 1) and padding in ("0x0", "same"):
        return {"stride": (s0, s1), "padding": None}
    if (s0, s1) != (1, 1) or dilation != "1x1":
        return None
    if padding == "same":
        return {"stride": (1, 1), "padding": ((kh - 1) // 2, (kw - 1) // 2)} if kh % 2 and kw % 2 else None
    p0, p1 = (int(v) for v in padding.split("x"))
    return {"stride": (1, 1), "padding": (p0, p1)}


def _layer(fqn: str, weight: torch.Tensor, mask: torch.Tensor, kind: str, kernel: str | None = None) -> CompactWeight:
    options = _conv_options(kind, tuple(weight.shape)) if kind.startswith("conv2d") else {"stride": None, "padding": None}
    return CompactWeight(fqn, weight, mask, kind == "matmul", kernel=kernel, **options)  # type: ignore[arg-type]


def _fastest(ms: Mapping[str, float] | None) -> str | None:
    """The kernels whose timed step was fastest (``"compact/<kernels>"`` keys), or None."""
    timed = {k.split("/", 1)[1]: v for k, v in (ms or {}).items() if k.startswith("compact/")}
    return min(timed, key=timed.__getitem__) if timed else None


def _install(sparse: Any, graphs: list[torch.fx.Graph], fqn: str, kind: str, kernel: str | None) -> None:
    """Moves ``fqn`` into a compact layer: the graphs call it, the parameter and mask go."""
    site = sparse._fxsparse.sites[fqn]
    if not hasattr(sparse, _HOLDER):
        sparse.add_module(_HOLDER, nn.Module())
    holder = sparse.get_submodule(_HOLDER)
    name = fqn.replace(".", "_")
    while hasattr(holder, name):
        name += "_"
    weight, mask = sparse.get_parameter(fqn), sparse.get_buffer(site.mask)
    holder.add_module(name, _layer(fqn, weight.detach(), mask, kind, kernel))
    holder.get_submodule(name).values.requires_grad_(weight.requires_grad)
    for graph in graphs:
        to_compact(graph, MASKER, fqn, f"{_HOLDER}.{name}")
    for target in (fqn, site.mask):
        owner, _, attr = target.rpartition(".")
        delattr(sparse.get_submodule(owner) if owner else sparse, attr)
    site.compact = f"{_HOLDER}.{name}"


# --- timing ---------------------------------------------------------------------------------------


def _visit_inputs(
    sparse: Any, graph: torch.fx.Graph, names: set[str], inputs: tuple[tuple[Any, ...], dict[str, Any]],
    visit: Callable[[str, torch.Tensor], None],
) -> None:
    """Calls ``visit(fqn, x)`` with the input each named weight's first consumer receives on
    ``inputs``, as the forward reaches it (one layer's input held at a time)."""
    consumers = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target == MASKER and node.kwargs.get("name") in names:
            user = next(iter(node.users), None)
            if user is not None and node.kwargs["name"] not in consumers.values():
                consumers[user] = node.kwargs["name"]
    seen: set[str] = set()

    class Recorder(Runner):
        def run_node(self, n: torch.fx.Node) -> Any:
            x = operands(n)[0] if n in consumers else None
            if isinstance(x, torch.fx.Node):
                value = self.env[x]
                if isinstance(value, torch.Tensor) and consumers[n] not in seen:
                    seen.add(consumers[n])
                    visit(consumers[n], value.detach())
            return super().run_node(n)

    gm = torch.fx.GraphModule(sparse, graph)
    # a look, not a step: BatchNorm statistics and the random stream are as they were after it
    buffers = [(b, b.clone()) for b in sparse.buffers()]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        Recorder(gm).run(*graph_inputs(sparse, *inputs))
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)


def _time_layers(sparse: Any, graph: torch.fx.Graph, candidates: Mapping[str, str], inputs: Any) -> dict[str, dict[str, float]]:
    """Per candidate weight: the median ms of one training step of its layer, masked and compact."""
    timed: dict[str, dict[str, float]] = {}

    def visit(fqn: str, x: torch.Tensor) -> None:
        with torch.enable_grad():
            timed[fqn] = _time_layer(sparse, fqn, candidates[fqn], x)

    _visit_inputs(sparse, graph, set(candidates), inputs, visit)
    return timed


def _time_layer(sparse: Any, fqn: str, kind: str, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """The median ms of one training step of ``fqn``'s layer on ``x``: masked, and compact with
    each kernel technology that runs on it (``"compact/<kernels>"``); ``"compact"`` is the
    fastest of those."""
    masker = Masker()
    masker.armed = False
    weight = sparse.get_parameter(fqn).detach().clone().requires_grad_()
    mask = sparse.get_buffer(sparse._fxsparse.sites[fqn].mask)
    layer = _layer(fqn, weight.detach(), mask, kind)
    product, options = layer.dense_product()
    layer.values.requires_grad_()
    x = x.detach().clone().requires_grad_()

    def masked() -> None:
        with torch.no_grad():  # the masked layout's two weight-sized passes
            weight.mul_(mask)
        out = product(x, weight, None, **options)
        out.sum().backward()
        with torch.no_grad():
            weight.grad.mul_(mask)

    def compact(kernel: str) -> Callable[[], None]:
        def step() -> None:
            layer.kernel = kernel
            compact_linear(x, layer, masker).sum().backward()
        return step

    def finished() -> None:  # an accelerator queues kernels: wait for them before the clock
        if x.device.type != "cpu":
            torch.accelerator.synchronize(x.device)

    runs = [("masked", masked)] + [(f"compact/{k}", compact(k)) for k in KERNELS
                                   if kernels_for(k, layer.values).name == k]
    ms: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(repeats + 1):  # interleaved; the first round warms up (and compiles)
        for name, fn in runs:
            finished()
            start = time.perf_counter()
            fn()
            finished()
            ms[name].append((time.perf_counter() - start) * 1e3)
            weight.grad = layer.values.grad = x.grad = None
    medians = {name: statistics.median(values[1:]) for name, values in ms.items()}
    return {**medians, "compact": min(v for k, v in medians.items() if k.startswith("compact/"))}
