"""Real sparse inference: a trained SparseGraphModule as an eval-only module that stores and runs
only its active weights.

:func:`export_inference` is a short pipeline of passes over a copy of the sparse module's fx
graph, each a small function in :mod:`fxsparse.passes.lower` (this module holds the compressed
layer modules, the measurements and the entry point):

1. ``materialize``: the masked weight every masked-weight node hands its consumer (the
   mask applied, parametrizations computed) becomes a constant of the graph; the prologue and the
   masker go, and with them the trainable parameters and masks.
2. ``fold_batchnorm``: an eval-mode BatchNorm that is a convolution's only user folds into
   that convolution's constant weight and bias (a per-output-channel scale keeps zeros zero).
3. ``constant_products`` then :func:`_lower`: every linear layer, 2-D convolution and matrix product by a constant weight is
   replaced by a module that holds the weight compressed (CSR: the active values, their int32
   column indices and row offsets) and runs the kernel that the export measured fastest on the
   layer's own example input: a sparse matrix product (``torch.sparse`` CSR; a convolution as a
   sparse matmul over its unfolded input, a 1x1 one without unfolding), the dense kernel, or the
   dense kernel on the rows that hold any active weight (filters or neurons that training left
   empty are dropped; their outputs are the bias). A sparse kernel is chosen only when it beat
   the dense one. A layer timed alone runs from cache, so :func:`_check_whole` then times the
   whole module with those choices, with only their clear wins and with every layer dense
   (interleaved) and keeps the fastest: the export is never slower than dense by its own
   end-to-end measurement.

Weights inside opaque leaf modules (nn.MultiheadAttention, RNNs) stay in those modules, dense,
with their inactive entries zero. The file a ``torch.save`` writes holds the compressed weights
only (the dense copy a dense-kernel layer computes with is rebuilt on first use), so its size
follows the model-size accounting: 4 bytes per active value, 4 per column index.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxsparse.capture import graph_inputs, pytree_specs, split_inputs
from fxsparse.graph_module import SparseGraphModule
from fxsparse.masking import MASKER
from fxsparse.passes.lower import (
    Product,
    constant_products,
    drop_unread_constants,
    fold_batchnorm,
    freeze,
    inputs_of,
    materialize,
    replace_node,
)

__all__ = ["export_inference", "LayerChoice", "SparseLinear", "SparseConv2d", "SparseMatmul", "ExportError"]


class ExportError(ValueError):
    """The module or the example inputs cannot be exported."""


@dataclass(frozen=True)
class LayerChoice:
    """What the export decided for one layer, and the measurements it decided by.

    Attributes:
        node: the graph node the layer replaced.
        weight: the FQN of the sparse weight (as in ``sparse.masks``), or "" for a dense one.
        kind: "linear", "conv2d" or "matmul".
        shape: the weight's shape.
        density: active fraction of the weight.
        kernel: "csr" (sparse matmul), "dense" or "dense-rows" (dense on the non-empty rows).
        ms: the median milliseconds of each kernel tried on the layer's example input.
        module: the name of the exported module's submodule that runs the layer.
    """

    node: str
    weight: str
    kind: str
    shape: tuple[int, ...]
    density: float
    kernel: str
    ms: dict[str, float]
    module: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the compressed weight and the layer modules -----------------------------------------------


class _Compressed(nn.Module):
    """A 2-D matrix stored as CSR (int32 indices) in buffers; the dense copy is a cache that is
    neither saved nor pickled."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        with warnings.catch_warnings():  # "CSR support is in beta": it is what we measured
            warnings.simplefilter("ignore", UserWarning)
            csr = matrix.detach().to_sparse_csr()
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("crow", csr.crow_indices().to(torch.int32))
        self.register_buffer("col", csr.col_indices().to(torch.int32))
        self.rows, self.cols = matrix.shape
        self._csr: torch.Tensor | None = None
        self._dense: torch.Tensor | None = None
        rows = self.crow[1:] != self.crow[:-1]
        self.register_buffer("nonempty", torch.nonzero(rows).flatten().to(torch.int64))

    def csr(self) -> torch.Tensor:
        if self._csr is None or self._csr.device != self.values.device:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._csr = torch.sparse_csr_tensor(
                    self.crow, self.col, self.values, (self.rows, self.cols), check_invariants=False
                )
        return self._csr

    def dense(self) -> torch.Tensor:
        if self._dense is None or self._dense.device != self.values.device:
            self._dense = self.csr().to_dense()
        return self._dense

    def nonempty_rows(self) -> torch.Tensor:
        return self.dense().index_select(0, self.nonempty)

    def check_last_dim(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cols:
            raise ExportError(f"expected an input whose last dimension is {self.cols}, got shape {tuple(x.shape)}")

    def csr_times_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ matrix.T`` over ``x``'s last dimension, by the CSR product ``matrix @ x.T``."""
        flat = x.reshape(-1, self.cols)
        return torch.mm(self.csr(), flat.t()).t().reshape(*x.shape[:-1], self.rows)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _Compressed:
        self._csr = self._dense = None  # .to()/.half(): rebuilt from the moved buffers
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_csr"] = state["_dense"] = None
        return state

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {self.values.numel()} active"


def _scatter_rows(partial: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None, total: int, dim: int) -> torch.Tensor:
    """The full output from the outputs of the non-empty rows: the empty ones are the bias."""
    shape = list(partial.shape)
    shape[dim] = total
    out = partial.new_zeros(shape)
    if bias is not None:
        view = [1] * len(shape)
        view[dim] = total
        out += bias.view(view)
    return out.index_copy_(dim, rows, partial)


class SparseLinear(nn.Module):
    """``F.linear(x, weight, bias)`` with a compressed weight and a chosen kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "dense") -> None:
        super().__init__()
        self.weight = _Compressed(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w.check_last_dim(x)
        if self.kernel == "csr":
            out = w.csr_times_rows(x)
            return out if self.bias is None else out + self.bias
        if self.kernel == "dense-rows":
            bias = None if self.bias is None else self.bias.index_select(0, w.nonempty)
            return _scatter_rows(F.linear(x, w.nonempty_rows(), bias), w.nonempty, self.bias, w.rows, -1 % x.dim())
        return F.linear(x, w.dense(), self.bias)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


class SparseMatmul(nn.Module):
    """``x @ weight`` for a constant 2-D ``weight`` (stored transposed, compressed)."""

    def __init__(self, weight: torch.Tensor, kernel: str = "dense") -> None:
        super().__init__()
        self.weight_t = _Compressed(weight.t())
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_t
        w.check_last_dim(x)
        if self.kernel == "csr":
            return w.csr_times_rows(x)
        return torch.matmul(x, w.dense().t())

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


class SparseConv2d(nn.Module):
    """``torch.conv2d`` with a compressed weight: dense, dense on the non-empty filters, or (for
    ungrouped convolutions) a CSR matmul over the unfolded input (1x1 stride-1 ones need no
    unfolding)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any,
        groups: int, kernel: str = "dense",
    ) -> None:
        super().__init__()
        self.out_channels, in_per_group, kh, kw = weight.shape
        self.weight_shape = tuple(weight.shape)
        self.weight = _Compressed(weight.reshape(self.out_channels, -1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.stride, self.padding, self.dilation = _pair(stride), padding if isinstance(padding, str) else _pair(padding), _pair(dilation)
        self.groups = groups
        self.kernel = kernel

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def sparse_possible(self) -> bool:
        return self.groups == 1 and not isinstance(self.padding, str)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.weight_shape[1] * self.groups
        if x.dim() != 4 or x.shape[1] != expected:
            raise ExportError(f"expected an (N, {expected}, H, W) input, got shape {tuple(x.shape)}")
        w = self.weight
        if self.kernel == "csr":
            return self._csr_forward(x)
        if self.kernel == "dense-rows":
            rows = w.nonempty_rows().reshape(-1, *self.weight_shape[1:])
            bias = None if self.bias is None else self.bias.index_select(0, w.nonempty)
            return _scatter_rows(self._conv(x, rows, bias), w.nonempty, self.bias, self.out_channels, 1)
        return self._conv(x, w.dense().reshape(self.weight_shape), self.bias)

    def _csr_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, width = x.shape
        _, _, kh, kw = self.weight_shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            cols = x.reshape(n, c, h * width)
        else:
            cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))  # (N, C*kh*kw, L)
        if n == 1:
            out = torch.mm(self.weight.csr(), cols[0]).unsqueeze(0)
        else:
            flat = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C*kh*kw, N*L)
            out = torch.mm(self.weight.csr(), flat).reshape(self.out_channels, n, -1).transpose(0, 1)
        out = out.reshape(n, self.out_channels, ho, wo)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return f"{self.weight_shape}, stride={self.stride}, padding={self.padding}, groups={self.groups}, kernel={self.kernel}"


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


# --- measuring ---------------------------------------------------------------------------------


def _finished(out: Any) -> Any:
    """Waits until the kernels that computed ``out`` have run: on an accelerator a call returns
    once they are queued, so a clock read right after it would time the launch, not the work."""
    for device in {t.device for t in _flatten(out) if t.device.type not in ("cpu", "meta")}:
        torch.accelerator.synchronize(device)
    return out


def _time(fn: Callable[[], Any], repeats: int) -> float:
    with torch.no_grad():
        _finished(fn())
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            _finished(fn())
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _choose(module: nn.Module, x: torch.Tensor, kernels: list[str], repeats: int, margin: float) -> tuple[str, dict[str, float]]:
    """The fastest of ``kernels`` on ``x``; a kernel other than "dense" must beat dense by
    ``margin`` (relative) to be chosen."""
    ms = {}
    for kernel in kernels:
        module.kernel = kernel
        ms[kernel] = _time(lambda: module(x), repeats)
    best = min(ms, key=ms.get)
    if best != "dense" and ms[best] > ms["dense"] * (1 - margin):
        best = "dense"
    module.kernel = best
    return best, ms


def _lower(
    gm: torch.fx.GraphModule, example: tuple[tuple[Any, ...], dict[str, Any]], constants: dict[str, str], autotune: bool,
    repeats: int, margin: float,
) -> list[LayerChoice]:
    """Replaces linear, conv2d and matmul nodes with a constant weight by measured modules."""
    products = constant_products(gm)
    inputs = inputs_of(gm, {p.node for p in products}, graph_inputs(gm, *example))
    choices = []
    for index, product in enumerate(products):
        x = inputs.get(product.node)
        if x is None or not product.bias_known:
            continue  # not reached by the example (a branch not taken), or a computed bias: left as it is
        module, kernels = _layer(product)
        if autotune:
            kernel, ms = _choose(module, x, kernels, repeats, margin)
        else:
            kernel, ms = "dense", {}
            module.kernel = "dense"
        name = f"fxsparse_layer_{index}"
        node_name = product.node.name
        replace_node(gm, product.node, module, name)
        weight = product.weight
        density = float(weight.count_nonzero()) / max(weight.numel(), 1)
        choices.append(LayerChoice(
            node=node_name, weight=constants.get(getattr(product.weight_node, "target", ""), ""), kind=product.kind,
            shape=tuple(weight.shape), density=density, kernel=kernel, ms=ms, module=name,
        ))
    drop_unread_constants(gm, constants)
    return choices


def _layer(product: Product) -> tuple[nn.Module, list[str]]:
    """The compressed module computing ``product`` and the kernels it can run (tests try each)."""
    if product.kind == "linear":
        module: nn.Module = SparseLinear(product.weight, product.bias)
        kernels = ["dense", "csr"]
    elif product.kind == "conv2d":
        module = SparseConv2d(product.weight, product.bias, *product.conv)
        kernels = ["dense"] + (["csr"] if module.sparse_possible() else [])
    else:
        module = SparseMatmul(product.weight)
        kernels = ["dense", "csr"]
    rows = getattr(module, "weight", getattr(module, "weight_t", None))
    if product.kind != "matmul" and 0 < rows.nonempty.numel() < rows.rows and getattr(module, "groups", 1) == 1:
        kernels.append("dense-rows")
    module.kernels = tuple(kernels)
    return module, kernels


# --- the entry point ----------------------------------------------------------------------------


def export_inference(
    sparse: nn.Module,
    example_inputs: Any,
    *,
    autotune: bool = True,
    repeats: int = 7,
    margin: float = 0.05,
) -> torch.fx.GraphModule:
    """An eval-only module computing what ``sparse`` computes in eval mode, from compressed
    active weights with the fastest measured kernel per layer (see the module docstring).

    Args:
        sparse: a trained :class:`fxsparse.SparseGraphModule` (not modified).
        example_inputs: inputs of the shape the exported module will see (batch size included),
            in any form ``sparsify`` takes: a tensor, a tuple of positional inputs, a dict of
            keyword inputs (``model(**batch)``) or ``(args, kwargs)``; each layer is timed on
            what it receives. The exported module is called as the sparse module is, keywords
            included.
        autotune: measure the kernels (otherwise every layer computes densely).
        repeats: timed runs per kernel and layer (median).
        margin: a sparse kernel must beat the dense one by this fraction to be chosen.

    Returns:
        A ``torch.fx.GraphModule`` in eval mode, without parameters; ``exported.fxsparse_choices``
        lists a :class:`LayerChoice` per lowered layer (its final kernel), ``fxsparse_whole_ms``
        the whole module's median milliseconds under each configuration the end-to-end check
        timed ("chosen" per layer, "clear wins" only, "dense") and ``fxsparse_kept`` the one kept.

    Raises:
        TypeError: ``sparse`` is not a SparseGraphModule.
        ExportError: ``example_inputs`` are not inputs ``sparse`` accepts.
    """
    if not isinstance(sparse, SparseGraphModule):
        raise TypeError(
            f"expected a SparseGraphModule (what fxsparse.sparsify returns), got {type(sparse).__name__}; "
            f"sparsify and train the model first: sparse = fxsparse.sparsify(model, density=...)"
        )
    example = split_inputs(example_inputs)
    if example is None:
        raise ExportError(
            "expected example_inputs (a tensor, a tuple, a dict of keyword inputs or (args, kwargs)) of the shape the "
            "exported module will see: each layer is timed on what it receives"
        )
    args, kwargs = example
    reference, used = _reference_run(sparse, example)

    # nothing the export changes is shared with the user's module; in eval mode, whose graph a
    # module captured by torch.export has apart from its training graph
    work = copy.deepcopy(sparse).eval()
    gm = torch.fx.GraphModule(work, work.graph, class_name="SparseInference")
    for name, spec in pytree_specs(work).items():  # an exported graph's code reads its pytree specs
        setattr(gm, name, spec)
    constants = materialize(gm, used)
    gm.eval()
    fold_batchnorm(gm, constants)
    choices = _lower(gm, example, constants, autotune, repeats, margin)
    freeze(gm)
    gm.recompile()
    gm.fxsparse_whole_ms, gm.fxsparse_kept = {}, "chosen"
    if autotune:
        choices, gm.fxsparse_whole_ms, gm.fxsparse_kept = _check_whole(gm, example, choices, repeats, margin)
    gm.fxsparse_choices = choices
    with torch.no_grad():
        out = gm(*args, **kwargs)
    _check_close(out, reference)
    return gm


def _reference_run(sparse: SparseGraphModule, example: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The sparse module's eval-mode output on ``example`` (what the export must reproduce) and
    the weight each masked-weight node computed with, by weight FQN (what it materializes); the
    module's mode is restored. Raises ExportError when the forward fails on those inputs."""
    args, kwargs = example
    used: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
        name = kwargs.get("name", args[2] if len(args) > 2 else None)
        used[name] = output.detach()

    was_training = sparse.training
    handle = sparse.get_submodule(MASKER).register_forward_hook(record, with_kwargs=True)
    try:
        sparse.eval()
        with torch.no_grad():
            return sparse(*args, **kwargs), used
    except Exception as error:  # noqa: BLE001 - any failure of the forward is the input's
        raise ExportError(
            f"expected example_inputs that the sparse module accepts, but its forward failed on {_described(example)}: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        handle.remove()
        sparse.train(was_training)


def _described(example: tuple[tuple[Any, ...], dict[str, Any]]) -> str:
    """The shapes of ``(args, kwargs)`` for an error message."""
    def shape(a: Any) -> Any:
        return tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
    args, kwargs = example
    return f"positional inputs of shape {[shape(a) for a in args]} and keyword inputs {{{', '.join(f'{k}: {shape(v)}' for k, v in kwargs.items())}}}"


def _check_whole(
    gm: torch.fx.GraphModule, example: tuple[tuple[Any, ...], dict[str, Any]], choices: list[LayerChoice], repeats: int,
    margin: float,
) -> tuple[list[LayerChoice], dict[str, float], str]:
    """Times the whole module with the per-layer choices, with only the clear wins among them
    (a sparse kernel at least twice ``margin`` faster than dense on its layer) and with every
    layer dense, interleaved; keeps the fastest, dense unless another beats it by ``margin / 2``.

    A layer timed alone runs with its input and weight in cache; in the model it may not, so a
    set of small per-layer wins can add up to a slower whole. This check keeps the export never
    slower than dense by its own end-to-end measurement."""
    layers = {c.node: gm.get_submodule(c.module) for c in choices}
    chosen = {c.node: c.kernel for c in choices}
    if all(kernel == "dense" for kernel in chosen.values()):
        return choices, {}, "chosen"
    clear = {
        c.node: c.kernel if c.kernel == "dense" or c.ms[c.kernel] <= c.ms["dense"] * (1 - 2 * margin) else "dense"
        for c in choices
    }
    configs = {"chosen": chosen, "dense": dict.fromkeys(chosen, "dense")}
    if clear != chosen and any(k != "dense" for k in clear.values()):
        configs["clear wins"] = clear
    samples: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    with torch.no_grad():
        for round_ in range(max(repeats, 5) + 1):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                for node, kernel in configs[name].items():
                    layers[node].kernel = kernel
                start = time.perf_counter()
                _finished(gm(*example[0], **example[1]))
                if round_:  # the first round warms each configuration up
                    samples[name].append((time.perf_counter() - start) * 1e3)
    whole = {name: statistics.median(values) for name, values in samples.items()}
    best = min(whole, key=whole.get)
    if best != "dense" and whole[best] > whole["dense"] * (1 - margin / 2):
        best = "dense"
    for node, kernel in configs[best].items():
        layers[node].kernel = kernel
    return [replace(c, kernel=configs[best][c.node]) for c in choices], whole, best


def _check_close(out: Any, reference: Any) -> None:
    outs, refs = _flatten(out), _flatten(reference)
    for a, b in zip(outs, refs):
        if a.is_floating_point():
            scale = float(b.abs().max()) if b.numel() else 1.0
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
                error = float((a - b).abs().max())
                raise ExportError(
                    f"fxsparse: the exported module's output differs from the sparse module's by {error:.3g} "
                    f"(max |output| {scale:.3g}); please report this with the model"
                )


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []
