"""The interface of a layout: how one sparse weight is stored and computed with.

A layout is one stateless object per kind (``"masked"``, ``"compact"``), registered by name in
:data:`fxsparse.registry.LAYOUTS`; each sparse weight's ``_Site.layout`` names its layout and
``_Site.storage`` the submodule holding it where the layout keeps its own storage. Everything
outside :mod:`fxsparse.layouts` asks the weight's layout (:func:`layout_of`) instead of testing
which one it is: the views that decisions read (dense weight and mask), applying a decided mask
with the optimizer state, the checkpoint in the masked format, what an exported or counted graph
computes in its place, and the capabilities a caller must check before it changes anything
(a fixed count per layer, sharding, capturing again).

A layout is chosen per weight at ``sparsify`` (:mod:`fxsparse.layouts.choose`): the layouts other
than the default say which weights they can hold (:meth:`Layout.plan`), time a training step of
the layer on its real input (:meth:`Layout.timed_steps`) or judge by density without one
(:meth:`Layout.without_inputs`), and move a weight in (:meth:`Layout.install`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx

__all__ = ["Layout", "LayoutChoice", "Plan", "DenseCall"]

# the dense call a layout's graph node stands for: (function, (x, weight, bias), keyword arguments)
DenseCall = tuple[Callable[..., torch.Tensor], dict[str, Any]]


@dataclass(frozen=True)
class LayoutChoice:
    """How one sparse weight is stored, and why.

    Attributes:
        layout: the layout's name (``"compact"`` or ``"masked"``).
        reason: what decided it (asked for, timed, the density rule, or why it cannot be another).
        ms: the median milliseconds of one training step of the layer in each layout, when timed:
            ``"masked"``, the other layout's name (with its fastest kernels) and
            ``"<layout>/<kernels>"`` for each kernel technology timed.
        kernel: the kernels of a layout that has several (``"numba"`` or ``"torch"``); else None.
    """

    layout: str
    reason: str
    ms: dict[str, float] = field(default_factory=dict)
    kernel: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a layout found about one weight it can hold: how the graph reads it (``kind``, the
    layout's own vocabulary) and the dense op those reads compute (:attr:`product`, called
    ``fn(x, weight, bias, **kwargs)``), which the timing runs as the masked layer's step."""

    kind: str
    product: DenseCall
    options: dict[str, Any] = field(default_factory=dict)


class Layout:
    """One way to store a sparse weight. Subclass, set :attr:`name`, implement the methods that
    raise NotImplementedError, and register with :func:`fxsparse.layouts.register_layout`.

    Every method takes the :class:`~fxsparse.SparseGraphModule` and the weight's FQN in the
    original model; a layout keeps no state of its own (its tensors live in registered buffers
    and parameters of the sparse module).
    """

    name: ClassVar[str] = ""
    # capabilities, checked before anything changes
    fixed_count: ClassVar[bool] = False  # a layer's active count cannot change (no pruning, no redistribution)
    keeps_parameter: ClassVar[bool] = True  # the weight stays its owner's Parameter, its mask a buffer
    shardable: ClassVar[bool] = True  # fully_shard may shard it (fxsparse.sharding)
    recapturable: ClassVar[bool] = True  # the graph may be captured again (a new call signature)
    graph_functions: ClassVar[tuple[Callable[..., Any], ...]] = ()  # the functions its graph nodes call

    # ------------------------------------------------------------------------ choosing, installing
    def plan(self, sparse: Any, fqn: str, graphs: Sequence[torch.fx.Graph]) -> tuple[Plan | None, str]:
        """``(plan, "")`` when this layout can hold ``fqn`` as ``graphs`` read it, else
        ``(None, why not)``."""
        raise NotImplementedError

    def install(self, sparse: Any, graphs: Sequence[torch.fx.Graph], fqn: str, plan: Plan, kernel: str | None) -> None:
        """Moves the masked weight ``fqn`` into this layout: its storage, the graphs' reads of it,
        ``_Site.layout`` / ``_Site.storage``. The caller recompiles."""
        raise NotImplementedError

    def timed_steps(self, sparse: Any, fqn: str, plan: Plan, x: torch.Tensor) -> dict[str, Callable[[], None]]:
        """Zero-argument training steps of the layer on its input ``x`` in this layout, by label
        (``"<name>/<kernels>"``), each a forward and a backward; :mod:`fxsparse.layouts.choose`
        times them against the masked step."""
        raise NotImplementedError

    def without_inputs(self, sparse: Any, fqn: str, plan: Plan) -> tuple[bool, str]:
        """Without example inputs to time on: whether to hold ``fqn``, and the rule's reason."""
        raise NotImplementedError

    def default_kernel(self, sparse: Any, fqn: str) -> str | None:
        """The kernels used when none was timed (None for a layout with one way to compute)."""
        return None

    # ---------------------------------------------------------------------------------- views
    def mask(self, sparse: Any, fqn: str) -> torch.Tensor:
        """The bool mask in the weight's shape (the live buffer where there is one)."""
        raise NotImplementedError

    def weight(self, sparse: Any, fqn: str) -> torch.Tensor:
        """The weight in its dense shape, as decisions read it (the Parameter itself where it
        is one; else a new tensor, zeros at inactive entries)."""
        raise NotImplementedError

    def trainable(self, sparse: Any, fqn: str) -> torch.Tensor:
        """The Parameter that trains (its device and dtype are the layer's; the optimizer's
        state is keyed by it)."""
        raise NotImplementedError

    def active_values(self, sparse: Any, fqn: str) -> torch.Tensor | None:
        """The active weights in ascending flat position of the weight's shape, where the layout
        holds them so (a drop ranks them without a dense weight); None otherwise."""
        return None

    def storage(self, sparse: Any, fqn: str) -> torch.nn.Module | None:
        """The submodule holding the weight (None where it stays its owner's Parameter)."""
        site = sparse._fxsparse.sites[fqn]
        return sparse.get_submodule(site.storage) if site.storage else None

    # -------------------------------------------------------------------------------- updates
    def apply(self, sparse: Any, fqn: str, result: Any, states: list[torch.Tensor], zero_grad: bool) -> None:
        """Applies the decided update ``result`` (:class:`fxsparse.topology.TopologyUpdate`):
        kept connections keep value and ``states`` (optimizer state of :meth:`trainable`'s
        shape), new ones start at zero; ``zero_grad`` also zeroes the gradient of what was
        dropped. The caller updates the site's count."""
        raise NotImplementedError

    def rezero(self, sparse: Any, fqn: str) -> None:
        """Zeroes the inactive weights an edit may have set (nothing where none exist)."""

    # ---------------------------------------------------------------------- checkpoint, graphs
    def save(self, sparse: Any, fqn: str, destination: dict[str, Any], prefix: str) -> None:
        """Writes the weight in the masked layout's format (the dense weight under its FQN, the
        bool mask under its mask name) where the module system does not already."""

    def take(self, sparse: Any, fqn: str, state_dict: dict[str, Any], prefix: str,
             missing_keys: list[str] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Takes ``(weight, mask)`` of ``fqn`` out of a state_dict being loaded, before the
        submodules see it, where the layout loads them itself (:meth:`load`); notes absent keys
        in ``missing_keys``. None where the module system loads them."""
        return None

    def load(self, sparse: Any, fqn: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Takes a checked checkpoint's weight and mask (what :meth:`take` returned)."""

    def dense_call(self, storage: Any) -> tuple[str, DenseCall]:
        """For the storage one of this layout's graph nodes reads (a call of
        :attr:`graph_functions`; :meth:`call_operands`): ``(fqn, (fn, kwargs))``, the weight and
        the dense op the node computes, ``fn(x, weight, bias, **kwargs)``. Inference export and
        FLOP counting put that op in the node's place, with the weight from :meth:`weight`."""
        raise NotImplementedError

    def call_operands(self, args: Sequence[Any]) -> tuple[Any, Any, Any]:
        """``(x, storage, bias)`` of the arguments of one of this layout's graph nodes (nodes in
        the graph, values in an interpreter)."""
        raise NotImplementedError

    def stored_spec(self, storage: Any) -> tuple[tuple[int, ...], torch.dtype]:
        """The shape and dtype of the dense weight a storage module holds (what FLOP counting
        stands in for, without making it)."""
        raise NotImplementedError

    def stored_weight(self, storage: Any) -> torch.Tensor:
        """The dense weight (zeros at inactive entries, a new tensor) that a storage module of
        this layout holds: what an exported graph computes with in place of the node."""
        raise NotImplementedError

    def reads(self, sparse: Any, fqn: str, graph: torch.fx.Graph) -> int:
        """How many nodes of ``graph`` compute with ``fqn`` and record its growth gradient."""
        raise NotImplementedError
