"""Tracing a model into a torch.fx graph, honouring timm's no-trace registries and our own.

timm marks modules and functions that symbolic tracing cannot go through (dynamic "same"
padding, shape-dependent control flow) with ``register_notrace_module`` /
``register_notrace_function``; tracing with those as leaves is what lets timm's own feature
extraction trace nearly its whole model zoo. Users' untraceable code goes into the registries of
this module with :func:`register_leaf_module` and :func:`register_leaf_function`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.fx
from torch import nn

from fxsparse.masking import mask_prologue, zero_dirty

__all__ = [
    "register_leaf_module", "register_leaf_function", "trace", "leaf_modules", "leaf_functions",
    "leaf_function_weights",
]

_LEAF_MODULES: set[type[nn.Module]] = set()
# mask_prologue is the prologue of every SparseGraphModule: re-tracing its code (torch.save, a
# second sparsify attempt) must record it, not run it on proxies.
_LEAF_FUNCTIONS: set[Callable[..., Any]] = {mask_prologue, zero_dirty}
# the arguments of a leaf function that it uses as conv/linear/matmul weights, where declared
_LEAF_FUNCTION_WEIGHTS: dict[Callable[..., Any], frozenset[str]] = {}

M = TypeVar("M", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


def register_leaf_module(cls: M) -> M:
    """Keeps modules of ``cls`` as opaque ``call_module`` nodes when tracing (usable as a decorator).

    The graph cannot see their weights; those of conv/linear submodules, MultiheadAttention and
    RNNs inside are still sparsified (the module-level fallback), others can be declared with
    :func:`fxsparse.register_leaf_weights` and are otherwise listed in ``SparseGraphModule.skipped``.

    Example:
        >>> @register_leaf_module
        ... class Dynamic(nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"expected an nn.Module subclass, got {cls!r}")
    _LEAF_MODULES.add(cls)
    return cls


def register_leaf_function(fn: F | None = None, *, weights: Iterable[str] | None = None) -> Any:
    """Records calls of ``fn`` as single ``call_function`` nodes instead of tracing into it.

    ``fn`` must be a module-level function (torch.fx patches it by name in its globals). A
    parameter passed into it (``attention(x, self.qkv.weight, ...)``) is looked for inside: used
    there by a conv/linear/matmul, it is sparsified by the module-level fallback (zeroed before
    the forward, gradient masked on the parameter). fxsparse finds that out by tracing the
    function's body alone, or, where that fails (control flow on shapes), by watching it run on
    ``sparsify``'s ``example_inputs``; ``weights`` declares it instead: the names of ``fn``'s
    arguments that it uses as product weights (any other parameter given to it is then taken
    as no product weight). Usable as a decorator, with or without ``weights``.

    Example:
        >>> @register_leaf_function(weights=["w"])
        ... def project(x, w):
        ...     return x @ w.t() if x.dim() == 2 else torch.einsum("bnc,oc->bno", x, w)
    """
    if fn is None:
        return lambda f: register_leaf_function(f, weights=weights)
    if not callable(fn):
        raise TypeError(f"expected a function, got {fn!r}")
    if weights is not None:
        if isinstance(weights, str):
            weights = [weights]
        names = frozenset(weights)
        try:
            known = set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            known = names
        unknown = sorted(n for n in names if not isinstance(n, str) or n not in known)
        if unknown:
            raise ValueError(
                f"expected weights= to name arguments of {getattr(fn, '__name__', fn)} "
                f"({sorted(known)}), got unknown {unknown}"
            )
        _LEAF_FUNCTION_WEIGHTS[fn] = names
    _LEAF_FUNCTIONS.add(fn)
    return fn


def leaf_function_weights(fn: Any) -> frozenset[str] | None:
    """The arguments of ``fn`` declared as its product weights (:func:`register_leaf_function`),
    or None when nothing was declared."""
    try:
        return _LEAF_FUNCTION_WEIGHTS.get(fn)
    except TypeError:  # an unhashable target
        return None


def _timm_notrace() -> tuple[set[type[nn.Module]], set[Callable[..., Any]]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional at import time
        return set(), set()
    return set(get_notrace_modules()), set(get_notrace_functions())


def leaf_modules() -> set[type[nn.Module]]:
    """Module classes kept as leaves: ours, and timm's no-trace modules when timm is installed."""
    return _LEAF_MODULES | _timm_notrace()[0]


def leaf_functions() -> set[Callable[..., Any]]:
    """Functions kept as leaves: ours, and timm's no-trace functions when timm is installed."""
    return _LEAF_FUNCTIONS | _timm_notrace()[1]


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


def _default_concrete_args(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Forward arguments with defaults, beyond the inputs given, fixed to their defaults.

    timm's hiera takes ``mask=None``; tracing it as a proxy sends control flow down the wrong
    branch, fixing it at None traces the path a plain call takes.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete = {}
    for index, param in enumerate(params):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if index >= max(n_inputs, 1) and param.default is not inspect.Parameter.empty:
            concrete[param.name] = param.default
    return concrete


def trace(model: nn.Module, n_inputs: int = 1) -> torch.fx.GraphModule:
    """Symbolically traces ``model`` (which it does not modify) into a GraphModule.

    Raises:
        TypeError: the model cannot be traced; the message names the module being traced when
            tracing broke and how to register it as a leaf.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=_default_concrete_args(model, n_inputs) or None)
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
    name = type(model).__name__
    return torch.fx.GraphModule(model, graph, class_name=name)
