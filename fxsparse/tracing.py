"""Tracing a model into a torch.fx graph, honouring timm's no-trace registries and our own.

timm marks modules and functions that symbolic tracing cannot go through (dynamic "same"
padding, shape-dependent control flow) with ``register_notrace_module`` /
``register_notrace_function``; tracing with those as leaves is what lets timm's own feature
extraction trace nearly its whole model zoo. Users' untraceable code goes into the leaf registries of
:mod:`fxsparse.registry` with :func:`register_leaf_module` and :func:`register_leaf_function`
(re-exported here).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse.registry import (
    LEAF_FUNCTIONS, LEAF_MODULES, leaf_function_weights, register_leaf_function, register_leaf_module,
)

__all__ = [
    "register_leaf_module", "register_leaf_function", "trace", "leaf_modules", "leaf_functions",
    "leaf_function_weights",
]

def _timm_notrace() -> tuple[set[type[nn.Module]], set[Callable[..., Any]]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
        from timm.layers.padding import pad_same
    except ImportError:  # timm is optional at import time
        return set(), set()
    # pad_same computes "same" padding from the input's size in Python: timm keeps the layers that
    # call it (Conv2dSame, StdConv2dSame ...) whole instead; a leaf here lets such a layer be
    # traced alone (its kernel computation, fxsparse.kernels)
    return set(get_notrace_modules()), set(get_notrace_functions()) | {pad_same}


def leaf_modules() -> set[type[nn.Module]]:
    """Module classes kept as leaves: ours, and timm's no-trace modules when timm is installed."""
    return LEAF_MODULES | _timm_notrace()[0]


def leaf_functions() -> set[Callable[..., Any]]:
    """Functions kept as leaves: ours, and timm's no-trace functions when timm is installed."""
    return LEAF_FUNCTIONS | _timm_notrace()[1]


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with the leaf registries, remembering which module it is inside."""

    def __init__(self) -> None:
        functions = leaf_functions()
        super().__init__(autowrap_functions=tuple(f for f in functions if inspect.isfunction(f)))
        self._leaves = tuple(leaf_modules())
        self.module_stack_names: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self.module_stack_names.append(self.path_of_module(m) or type(m).__name__)
        result = super().call_module(m, forward, args, kwargs)
        self.module_stack_names.pop()
        return result


def _default_concrete_args(model: nn.Module, n_inputs: int, keywords: tuple[str, ...] = ()) -> dict[str, Any]:
    """Forward arguments with defaults, beyond the ``n_inputs`` positional inputs given and not
    named in ``keywords``, fixed to their defaults.

    timm's hiera takes ``mask=None``; tracing it as a proxy sends control flow down the wrong
    branch, fixing it at None traces the path a plain call takes.
    """
    unknown = set(keywords) - _parameter_names(model)
    if unknown and not _takes_var_keyword(model):
        raise TypeError(
            f"expected keyword example_inputs that {type(model).__name__}.forward takes, got {sorted(unknown)}; "
            f"it takes {sorted(_parameter_names(model))}"
        )
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete = {}
    for index, param in enumerate(params):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if index >= max(n_inputs, 1) and param.name not in keywords and param.default is not inspect.Parameter.empty:
            concrete[param.name] = param.default
    return concrete


def _parameter_names(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _takes_var_keyword(model: nn.Module) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return True


def trace(model: nn.Module, n_inputs: int = 1, keywords: tuple[str, ...] = ()) -> torch.fx.GraphModule:
    """Symbolically traces ``model`` (which it does not modify) into a GraphModule.

    Raises:
        TypeError: the model cannot be traced; the message names the module being traced when
            tracing broke and how to register it as a leaf.
    """
    tracer = _Tracer()
    concrete = _default_concrete_args(model, n_inputs, keywords)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises many kinds: TraceError, TypeError, RuntimeError ...
        where = tracer.module_stack_names[-1] if tracer.module_stack_names else "<top level>"
        owner = model.get_submodule(where) if where != "<top level>" else model
        raise TypeError(
            f"expected a model torch.fx can trace symbolically, but tracing "
            f"{type(model).__name__} failed inside {where!r} ({type(owner).__name__}): "
            f"{type(e).__name__}: {e}. Fix: mark that module as opaque with "
            f"fxsparse.register_leaf_module({type(owner).__name__}) (its weights then stay dense "
            f"and are listed in `skipped`), or the offending function with "
            f"fxsparse.register_leaf_function(fn)."
        ) from e
    _refuse_root_values(model, graph)
    name = type(model).__name__
    return torch.fx.GraphModule(model, graph, class_name=name)


def _refuse_root_values(model: nn.Module, graph: torch.fx.Graph) -> None:
    """A model that passes itself (``self``) to a function the graph keeps whole: tracing records
    an attribute read of the root, which no GraphModule can hold."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == "":
            users = ", ".join(sorted(getattr(u.target, "__name__", str(u.target)) for u in node.users))
            raise TypeError(
                f"expected a model torch.fx can trace symbolically, but {type(model).__name__} passes "
                f"itself (self) as an argument to {users}, which the graph keeps whole; a torch.fx graph "
                f"cannot hold its root module as a value. Fix: pass that function the submodules or "
                f"weights it uses (fn(x, self.proj, self.norm) rather than fn(x, self)), or pass "
                f"example_inputs and capture='export'."
            )
