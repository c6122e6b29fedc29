"""Layouts: how each sparse weight is stored and computed with, one class per kind.

==============  ===========================================  =====================================
layout          storage                                      chosen
==============  ===========================================  =====================================
``"masked"``    the dense Parameter and a bool mask buffer   the default; where every weight starts
                (:mod:`fxsparse.layouts.masked`)
``"compact"``   the active values and CSR indices, sparse    per weight where it qualifies and is
                kernels (:mod:`fxsparse.layouts.compact`)    measured faster (``sparsify(layout=)``)
==============  ===========================================  =====================================

A layout is a :class:`Layout` subclass (the interface: :mod:`fxsparse.layouts.base`) registered
with :func:`register_layout`; the rest of fxsparse reaches a weight's storage only through
:func:`layout_of`. A third layout is one module: subclass, register, and ``sparsify(layout=name)``
takes it (:mod:`fxsparse.layouts.choose` decides per weight).
"""

from __future__ import annotations

from typing import Any, TypeVar

from fxsparse.layouts.base import DenseCall, Layout, LayoutChoice, Plan
from fxsparse.registry import LAYOUTS

__all__ = ["Layout", "LayoutChoice", "Plan", "DenseCall", "LAYOUTS", "register_layout", "layout_of", "available_layouts",
           "layout_of_call", "apply_layout", "check_layout", "MARGIN"]

L = TypeVar("L", bound=type)


def register_layout(cls: L) -> L:
    """Registers a :class:`Layout` subclass under its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Layout)):
        raise TypeError(f"expected a fxsparse.layouts.Layout subclass, got {cls!r}")
    LAYOUTS.add(cls.name, cls())
    return cls


def available_layouts() -> list[str]:
    """The names ``sparsify(layout=...)`` accepts."""
    return LAYOUTS.names()


def layout_of(sparse: Any, fqn: str) -> Layout:
    """The layout holding the sparse weight ``fqn`` of ``sparse``."""
    return LAYOUTS.get(sparse._fxsparse.sites[fqn].layout, "layout")


def layout_of_call(node: Any) -> Layout | None:
    """The layout whose graph function ``node`` calls (:attr:`Layout.graph_functions`), or None."""
    if getattr(node, "op", None) != "call_function":
        return None
    for name in LAYOUTS.names():
        layout = LAYOUTS.get(name)
        if node.target in layout.graph_functions:
            return layout
    return None


from fxsparse.layouts.masked import MaskedLayout  # noqa: E402  (the interface first, then the layouts)
from fxsparse.layouts.compact import CompactLayout  # noqa: E402
from fxsparse.layouts.choose import MARGIN, apply_layout, check_layout  # noqa: E402

register_layout(MaskedLayout)
register_layout(CompactLayout)
