"""Dynamic-sparse-training methods as small objects, one update loop shared by all.

=================  ===============================  ===========================================
method             class                            differs from the one it extends in
=================  ===============================  ===========================================
``static``         :class:`Static`                  never grows (no update)
``set``            :class:`SET`                     grows at random (``grow = "random"``)
``rigl``           :class:`RigL` (``SET``)          grows by ``|dL/d(w*m)|`` (``grow = "gradient"``)
``rigl-sg``        :class:`RigLSG` (``RigL``)       redistributes by the sparse gradient
``rigl-sm``        :class:`RigLSM` (``RigL``)       redistributes by the optimizer's momentum
``snfs``           :class:`SNFS` (``RigL``)         grows from a dense momentum, redistributed
``pruning``        :class:`MagnitudePruning`        only drops, along a cubic schedule
=================  ===============================  ===========================================

A new method is a subclass of :class:`Method` with a ``name`` that overrides a hook
(:meth:`Method.drop_scores`, :meth:`Method.grow_scores`, :meth:`Method.grow_counts`, or what the
scheduler asks: :meth:`Method.is_update_step`, :meth:`Method.arms`, :meth:`Method.update`),
registered with :func:`register_method`; ``examples/`` holds one, tested.
"""

from __future__ import annotations

from typing import Any

from fxsparse.methods.base import LayerChange, Method, check_redistribute, drop_and_grow, prune
from fxsparse.methods.dst import SET, SNFS, RigL, RigLSG, RigLSM, Static
from fxsparse.methods.pruning import MagnitudePruning
from fxsparse.registry import METHODS

__all__ = [
    "Method", "LayerChange", "drop_and_grow", "prune", "Static", "SET", "RigL", "RigLSG", "RigLSM", "SNFS",
    "MagnitudePruning", "register_method", "available_methods", "make_method",
]


def register_method(
    method: type[Method] | str, grow: str | None = None, *, redistribute: str | None = None,
    dense_momentum: bool = False, prune: bool = False, paper: str = "",
) -> Any:
    """Registers a method for ``TopologyScheduler(method=name)``.

    Pass a :class:`Method` subclass (usable as a class decorator; its ``name`` is the key), or,
    as before methods were objects, a name and the attributes of a drop-and-grow method
    (``grow``: a registered grow score; ``redistribute``: None, ``"score"`` or ``"momentum"``),
    which makes the subclass.

    Example:
        >>> @register_method  # doctest: +SKIP
        ... class GradientFlow(RigL):
        ...     name = "my-rigl"
        ...     def grow_scores(self, sparse, fqn, weight, mask, grad, update):
        ...         return grad.abs_() * weight.abs().mean()
    """
    if isinstance(method, type):
        if not issubclass(method, Method) or not method.name:
            raise TypeError(f"expected a Method subclass with a name, got {method!r}")
        METHODS.add(method.name, method)
        return method
    check_redistribute(redistribute)
    if prune or dense_momentum:
        raise ValueError(
            "a pruning or dense-momentum method is a Method subclass (see fxsparse.methods.MagnitudePruning, "
            "SNFS): subclass it and pass the class"
        )
    attributes = {"name": method, "grow": grow, "redistribute": redistribute, "paper": paper}
    cls = type(f"Method[{method}]", (Method,), attributes)
    METHODS.add(method, cls)
    return cls


def available_methods() -> list[str]:
    """Names accepted by ``TopologyScheduler(method=...)``."""
    return METHODS.names()


def make_method(name: str) -> Method:
    """A fresh instance of the method registered as ``name``."""
    return METHODS.get(name, "method")()


for _cls in (Static, SET, RigL, SNFS, RigLSG, RigLSM, MagnitudePruning):
    register_method(_cls)
