"""Every extension point of fxsparse in one place: methods, growth scores, inits, leaves.

Each registry is filled by a decorator and read by name; an unknown name lists the valid ones.

=====================  ==========================================  ===========================
registry               register with                               read by
=====================  ==========================================  ===========================
``METHODS``            ``register_method(cls)`` (a                 ``TopologyScheduler(method=)``
                       :class:`fxsparse.methods.Method` subclass)
``GROW_SCORES``        ``register_grow_score(name, needs_gradient)``  ``rigl_step(grow=)``,
                                                                   ``Method.grow``
inits                  ``register_init(name)``                     ``sparsify(init=)``
                       (:mod:`fxsparse.budgets`)
leaf modules,          ``register_leaf_module(cls)``,              the tracer
functions              ``register_leaf_function(fn, weights=)``
                       (:mod:`fxsparse.tracing`)
leaf weights           ``register_leaf_weights(cls, names)``       ``find_weights``' fallback
                       (:mod:`fxsparse.passes.find_weights`)
=====================  ==========================================  ===========================

The inits and leaves keep their tables in the modules that read them (fx-free maths and the
tracer); this module re-exports their decorators so that one import reaches every one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fxsparse.budgets import available_inits, register_init
from fxsparse.passes.find_weights import register_leaf_weights
from fxsparse.tracing import register_leaf_function, register_leaf_module

__all__ = [
    "Registry", "METHODS", "GROW_SCORES", "GrowScore", "register_grow_score", "grow_scores",
    "register_init", "available_inits", "register_leaf_module", "register_leaf_function",
    "register_leaf_weights",
]

T = TypeVar("T")


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
