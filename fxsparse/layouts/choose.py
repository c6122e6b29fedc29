"""Where each sparse weight lives: ``sparsify(..., layout=...)``, the last step of sparsify.

``layout="masked"`` (the default) keeps every weight dense with a mask. Another registered
layout's name (``"compact"``: :mod:`fxsparse.layouts.compact`) moves each weight it can hold
(:meth:`~fxsparse.layouts.Layout.plan`) there where that is measured faster: with
``example_inputs``, one training step of the layer (forward, input and weight gradients) is
timed on the input it receives, masked against the layout with each of its kernels, and the
layout is kept when it wins by ``MARGIN``; without inputs, by the layout's own rule (the measured
break-even density, :meth:`~fxsparse.layouts.Layout.without_inputs`). A ``{fqn pattern: layout}``
mapping decides per layer instead (unnamed layers stay masked; a wildcard selects the layers
that qualify, a weight named exactly must qualify). Each decision, its reason and its timings
are in ``sparse.layouts``.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from fxsparse.capture import Runner, graph_inputs
from fxsparse.layouts.base import Layout, LayoutChoice, Plan
from fxsparse.layouts.reads import operands
from fxsparse.masking import MASKER
from fxsparse.registry import LAYOUTS

__all__ = ["apply_layout", "check_layout", "MARGIN"]

MARGIN = 0.05  # a layout must beat the masked step by this fraction to be chosen by timing
DEFAULT = "masked"


def check_layout(layout: Any) -> None:
    """Raises unless ``layout`` is a registered layout's name or a ``{pattern: name}`` mapping."""
    if isinstance(layout, str) and layout in LAYOUTS:
        return
    if isinstance(layout, Mapping) and all(isinstance(k, str) and v in LAYOUTS for k, v in layout.items()):
        return
    names = " | ".join(repr(n) for n in LAYOUTS.names())
    raise ValueError(f"expected layout to be one of {LAYOUTS.names()} or a {{fqn pattern: {names}}} dict, got {layout!r}")


def _asked(layout: str | Mapping[str, str], fqn: str) -> tuple[str, bool]:
    """``(layout name, asked outright)`` for ``fqn``: a layout named as a string is taken where
    measured faster (not outright); a mapping's layout is taken outright; unnamed: masked."""
    if isinstance(layout, str):
        return layout, layout == DEFAULT
    for pattern, value in layout.items():
        if fnmatch.fnmatchcase(fqn, pattern):
            return value, True
    return DEFAULT, True


def apply_layout(sparse: Any, layout: str | Mapping[str, str], inputs: tuple[tuple[Any, ...], dict[str, Any]] | None) -> None:
    """Moves the weights ``layout`` selects into their layouts and records every decision in
    ``sparse._fxsparse.layouts``. Raises ValueError when a mapping names a weight that its
    layout cannot hold (nothing has changed then)."""
    state = sparse._fxsparse
    graphs = list({id(g): g for g in (state.mode_graphs or {True: sparse.graph}).values()}.values())
    choices: dict[str, LayoutChoice] = {}
    plans: dict[str, tuple[Layout, Plan]] = {}
    refused = []
    for fqn, site in state.sites.items():
        name, outright = _asked(layout, fqn)
        if name == DEFAULT:
            choices[fqn] = LayoutChoice(DEFAULT, "asked" if not isinstance(layout, str) else "the default layout")
            continue
        target = LAYOUTS.get(name, "layout")
        plan, why_not = target.plan(sparse, fqn, graphs)
        if plan is not None and site.active == math.prod(site.shape):
            plan, why_not = None, "budgeted dense"
        if plan is None:
            choices[fqn] = LayoutChoice(DEFAULT, f"cannot be {name}: {why_not}")
            if not isinstance(layout, str) and fqn in layout:
                refused.append(f"{fqn} ({why_not})")
            continue
        plans[fqn] = (target, plan)
    if refused:
        raise ValueError(
            f"layout asks for a layout that cannot hold weight(s): {'; '.join(refused[:5])}. Leave these out of the "
            "mapping (sparse.layouts says per weight why it stays masked)"
        )
    to_time = {f: p for f, p in plans.items() if not _asked(layout, f)[1]}
    timed = _time_layers(sparse, graphs[0], to_time, inputs) if inputs is not None and to_time else {}
    for fqn, (target, plan) in plans.items():
        fastest = _fastest(timed.get(fqn), target.name)
        if _asked(layout, fqn)[1]:
            choices[fqn] = LayoutChoice(target.name, "asked", timed.get(fqn, {}), fastest or target.default_kernel(sparse, fqn))
        elif fqn in timed:
            ms = timed[fqn]
            wins = ms[target.name] <= ms[DEFAULT] * (1 - MARGIN)
            choices[fqn] = LayoutChoice(target.name if wins else DEFAULT, "timed on example_inputs", ms,
                                        fastest if wins else None)
        else:
            wins, reason = target.without_inputs(sparse, fqn, plan)
            choices[fqn] = LayoutChoice(target.name if wins else DEFAULT, reason,
                                        kernel=target.default_kernel(sparse, fqn) if wins else None)
    for fqn, choice in choices.items():
        if choice.layout != DEFAULT:
            target, plan = plans[fqn]
            target.install(sparse, graphs, fqn, plan, choice.kernel)
    state.layouts = choices
    if any(c.layout != DEFAULT for c in choices.values()):
        sparse.recompile()


def _fastest(ms: Mapping[str, float] | None, name: str) -> str | None:
    """The kernels of layout ``name`` whose timed step was fastest (``"<name>/<kernels>"``
    keys), or None."""
    timed = {k.split("/", 1)[1]: v for k, v in (ms or {}).items() if k.startswith(f"{name}/")}
    return min(timed, key=timed.__getitem__) if timed else None


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


def _time_layers(sparse: Any, graph: torch.fx.Graph, plans: Mapping[str, tuple[Layout, Plan]],
                 inputs: Any) -> dict[str, dict[str, float]]:
    """Per candidate weight: the median ms of one training step of its layer, masked and in its
    candidate layout."""
    timed: dict[str, dict[str, float]] = {}

    def visit(fqn: str, x: torch.Tensor) -> None:
        with torch.enable_grad():
            target, plan = plans[fqn]
            timed[fqn] = _time_layer(sparse, fqn, target, plan, x)

    _visit_inputs(sparse, graph, set(plans), inputs, visit)
    return timed


def _time_layer(sparse: Any, fqn: str, target: Layout, plan: Plan, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """The median ms of one training step of ``fqn``'s layer on ``x``: masked, and in
    ``target`` with each of its kernels (``"<name>/<kernels>"``); ``target.name`` is the fastest
    of those."""
    steps = {**LAYOUTS.get(DEFAULT).timed_steps(sparse, fqn, plan, x), **target.timed_steps(sparse, fqn, plan, x)}

    def finished() -> None:  # an accelerator queues kernels: wait for them before the clock
        if x.device.type != "cpu":
            torch.accelerator.synchronize(x.device)

    ms: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats + 1):  # interleaved; the first round warms up (and compiles)
        for name, step in steps.items():
            finished()
            start = time.perf_counter()
            step()
            finished()
            ms[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(values[1:]) for name, values in ms.items()}
    return {**medians, target.name: min(v for k, v in medians.items() if k.startswith(f"{target.name}/"))}
