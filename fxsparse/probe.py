"""Which parameters do conv/linear/matmul kernels read when code runs? Observed, not inferred.

:class:`ProductReads` is a ``TorchDispatchMode``: while it is active it sees every ATen op that
runs (the level below ``torch.nn.functional``, where ``F.linear`` has become ``addmm`` on
``weight.t()`` and ``torch.einsum`` a ``bmm``) and records each parameter whose memory a product
kernel reads as an operand (the parameter itself or any view of it: ``.t()``, ``expand``,
``reshape`` without a copy), and separately each one that reaches a product only through a
computation of parameters alone (weight standardization). It knows nothing of torch.fx and of
fxsparse's graph analysis, which makes it the independent witness that
:func:`fxsparse.check_model` holds that analysis to, and the way
:func:`fxsparse.passes.find_weights.find_weights` learns what a wrapped function it cannot trace
does with the weights it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["ProductReads", "SparseReads", "PRODUCT_OPERANDS"]

_ATEN = torch.ops.aten
# ATen products and the positions of their matrix operands (a bias is no operand)
PRODUCT_OPERANDS: dict[Any, tuple[int, ...]] = {
    _ATEN.mm: (0, 1), _ATEN.bmm: (0, 1), _ATEN.mv: (0, 1), _ATEN.matmul: (0, 1),
    _ATEN.addmm: (1, 2), _ATEN.baddbmm: (1, 2), _ATEN.addbmm: (1, 2), _ATEN.addmv: (1, 2),
    _ATEN.linear: (0, 1), _ATEN._addmm_activation: (1, 2), _ATEN._trilinear: (0, 1, 2),
    _ATEN.convolution: (0, 1), _ATEN._convolution: (0, 1),
    _ATEN.conv1d: (0, 1), _ATEN.conv2d: (0, 1), _ATEN.conv3d: (0, 1),
    _ATEN.conv_transpose1d: (0, 1), _ATEN.conv_transpose2d: (0, 1), _ATEN.conv_transpose3d: (0, 1),
}


# fused recurrent kernels (mkldnn_rnn_layer, lstm, gru ...) read their weight matrices as operands
_RECURRENT = ("rnn", "lstm", "gru")


def _operands(func: Any, args: tuple[Any, ...]) -> list[Any]:
    packet = getattr(func, "overloadpacket", None)
    positions = PRODUCT_OPERANDS.get(packet)
    if positions is not None:
        return [args[i] for i in positions if i < len(args)]
    if any(word in getattr(packet, "__name__", "") for word in _RECURRENT):
        return [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.dim() >= 2]
    return []


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (a sparse or fake tensor)
        return None
    return pointer or None


class ProductReads(TorchDispatchMode):
    """Records the parameters that product kernels read while the mode is active.

    Args:
        params: the parameters to watch, by name (tied names: give one).

    Attributes:
        direct: names of the parameters a product read as an operand (itself or a view).
        computed: names of those a product read only through a tensor computed from
            parameters alone (``(w - w.mean()) / w.std()``, ``w * gain``).

    Example:
        >>> lin = torch.nn.Linear(4, 3)
        >>> with ProductReads({"weight": lin.weight}) as reads:
        ...     _ = lin(torch.randn(2, 4))
        >>> reads.direct
        {'weight'}
    """

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._names: dict[int, str] = {}
        # only these are reported: a weight read directly has two dims or more, one read through a
        # computation is a matrix (a per-channel gain of shape (C, 1, 1, 1) feeds a computation)
        self._weights: set[str] = set()
        self._matrices: set[str] = set()
        for name, param in params.items():
            key = _storage(param)
            if key is not None:
                self._names.setdefault(key, name)
                if param.dim() >= 2:
                    self._weights.add(name)
                if sum(d > 1 for d in param.shape) >= 2:
                    self._matrices.add(name)
        self._derived: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> parameter names
        self.direct: set[str] = set()
        self.computed: set[str] = set()

    def _param(self, value: Any) -> str | None:
        if not isinstance(value, torch.Tensor):
            return None
        key = _storage(value)
        return None if key is None else self._names.get(key)

    def _sources(self, value: Any) -> set[str] | None:
        """The parameters ``value`` comes from when it is computed from parameters alone."""
        name = self._param(value)
        if name is not None:
            return {name}
        return self._derived.get(value) if isinstance(value, torch.Tensor) else None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        operands = _operands(func, args)
        for operand in operands:
            name = self._param(operand)
            if name is not None:
                self.direct |= {name} & self._weights
            elif isinstance(operand, torch.Tensor) and operand in self._derived:
                self.computed |= self._derived[operand] & self._matrices
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sources = [self._sources(t) for t in tensors]
        if tensors and not operands and all(s is not None for s in sources):
            found = set().union(*sources)  # type: ignore[arg-type]
            for result in tree_leaves(out):
                if isinstance(result, torch.Tensor) and self._param(result) is None:
                    self._derived[result] = found
        return out


class SparseReads(TorchDispatchMode):
    """Records the sparse weights whose zeros a product kernel does not read.

    While active, every product operand (:data:`PRODUCT_OPERANDS`) that is a weight of ``masks``
    or is computed from exactly one of them (with other parameters, buffers and constants: a
    standardized kernel, ``where(mask, kernel, 0)``), and has its mask's shape, is compared with
    the mask: an operand nonzero where the mask is False means the product computes with an
    inactive weight.

    Args:
        tensors: every parameter and buffer of the module, by name.
        masks: the sparse weights' masks, by weight name.

    Attributes:
        checked: the weights whose operand a product read (and was compared).
        dense: those that were nonzero somewhere the mask is False.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._masks = {name: mask.detach().to(torch.bool) for name, mask in masks.items()}
        self._names: dict[int, frozenset[str]] = {}
        self._layout: dict[int, tuple[tuple[int, ...], int]] = {}  # a weight's own strides and offset
        for name, tensor in tensors.items():
            key = _storage(tensor)
            if key is not None:
                self._names[key] = self._names.get(key, frozenset()) | (frozenset({name}) if name in masks else frozenset())
                if name in masks:
                    self._layout[key] = (tuple(tensor.stride()), tensor.storage_offset())
        self._derived: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.checked: set[str] = set()
        self.dense: set[str] = set()

    def _sources(self, value: torch.Tensor) -> frozenset[str] | None:
        if value.dim() == 0:
            return frozenset()  # a scalar constant
        key = _storage(value)
        if key is not None and key in self._names:
            return self._names[key]
        return self._derived.get(value)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        operands = _operands(func, args)
        for operand in operands:
            if not isinstance(operand, torch.Tensor):
                continue
            names = self._sources(operand)
            if names is None or len(names) != 1:
                continue
            (name,) = names
            mask = self._masks[name]
            layout = self._layout.get(_storage(operand))  # a view of the weight: only the weight as it is
            if layout is not None and layout != (tuple(operand.stride()), operand.storage_offset()):
                continue
            if tuple(operand.shape) == tuple(mask.shape):
                self.checked.add(name)
                if bool(operand.detach().ne(0).logical_and(~mask.to(operand.device)).any()):
                    self.dense.add(name)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sources = [self._sources(t) for t in tensors]
        permutes = getattr(func, "overloadpacket", None) in _PERMUTES  # a square kernel's transpose keeps its shape
        if tensors and not operands and not permutes and all(s is not None for s in sources):
            found = frozenset().union(*sources)  # type: ignore[arg-type]
            for result in tree_leaves(out):
                if isinstance(result, torch.Tensor) and _storage(result) not in self._names:
                    self._derived[result] = found
        return out


_PERMUTES = {_ATEN.t, _ATEN.transpose, _ATEN.permute, _ATEN.swapaxes, _ATEN.swapdims, _ATEN.numpy_T, _ATEN.mT,
             _ATEN.adjoint, _ATEN.flip, _ATEN.rot90, _ATEN.roll}
