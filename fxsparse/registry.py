"""Every extension point of fxsparse in one place: methods, layouts, growth scores, inits, leaves.

Each registry is filled by a decorator and read by name; an unknown name lists the valid ones.

=====================  ==========================================  ===========================
registry               register with                               read by
=====================  ==========================================  ===========================
``METHODS``            ``register_method(cls)`` (a                 ``TopologyScheduler(method=)``
                       :class:`fxsparse.methods.Method` subclass)
``LAYOUTS``            ``register_layout(cls)`` (a                 ``sparsify(layout=)``, each
                       :class:`fxsparse.layouts.Layout` subclass)  weight's ``_Site.layout``
``GROW_SCORES``        ``register_grow_score(name, needs_gradient)``  ``rigl_step(grow=)``,
                                                                   ``Method.grow``
inits                  ``register_init(name)``                     ``sparsify(init=)``
                       (:mod:`fxsparse.budgets`)
leaf modules,          ``register_leaf_module(cls)``,              the tracer
functions              ``register_leaf_function(fn, weights=)``
leaf weights           ``register_leaf_weights(cls, names)``       ``find_weights``' fallback
=====================  ==========================================  ===========================

The inits keep their table in :mod:`fxsparse.budgets` (fx-free maths); this module re-exports
their decorator, so that one import reaches every extension point. The tracer
(:mod:`fxsparse.tracing`) and weight discovery (:mod:`fxsparse.passes.find_weights`) read the
leaf tables here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import inspect
from collections.abc import Iterable

from torch import nn

from fxsparse.budgets import available_inits, register_init
from fxsparse.masking import mask_prologue, zero_dirty
from fxsparse.segments import call_module, run_checkpointed

__all__ = [
    "Registry", "METHODS", "LAYOUTS", "GROW_SCORES", "GrowScore", "register_grow_score", "grow_scores",
    "register_init", "available_inits", "register_leaf_module", "register_leaf_function",
    "register_leaf_weights", "leaf_function_weights", "LEAF_MODULES", "LEAF_FUNCTIONS",
    "LEAF_FUNCTION_WEIGHTS", "LEAF_WEIGHTS",
]

T = TypeVar("T")
M = TypeVar("M", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Named entries of one kind, registered once each."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"expected a {self.what} name (a non-empty str), got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str, argument: str = "") -> T:
        if name not in self._entries:
            raise ValueError(f"expected {argument or self.what} to be one of {self.names()}, got {name!r}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# --- growth scores ---------------------------------------------------------------------------
# fn(module, fqn, weight, mask, dense_grad, update_index) -> a tensor of the weight's shape
GrowFunction = Callable[[Any, str, Any, Any, Any, int], Any]


@dataclass(frozen=True)
class GrowScore:
    """A growth criterion: the largest-scored inactive positions are grown.

    ``needs_gradient``: it reads the dense gradient (the scheduler arms its capture);
    ``threadsafe``: it reads only its arguments, so layers may be scored on several threads.
    """

    fn: GrowFunction
    needs_gradient: bool
    threadsafe: bool = False


GROW_SCORES: Registry[GrowScore] = Registry("grow score")


def register_grow_score(name: str, *, needs_gradient: bool, threadsafe: bool = False) -> Callable[[GrowFunction], GrowFunction]:
    """Registers a growth criterion for ``rigl_step(grow=name)`` and ``Method.grow``.

    The function gets ``(module, fqn, weight, mask, dense_grad, update_index)`` and returns a
    tensor of the weight's shape that the update may overwrite (a new one, or ``dense_grad``'s
    own storage: the update consumes the captured gradients); the largest-scored inactive
    positions are grown. RigL is SET with one override, the score (as in jaxpruner). With
    ``threadsafe=True`` (the function reads only its arguments) the layers of an update on CPU
    are scored and selected on several threads at once.
    """

    def decorator(fn: GrowFunction) -> GrowFunction:
        GROW_SCORES.add(name, GrowScore(fn, needs_gradient, threadsafe))
        return fn

    return decorator


def grow_scores() -> list[str]:
    """Names accepted by ``rigl_step(grow=...)``."""
    return GROW_SCORES.names()


# --- methods ---------------------------------------------------------------------------------
# name -> a fxsparse.methods.Method subclass (filled by fxsparse.methods)
METHODS: Registry[type] = Registry("method")


# --- layouts ---------------------------------------------------------------------------------
# name -> the fxsparse.layouts.Layout instance (stateless, one per kind; filled by fxsparse.layouts)
LAYOUTS: Registry[Any] = Registry("layout")


# --- leaves: code torch.fx cannot trace, and the product weights inside it -------------------
LEAF_MODULES: set[type[nn.Module]] = set()
# mask_prologue is the prologue of every SparseGraphModule: re-tracing its code (torch.save, a
# second sparsify attempt) must record it, not run it on proxies.
LEAF_FUNCTIONS: set[Callable[..., Any]] = {mask_prologue, zero_dirty, run_checkpointed, call_module}
# the arguments of a leaf function that it uses as conv/linear/matmul weights, where declared
LEAF_FUNCTION_WEIGHTS: dict[Callable[..., Any], frozenset[str]] = {}




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
    LEAF_MODULES.add(cls)
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
        LEAF_FUNCTION_WEIGHTS[fn] = names
    LEAF_FUNCTIONS.add(fn)
    return fn


def leaf_function_weights(fn: Any) -> frozenset[str] | None:
    """The arguments of ``fn`` declared as its product weights (:func:`register_leaf_function`),
    or None when nothing was declared."""
    try:
        return LEAF_FUNCTION_WEIGHTS.get(fn)
    except TypeError:  # an unhashable target
        return None


# Product weights of opaque leaves, by leaf type: names relative to the module of that type.
LEAF_WEIGHTS: dict[type[nn.Module], tuple[str, ...]] = {}


def register_leaf_weights(cls: type[nn.Module], names: Iterable[str]) -> None:
    """Declares the conv/linear/matmul weights (``names``) that modules of ``cls`` use inside.

    When such a module is an opaque leaf of the graph, those weights are sparsified by the
    module-level fallback instead of being left dense.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"expected an nn.Module subclass, got {cls!r}")
    names = tuple(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"expected parameter names of {cls.__name__}, got {names!r}")
    LEAF_WEIGHTS[cls] = names
