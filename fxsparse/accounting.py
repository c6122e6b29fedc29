"""FLOP and model-size accounting from the fx graph, by the RigL papers' convention.

Convention (Evci et al. 2020, appendix; the reproduction report): only convolutions, linear layers
and matrix products count, at 2 FLOPs per multiply-accumulate; normalization, activations,
pooling and additions do not. A sparse layer costs its density times its dense FLOPs. Products of
two activations (attention's ``q @ k^T`` and ``attn @ v``) are dense compute in every method and
are reported apart from the weight FLOPs. Model size: 4 bytes (the element size) per active
weight, 1 bit per weight of every sparse layer for its mask, plus every dense parameter.

Shapes come from running the graph on fake tensors (no real compute, no memory for activations),
node by node, with :class:`torch.utils.flop_counter.FlopCounterMode` counting each node's
products; the graph says which product reads which weight (through views, tied names and the
masked-weight nodes of a :class:`~fxsparse.SparseGraphModule`). Where fake tensors cannot run a
model (data-dependent shapes), a copy of it is run for real under ``torch.no_grad``.

Training cost, in forward passes (f_S sparse, f_D dense; docs/rigl.md): dense ``3 f_D``; static
and SET ``3 f_S``; RigL ``(3 f_S dt + 2 f_S + f_D) / (dt + 1)``; SNFS ``2 f_S + f_D``; gradual
pruning the sum over its steps of ``3 f(t)`` with the layer densities its schedule gives at ``t``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxsparse.passes.find_weights import _weight_operands, canonical_names
from fxsparse.passes.ops import REWRITABLE_MODULES, is_rewritable, view_source
from fxsparse.layouts import layout_of, layout_of_call
from fxsparse.masking import MASKER, Masker
from fxsparse.schedules import GradualPruning, end_step, is_update_step
from fxsparse.recapture import follow_signature
from fxsparse.capture import Runner, capture, graph_inputs, pytree_specs, split_inputs

__all__ = [
    "FlopRow",
    "FlopReport",
    "TrainingCost",
    "GradualPruning",
    "flops",
    "flop_report",
    "layer_flops",
    "training_cost",
    "METHODS",
]

METHODS = ("dense", "static", "set", "rigl", "rigl-sg", "rigl-sm", "snfs", "pruning")


def _mv_flops(matrix: Any, vector: Any, *_: Any, **__: Any) -> int:
    return 2 * math.prod(matrix)


def _addmv_flops(_bias: Any, matrix: Any, vector: Any, *_: Any, **__: Any) -> int:
    return 2 * math.prod(matrix)


def _trilinear_flops(first: Any, weight: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    # F.bilinear: each output entry reads its weight slice (in1 x in2) once
    return 2 * math.prod(out_shape) * math.prod(weight[1:]) if out_shape is not None and len(weight) == 3 else 0


# products torch's FlopCounterMode does not count (its own table: mm, bmm, addmm, convolution ...)
_EXTRA_FLOPS = {
    torch.ops.aten.mv: _mv_flops, torch.ops.aten.addmv: _addmv_flops, torch.ops.aten._trilinear: _trilinear_flops,
}


@dataclass(frozen=True)
class FlopRow:
    """One counted product: a weight (all its uses summed), an activation product, or a leaf.

    Attributes:
        name: the weight's FQN (``kind == "weight"``), else the graph node's name.
        op: what computes it (``conv2d``, ``linear``, ``matmul``, ``scaled_dot_product_attention``,
            ``leaf:MultiheadAttention`` ...), of its first use for a weight used several times.
        kind: ``"weight"`` (a product with a parameter), ``"activation"`` (of two activations,
            always dense), or ``"opaque"`` (inside a leaf module the graph cannot see into:
            counted dense, its weights are not sparsified).
        output_shape: output shape of the (first) node.
        density: active fraction of the weight (1.0 for dense weights and other kinds).
        dense_flops: FLOPs of the batch given at density 1.
        params: the weight's element count (0 unless ``kind == "weight"``).
        active_params: its active elements.
    """

    name: str
    op: str
    kind: str
    output_shape: tuple[int, ...]
    density: float
    dense_flops: int
    params: int
    active_params: int

    @property
    def sparse_flops(self) -> float:
        """``density * dense_flops`` (the papers' convention)."""
        return self.density * self.dense_flops


@dataclass(frozen=True)
class TrainingCost:
    """Training FLOPs of one method: per step (mean) and per run, and as a multiple of dense."""

    method: str
    per_step: float
    per_run: float | None
    multiplier: float


@dataclass
class FlopReport:
    """Per-layer FLOPs, model size and training costs of a module on given inputs.

    FLOP figures are per sample when ``batch`` is known (the papers' convention), that is the
    batch's FLOPs divided by ``batch``. ``print(report)`` gives an aligned table.
    """

    rows: list[FlopRow]
    batch: int
    size_bytes: int
    dense_size_bytes: int
    delta_t: int = 100
    total_steps: int | None = None
    end_fraction: float = 0.75
    pruning: GradualPruning | None = None
    _pruning_densities: dict[str, float] = field(default_factory=dict)

    # --------------------------------------------------------------------------- inference
    def _sum(self, kinds: Iterable[str], sparse: bool) -> float:
        kinds = set(kinds)
        total = sum(r.sparse_flops if sparse else r.dense_flops for r in self.rows if r.kind in kinds)
        return total / self.batch

    @property
    def dense_flops(self) -> float:
        """Inference FLOPs per sample with every weight dense."""
        return self._sum(("weight", "activation", "opaque"), sparse=False)

    @property
    def sparse_flops(self) -> float:
        """Inference FLOPs per sample at the module's densities (activation products dense)."""
        return self._sum(("weight", "activation", "opaque"), sparse=True)

    @property
    def weight_flops(self) -> float:
        """Sparse FLOPs per sample of products with a weight (graph-visible weights only)."""
        return self._sum(("weight",), sparse=True)

    @property
    def activation_flops(self) -> float:
        """FLOPs per sample of products of two activations (attention), always dense."""
        return self._sum(("activation",), sparse=False)

    @property
    def opaque_flops(self) -> float:
        """FLOPs per sample inside opaque leaf modules, counted dense."""
        return self._sum(("opaque",), sparse=False)

    @property
    def inference_multiplier(self) -> float:
        """Sparse over dense inference FLOPs."""
        return self.sparse_flops / self.dense_flops if self.dense_flops else 1.0

    # ---------------------------------------------------------------------------- training
    def training(self, method: str) -> TrainingCost:
        """Training FLOPs per sample of ``method`` (one of :data:`METHODS`), see module doc."""
        f_sparse, f_dense = self.sparse_flops, self.dense_flops
        if method == "pruning":
            if self.pruning is None or self.total_steps is None:
                raise ValueError(
                    "expected a pruning schedule and total_steps for the cost of gradual pruning: "
                    "pass flop_report(..., total_steps=T, pruning=GradualPruning(begin, end, frequency))"
                )
            per_run = sum(
                3 * self._forward_at(self.pruning.fraction_pruned(t)) for t in range(self.total_steps)
            )
            per_step = per_run / self.total_steps
        else:
            per_step = training_cost(method, f_sparse, f_dense, delta_t=self.delta_t)
            per_run = None
            if self.total_steps is not None:
                per_run = self._run_cost(method, f_sparse, f_dense)
        return TrainingCost(method, per_step, per_run, per_step / (3 * f_dense) if f_dense else 1.0)

    def _run_cost(self, method: str, f_sparse: float, f_dense: float) -> float:
        assert self.total_steps is not None
        if method not in ("rigl", "rigl-sg", "rigl-sm"):
            return training_cost(method, f_sparse, f_dense) * self.total_steps
        # exact count of update steps: every delta_t until end_fraction of training
        t_end = end_step(self.total_steps, self.end_fraction)
        updates = sum(1 for t in range(1, self.total_steps + 1) if is_update_step(t, self.delta_t, t_end))
        return (self.total_steps - updates) * 3 * f_sparse + updates * (2 * f_sparse + f_dense)

    def _forward_at(self, progress: float) -> float:
        """Forward FLOPs per sample when every weight is ``progress`` of the way to its final
        density along the pruning cubic (``progress`` is the cubic's value, 0 to 1)."""
        total = 0.0
        for row in self.rows:
            if row.kind == "weight":
                final = self._pruning_densities.get(row.name, row.density)
                total += (1.0 - progress * (1.0 - final)) * row.dense_flops
            else:
                total += row.dense_flops
        return total / self.batch

    # ----------------------------------------------------------------------------- display
    def __str__(self) -> str:
        header = ("name", "op", "output", "density", "dense FLOPs", "sparse FLOPs", "params", "active")
        body = [
            (
                r.name if r.kind == "weight" else f"{r.name} [{r.kind}]",
                r.op,
                "x".join(map(str, r.output_shape)),
                f"{r.density:.4f}",
                _eng(r.dense_flops / self.batch),
                _eng(r.sparse_flops / self.batch),
                f"{r.params:,}" if r.params else "-",
                f"{r.active_params:,}" if r.params else "-",
            )
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
        numeric = {3, 4, 5, 6, 7}

        def line(cells: Iterable[str]) -> str:
            return "  ".join(
                str(c).rjust(w) if i in numeric else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        lines = [line(header), line("-" * w for w in widths)]
        lines += [line(row) for row in body]
        lines.append("")
        lines.append(
            f"inference FLOPs per sample: dense {_eng(self.dense_flops)}, sparse {_eng(self.sparse_flops)} "
            f"({self.inference_multiplier:.3f}x dense); of which activation products "
            f"{_eng(self.activation_flops)}, opaque leaves {_eng(self.opaque_flops)}"
        )
        lines.append(
            f"model size: {self.size_bytes / 1e6:.3f} MB sparse, {self.dense_size_bytes / 1e6:.3f} MB dense "
            f"({self.size_bytes / self.dense_size_bytes:.3f}x)"
        )
        lines.append(f"training FLOPs per sample and step (RigL delta_t={self.delta_t}):")
        for method in METHODS:
            if method == "pruning" and (self.pruning is None or self.total_steps is None):
                continue
            cost = self.training(method)
            run = f", per run {_eng(cost.per_run)}" if cost.per_run is not None else ""
            lines.append(f"  {method:8s} {_eng(cost.per_step)}  ({cost.multiplier:.3f}x dense training{run})")
        return "\n".join(lines)

    __repr__ = __str__


def _eng(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"


def training_cost(method: str, f_sparse: float, f_dense: float, *, delta_t: int = 100) -> float:
    """Training FLOPs of one step in the papers' convention (see the module docstring).

    Gradual pruning has no per-step formula (it depends on its schedule): see
    :meth:`FlopReport.training`.
    """
    if method == "dense":
        return 3 * f_dense
    if method in ("static", "set"):
        return 3 * f_sparse
    if method in ("rigl", "rigl-sg", "rigl-sm"):  # redistribution moves f_S a little; not modelled
        if delta_t < 1:
            raise ValueError(f"expected delta_t >= 1, got {delta_t}")
        return (3 * f_sparse * delta_t + 2 * f_sparse + f_dense) / (delta_t + 1)
    if method == "snfs":
        return 2 * f_sparse + f_dense
    raise ValueError(f"expected method to be one of {[m for m in METHODS if m != 'pruning']}, got {method!r}")


# ------------------------------------------------------------------------------ the graph walk
def flops(module: nn.Module, example_inputs: Any, *, per_sample: bool = True, mode: str = "eval") -> int:
    """Inference FLOPs of one forward pass: weight products at their density, plus dense
    activation products, plus opaque leaves (dense).

    Args:
        module: a plain ``nn.Module`` (counted dense) or a :class:`~fxsparse.SparseGraphModule`.
        example_inputs: a tensor or tuple the module is called with (fake copies are used).
        per_sample: divide by the batch size (the leading dim of the first tensor input), the
            papers' convention; False gives the whole batch's FLOPs.
        mode: the graph counted, ``"eval"`` (inference, the default) or ``"train"`` (a head
            computed only in training counts; dropout's mode does not change FLOPs), whatever
            mode ``module`` is in.

    Example:
        >>> import torch, fxsparse
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> fxsparse.flops(net, torch.randn(8, 32))  # 2 * (32*64 + 64*10)
        5376
    """
    report = flop_report(module, example_inputs, mode=mode)
    return round(report.sparse_flops * (1 if per_sample else report.batch))


def flop_report(
    module: nn.Module,
    example_inputs: Any,
    *,
    delta_t: int = 100,
    total_steps: int | None = None,
    end_fraction: float = 0.75,
    pruning: GradualPruning | None = None,
    mode: str = "eval",
) -> FlopReport:
    """Per-layer FLOPs, totals, model size and training FLOPs of ``module`` on ``example_inputs``.

    Args:
        module: a plain ``nn.Module`` or a :class:`~fxsparse.SparseGraphModule`.
        example_inputs: a tensor or tuple; only shapes and dtypes are used.
        delta_t: RigL's update interval for its training cost.
        total_steps: length of training, for per-run costs (and needed for pruning).
        end_fraction: RigL's last update as a fraction of training (per-run cost).
        pruning: the schedule whose cost ``report.training("pruning")`` gives; the final layer
            densities are the module's own.
        mode: the graph counted (see :func:`flops`): ``"eval"`` (default) or ``"train"``.

    Raises:
        TypeError: ``module`` is not a module or cannot be traced.
        ValueError: an unknown ``mode``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to count, got {type(module).__name__}")
    inputs = _as_inputs(example_inputs)
    batch = _batch_size(inputs)
    rows = _count(module, inputs, _training(mode))
    size, dense_size = _model_size(module)
    report = FlopReport(
        rows, batch, size, dense_size, delta_t=delta_t, total_steps=total_steps,
        end_fraction=end_fraction, pruning=pruning,
    )
    return report


def layer_flops(module: nn.Module, example_inputs: Any, *, mode: str = "eval") -> dict[str, int]:
    """Dense FLOPs per sample of every graph-visible weight, by canonical FQN (uses summed)."""
    inputs = _as_inputs(example_inputs)
    batch = _batch_size(inputs)
    return {r.name: r.dense_flops // batch for r in _count(module, inputs, _training(mode)) if r.kind == "weight"}


def _training(mode: str) -> bool:
    if mode not in ("eval", "train"):
        raise ValueError(f"expected mode='eval' (inference FLOPs) or 'train', got {mode!r}")
    return mode == "train"


def _graph_of(module: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], training: bool) -> torch.fx.GraphModule:
    """The graph module of ``module`` in the given mode, without changing what ``module``
    computes: a graph module's own graph, or that of its mode where it holds one per mode (a
    SparseGraphModule whose graphs differ between modes), else a capture in that mode. An
    exported SparseGraphModule first takes the graphs of ``example``'s call signature
    (:func:`fxsparse.recapture.follow_signature`: a training loop may have left it on another)."""
    if not isinstance(module, torch.fx.GraphModule):
        return capture(module, example, "auto", modes=(training,)).train
    state = getattr(module, "_fxsparse", None)
    if state is not None and state.capture == "export":
        follow_signature(module, *example)
    graphs = getattr(state, "mode_graphs", None)
    if not graphs or graphs[training] is module.graph:
        return module
    view = torch.fx.GraphModule(module, graphs[training], class_name=type(module).__name__)
    for name, spec in pytree_specs(module).items():
        setattr(view, name, spec)
    return view


def _as_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)``: :func:`fxsparse.capture.split_inputs`, or already such a pair."""
    split = split_inputs(example_inputs)
    assert split is not None, "example_inputs must not be None"
    return split


def _batch_size(inputs: Any) -> int:
    """The leading dim of the first tensor input (``inputs`` as ``sparsify`` takes them)."""
    args, kwargs = _as_inputs(inputs)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() > 0 and value.shape[0] > 0 else 1
    return 1


def _model_size(module: nn.Module) -> tuple[int, int]:
    masks = _masks_of(module)
    size = dense = 0
    # weights held outside their owner (a compact layer's values): counted as the weight they hold
    layouts = {fqn: layout_of(module, fqn) for fqn in masks} if _is_sparse(module) else {}
    outside = {fqn: layout.trainable(module, fqn) for fqn, layout in layouts.items() if not layout.keeps_parameter}
    held = {id(values) for values in outside.values()}
    for name, param in module.named_parameters():
        if id(param) in held:
            continue  # counted below as the weight it holds
        nbytes = param.numel() * param.element_size()
        dense += nbytes
        mask = masks.get(name)
        if mask is None:
            size += nbytes
        else:
            size += int(mask.sum()) * param.element_size() + math.ceil(param.numel() / 8)
    for fqn, values in outside.items():  # the papers' convention whatever the layout: active values and a bit mask
        numel, element = masks[fqn].numel(), values.element_size()
        dense += numel * element
        size += values.numel() * element + math.ceil(numel / 8)
    return size, dense


def _is_sparse(module: nn.Module) -> bool:
    """True for a SparseGraphModule (told by its masker: this module does not import the class,
    which imports it for ``summary()``)."""
    return isinstance(module, torch.fx.GraphModule) and isinstance(getattr(module, MASKER, None), Masker)


def _masks_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.masks) if _is_sparse(module) else {}


def _count(module: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], training: bool = False) -> list[FlopRow]:
    names = canonical_names(module)
    gm = _graph_of(module, example, training)
    inputs = graph_inputs(gm, *example)
    masker = MASKER if _is_sparse(module) else None
    masks = _masks_of(module)
    try:
        counter = _Counter(gm, names, masker, fake=True)
        counter.propagate(*inputs)
    except _FAKE_LIMITS:  # data-dependent shapes and the like: count a copy for real
        real = copy.deepcopy(gm)
        counter = _Counter(real, canonical_names(real), masker, fake=False)
        with torch.no_grad():
            counter.propagate(*inputs)
    rows = []
    for row in counter.rows:
        if row.kind == "weight":
            mask = masks.get(row.name)
            total = mask.numel() if mask is not None else gm.get_parameter(row.name).numel()
            active = int(mask.sum()) if mask is not None else total
            row = FlopRow(row.name, row.op, "weight", row.output_shape, active / total, row.dense_flops, total, active)
        rows.append(row)
    return rows


def _fake_limits() -> tuple[type[BaseException], ...]:
    from torch._subclasses import fake_tensor

    names = ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedFakeTensorException",
             "UnsupportedOperatorException")
    found = [getattr(fake_tensor, n) for n in names if hasattr(fake_tensor, n)]
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        found.append(GuardOnDataDependentSymNode)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(found)


_FAKE_LIMITS = _fake_limits()


class _Counter(Runner):
    """Runs the graph (on fake tensors) and counts the products of every node."""

    def __init__(self, gm: torch.fx.GraphModule, names: Mapping[str, str], masker: str | None, fake: bool) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.names = dict(names)
        self.masker = masker
        self.fake = fake
        self.by_weight: dict[str, FlopRow] = {}
        self.others: list[FlopRow] = []
        self.order: list[tuple[str, str]] = []  # (kind, key) in order of first appearance

    @property
    def rows(self) -> list[FlopRow]:
        return [self.by_weight[key] if kind == "weight" else self.others[int(key)] for kind, key in self.order]

    def propagate(self, *inputs: Any) -> None:
        if not self.fake:
            self.run(*inputs)
            return
        from torch._subclasses.fake_tensor import FakeTensorMode

        from torch.nn.utils.stateless import _reparametrize_module

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
        # every parameter and buffer swapped for a fake twin while the graph runs, so that
        # nothing (BatchNorm's running statistics, say) writes to the real ones
        state = {
            name: mode.from_tensor(t)
            for name, t in [*self.module.named_parameters(remove_duplicate=False),
                            *self.module.named_buffers(remove_duplicate=False)]
        }
        with _reparametrize_module(self.module, state, tie_weights=True), mode:
            self.run(*fake_inputs)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_function" and getattr(n.target, "__name__", "") in ("mask_prologue", "zero_dirty"):
            return None  # the masked module's prologue: bookkeeping on real weights, no compute
        if n.op == "call_module" and self.masker is not None and n.target == self.masker:
            args, _ = self.fetch_args_kwargs_from_env(n)
            return args[0]  # the masked-weight node hands the (zero-holding) weight through
        layout = layout_of_call(n)
        if layout is not None:
            return self._held(n, layout)
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
            result = super().run_node(n)
        count = int(counter.get_total_flops())
        if n.op == "call_function" and (
            n.target is F.scaled_dot_product_attention or n.target is torch.ops.aten.scaled_dot_product_attention.default
        ):
            count = _attention_flops(*self.fetch_args_kwargs_from_env(n)[0][:3])
        if count:
            self._record(n, count, result)
        return result

    def _held(self, n: torch.fx.Node, layout: Any) -> Any:
        """A product by a weight its layout holds (a compact layer's), counted as the masked
        layer's: the dense op it computes, on a zero stand-in of its dense weight (the density
        column then says how much of it is active)."""
        args, _ = self.fetch_args_kwargs_from_env(n)
        x, storage, bias = layout.call_operands(args)
        fqn, (product, options) = layout.dense_call(storage)
        shape, dtype = layout.stored_spec(storage)
        stand_in = x.new_zeros(shape, dtype=dtype)
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
            result = product(x.to(stand_in.dtype), stand_in, bias, **options)
        self._record(n, int(counter.get_total_flops()), result, weight=fqn, op=getattr(product, "__name__", None))
        return result

    def _record(self, n: torch.fx.Node, count: int, result: Any, weight: str | None = None, op: str | None = None) -> None:
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else ()
        weight = weight or self._weight_of(n)
        if weight is not None:
            op = op or _op_name(self.module, n)
            if weight in self.by_weight:
                old = self.by_weight[weight]
                self.by_weight[weight] = FlopRow(
                    weight, old.op, "weight", old.output_shape, 1.0, old.dense_flops + count, 0, 0
                )
            else:
                self.by_weight[weight] = FlopRow(weight, op, "weight", shape, 1.0, count, 0, 0)
                self.order.append(("weight", weight))
            return
        kind = "opaque" if n.op == "call_module" else "activation"
        self.others.append(FlopRow(n.name, _op_name(self.module, n), kind, shape, 1.0, count, 0, 0))
        self.order.append((kind, str(len(self.others) - 1)))

    def _weight_of(self, n: torch.fx.Node) -> str | None:
        if n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            if isinstance(module, REWRITABLE_MODULES) and is_rewritable(module):
                return self.names.get(f"{n.target}.weight")
            return None
        for operand in _weight_operands(n):
            fqn = self._param_through_views(operand)
            if fqn is not None:
                return fqn
        return None

    def _param_through_views(self, node: Any) -> str | None:
        """The weight ``node`` reads, through views: a parameter's canonical FQN, or the name
        a SparseGraphModule's masked-weight node carries; None for an activation."""
        while isinstance(node, torch.fx.Node):
            if node.op == "call_module" and self.masker is not None and node.target == self.masker:
                return str(node.kwargs.get("name"))
            if node.op == "get_attr":
                return self.names.get(str(node.target))
            node = view_source(node)
        return None


def _attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """``q @ k^T`` and ``attn @ v`` of scaled dot-product attention (the CPU kernel has no
    formula in FlopCounterMode): ``2 L S E + 2 L S E_v`` per batch and head."""
    *batch, length, embed = query.shape
    source, embed_v = key.shape[-2], value.shape[-1]
    return 2 * math.prod(batch) * length * source * (embed + embed_v)


def _op_name(gm: torch.fx.GraphModule, n: torch.fx.Node) -> str:
    if n.op == "call_module":
        module = gm.get_submodule(str(n.target))
        name = type(module).__name__
        rewritable = isinstance(module, REWRITABLE_MODULES) and is_rewritable(module)
        return name.lower() if rewritable else f"leaf:{name}"
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target))
