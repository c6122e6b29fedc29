"""SparseGraphModule: a GraphModule whose sparsified weights are read through their masks.

State that must survive a copy or a save is a registered buffer: each mask is a persistent bool
buffer beside its weight (``layer1.0.conv1.weight`` -> ``layer1.0.conv1.weight_mask``) and the
number of topology updates so far is the buffer ``fxsparse_updates``, so ``state_dict()``
restores the exact topology and random growth continues where it stopped.
"""

from __future__ import annotations

import dataclasses

import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from fxsparse import budgets, topology
from fxsparse.accounting import _batch_size, flop_report
from fxsparse.capture import graph_from_state, graph_state, pytree_specs
from fxsparse.masking import MASKER, Masker, zero_inactive_

__all__ = ["SparseGraphModule", "LayerChange", "SparsitySummary", "register_grow_score", "grow_scores",
           "grow_score_needs_gradient", "StateDictError", "finite"]

UPDATES = "fxsparse_updates"
_PRESERVED = "_user_preserved_attributes"  # GraphModule.__deepcopy__ restores these attributes


@dataclass
class _Site:
    """What is known about one sparsified weight besides its tensors."""

    mask: str  # qualified name of the mask buffer
    shape: tuple[int, ...]
    target_density: float
    active: int  # the layer's exact active count, kept by every topology update
    opaque: bool = False  # used inside an opaque leaf module (the module-level fallback)


@dataclass
class _State:
    sites: dict[str, _Site] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seed: int = 0
    init: str = "erk"
    input_spec: Any = None  # shapes/dtypes of sparsify's example_inputs (api._input_spec)
    capture: str = "symbolic"  # the front-end that made the graph (fxsparse.capture)
    # export: the masked graph of each mode (True: train); the module runs its mode's graph
    mode_graphs: dict[bool, torch.fx.Graph] | None = None


@dataclass(frozen=True)
class LayerChange:
    """What one topology update did to one layer.

    Attributes:
        active: active weights after the update: the same as before, unless the update
            redistributed counts between layers (SNFS, RigL-SG/SM).
        dropped: connections removed (``floor(drop_fraction * active)`` minus those regrown).
        grown: new connections, started at zero with zeroed optimizer state.
        regrown: connections dropped and grown back in the same update (they keep their value).
    """

    active: int
    dropped: int
    grown: int
    regrown: int


GrowScore = Callable[["SparseGraphModule", str, torch.Tensor, torch.Tensor, "torch.Tensor | None", int], torch.Tensor]
_GROW_SCORES: dict[str, tuple[GrowScore, bool, bool]] = {}


def register_grow_score(
    name: str, *, needs_gradient: bool, threadsafe: bool = False
) -> Callable[[GrowScore], GrowScore]:
    """Registers a growth criterion for ``rigl_step(grow=name)``.

    The function gets ``(module, fqn, weight, mask, dense_grad, update_index)`` and returns a
    tensor of the weight's shape that the update may overwrite (a new one, or ``dense_grad``'s
    own storage: rigl_step consumes the captured gradients); the largest-scored inactive
    positions are grown. RigL is SET
    with one override, the score (as in jaxpruner). With ``threadsafe=True`` (the function
    reads only its arguments) the layers of an update on CPU are scored and selected on
    several threads at once.
    """

    def decorator(fn: GrowScore) -> GrowScore:
        if name in _GROW_SCORES:
            raise ValueError(f"grow score {name!r} is already registered")
        _GROW_SCORES[name] = (fn, needs_gradient, threadsafe)
        return fn

    return decorator


def grow_scores() -> list[str]:
    """Names accepted by ``rigl_step(grow=...)``."""
    return sorted(_GROW_SCORES)


def grow_score_needs_gradient(name: str) -> bool:
    """Whether the growth score ``name`` reads the dense gradient (so capture must be armed)."""
    if name not in _GROW_SCORES:
        raise ValueError(f"expected a growth score among {grow_scores()}, got {name!r}")
    return _GROW_SCORES[name][1]


@register_grow_score("gradient", needs_gradient=True, threadsafe=True)
def _gradient_score(
    module: SparseGraphModule, fqn: str, weight: torch.Tensor, mask: torch.Tensor,
    grad: torch.Tensor | None, update: int,
) -> torch.Tensor:
    assert grad is not None
    return grad.abs_()  # rigl_step consumes the captured gradient: its storage is free to reuse


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from ``parts`` (no Python hash randomisation)."""
    data = repr(parts).encode()
    return (zlib.crc32(data) | zlib.adler32(data) << 32) & (2**63 - 1)


@register_grow_score("random", needs_gradient=False, threadsafe=True)
def _random_score(
    module: SparseGraphModule, fqn: str, weight: torch.Tensor, mask: torch.Tensor,
    grad: torch.Tensor | None, update: int,
) -> torch.Tensor:
    # Seeded by (seed, update index, layer): identical on every rank and after a resume.
    generator = torch.Generator().manual_seed(derived_seed(module._fxsparse.seed, update, fqn))
    return torch.rand(mask.shape, generator=generator).to(mask.device)


class SparsitySummary:
    """Per-layer table of a SparseGraphModule: name, shape, density, active/total, and the
    dense and sparse inference FLOPs per sample when the input shape is known."""

    def __init__(self, rows: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> None:
        self.rows = rows
        self.skipped = skipped

    @property
    def active(self) -> int:
        return sum(row["active"] for row in self.rows)

    @property
    def total(self) -> int:
        return sum(row["total"] for row in self.rows)

    @property
    def has_flops(self) -> bool:
        return bool(self.rows) and all("dense_flops" in row for row in self.rows)

    def __str__(self) -> str:
        header = ["layer", "shape", "density", "active", "total"]
        body = [
            [r["name"], "x".join(map(str, r["shape"])), f"{r['density']:.4f}", str(r["active"]), str(r["total"])]
            for r in self.rows
        ]
        density = self.active / self.total if self.total else float("nan")
        totals = ["total", "", f"{density:.4f}", str(self.active), str(self.total)]
        if self.has_flops:
            header += ["dense FLOPs", "sparse FLOPs"]
            for row, r in zip(body, self.rows):
                row += [f"{r['dense_flops']:.4g}", f"{r['sparse_flops']:.4g}"]
            totals += [
                f"{sum(r['dense_flops'] for r in self.rows):.4g}",
                f"{sum(r['sparse_flops'] for r in self.rows):.4g}",
            ]
        body.append(totals)
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [header, *body]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
        if self.skipped:
            lines.append(f"left dense ({len(self.skipped)}):")
            lines.extend(f"  {name}: {reason}" for name, reason in self.skipped)
        return "\n".join(lines)

    __repr__ = __str__


class SparseGraphModule(torch.fx.GraphModule):
    """A traced model whose conv/linear/matmul weights are masked, with RigL topology updates.

    Made by :func:`fxsparse.sparsify`; see its docstring for an example. Every parameter keeps
    its original FQN; the masks are persistent bool buffers named ``<weight fqn>_mask``.
    """

    _fxsparse: _State

    def _set_state(self, state: _State) -> None:
        self._fxsparse = state
        # GraphModule.__deepcopy__ re-creates the module from its graph and then restores the
        # attributes named here, so the python-side state survives deepcopy; an exported graph's
        # code reads the pytree specs of its inputs and outputs.
        preserved = self.meta.setdefault(_PRESERVED, {})
        preserved["_fxsparse"] = state
        preserved.update(pytree_specs(self))

    def train(self, mode: bool = True) -> SparseGraphModule:
        """Sets the mode as ``nn.Module.train`` does; a module captured by torch.export (which
        bakes the mode into its graph) also switches to the graph captured in that mode."""
        super().train(mode)
        graphs = getattr(self, "_fxsparse", None) and self._fxsparse.mode_graphs
        if graphs and self.graph is not graphs[bool(mode)]:
            self.graph = graphs[bool(mode)]  # recompiles: only when the mode changes
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> SparseGraphModule:
        # .to(device) / .cuda() / .cpu(): an exported graph names the device it was captured on
        # (arange(..., device=cpu) and the like): follow the parameters to their new device
        result = super()._apply(fn, recurse)
        state = getattr(self, "_fxsparse", None)
        if state is not None and state.mode_graphs:
            self._follow_device()
        return result

    def _follow_device(self) -> None:
        device = next((p.device for p in self.parameters()), None)
        if device is None:
            return
        changed = False
        for graph in self._fxsparse.mode_graphs.values():  # type: ignore[union-attr]
            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                args = tuple(device if isinstance(a, torch.device) and a != device else a for a in node.args)
                kwargs = {k: device if isinstance(v, torch.device) and v != device else v for k, v in node.kwargs.items()}
                if args != node.args or kwargs != node.kwargs:
                    node.args, node.kwargs = args, kwargs
                    changed = True
        if changed:
            self.recompile()

    @property
    def capture(self) -> str:
        """How the model became a graph: ``"symbolic"`` (torch.fx tracing) or ``"export"``."""
        return self._fxsparse.capture

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles its code and re-traces it as a plain GraphModule; rebuild ours.
        state = getattr(self, "_fxsparse", None)
        if state is not None and state.mode_graphs:
            # an exported graph's code cannot be re-traced (pytree specs, ATen ops): pickle the
            # module's tables and each mode's graph as data (fxsparse.capture.graph_state)
            graphs = {mode: graph_state(graph) for mode, graph in state.mode_graphs.items()}
            tables = (dict(self._modules), dict(self._parameters), dict(self._buffers), set(self._non_persistent_buffers_set))
            specs = pytree_specs(self)
            return (_unpickle_exported, (tables, graphs, dataclasses.replace(state, mode_graphs=None), self.training,
                                         specs, type(self).__name__))
        _, (body, import_block) = super().__reduce__()
        return (_unpickle, (body, import_block))

    # ----------------------------------------------------------------------------------- views
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The live mask buffers, by weight FQN of the original model."""
        return {fqn: self.get_buffer(site.mask) for fqn, site in self._fxsparse.sites.items()}

    def _weights_and_masks(self) -> Iterator[tuple[str, tuple[nn.Parameter, torch.Tensor]]]:
        for fqn, site in self._fxsparse.sites.items():
            yield fqn, (self._leaf_weight(fqn), self.get_buffer(site.mask))

    def _leaf_weight(self, fqn: str) -> nn.Parameter:
        """The parameter the mask of ``fqn`` applies to: ``get_parameter(fqn)``, or, where
        ``torch.nn.utils.parametrize`` computes that weight, the parametrization's ``original``
        (the forward masks what the parametrization computes)."""
        owner_name, _, name = fqn.rpartition(".")
        owner = self.get_submodule(owner_name)
        if parametrize.is_parametrized(owner, name):
            return owner.parametrizations[name].original
        return self.get_parameter(fqn)

    @property
    def sparse_weights(self) -> dict[str, nn.Parameter]:
        """The sparsified parameters, by FQN."""
        return {fqn: self._leaf_weight(fqn) for fqn in self._fxsparse.sites}

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(fqn, reason)`` of the conv/linear/matmul weights left dense, with why."""
        return list(self._fxsparse.skipped)

    @property
    def density(self) -> float:
        """Active over total weights of the sparsified layers."""
        active = total = 0
        for mask in self.masks.values():
            active += int(mask.sum())
            total += mask.numel()
        return active / total

    @property
    def growth_capture(self) -> Masker:
        """The module that captures dense growth gradients (``.armed``, ``.accumulate``)."""
        return self.get_submodule(MASKER)  # type: ignore[return-value]

    def arm_growth(self, enabled: bool = True, *, accumulate: bool = False) -> None:
        """Turns the capture of ``dL/d(w*m)`` on or off for the following forward passes.

        A freshly sparsified module is armed, so ``loss.backward(); sparse.rigl_step(0.3)`` works
        as is; :class:`fxsparse.RigLScheduler` disarms it and arms only the update steps, so that
        no dense gradient is kept on other steps. Arming forgets what was captured before.
        """
        capture = self.growth_capture
        capture.clear()
        capture.armed = bool(enabled)
        capture.accumulate = bool(accumulate)

    def summary(self) -> SparsitySummary:
        """A per-layer table (name, shape, density, active/total; dense and sparse inference
        FLOPs per sample when ``sparsify`` was given ``example_inputs``); ``print`` it."""
        per_layer = {}
        inputs = self.example_inputs()
        if inputs is not None:
            batch = _batch_size(inputs)
            per_layer = {r.name: r for r in flop_report(self, inputs).rows if r.kind == "weight"}
        rows = []
        for fqn, mask in self.masks.items():
            active = int(mask.sum())
            row = {"name": fqn, "shape": tuple(mask.shape), "density": active / mask.numel(),
                   "active": active, "total": mask.numel()}
            if inputs is not None:
                found = per_layer.get(fqn)
                row["dense_flops"] = found.dense_flops / batch if found else 0.0
                row["sparse_flops"] = found.sparse_flops / batch if found else 0.0
            rows.append(row)
        return SparsitySummary(rows, self.skipped)

    def example_inputs(self) -> Any:
        """Inputs of the shapes and dtypes ``sparsify`` was given (zeros), or None: a tuple of
        positional inputs, or ``(args, kwargs)`` when it was given keyword inputs."""
        spec = self._fxsparse.input_spec
        if spec is None:
            return None
        device = next((p.device for p in self.parameters()), torch.device("cpu"))

        def make(item: tuple[Any, ...]) -> Any:
            return torch.zeros(item[1], dtype=item[2], device=device) if item[0] == "tensor" else item[1]

        if len(spec) == 2 and isinstance(spec[1], dict):
            return tuple(make(i) for i in spec[0]), {k: make(i) for k, i in spec[1].items()}
        return tuple(make(item) for item in spec)

    def named_masks(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.masks.items()

    # ------------------------------------------------------------------------------ invariants
    def verify(self) -> None:
        """Checks the invariants that hold between updates; raises RuntimeError if one fails.

        Every mask is a bool tensor of its weight's shape with exactly the layer's active count,
        and every inactive weight is exactly zero.
        """
        problems = []
        for fqn, site in self._fxsparse.sites.items():
            weight, mask = self._leaf_weight(fqn), self.get_buffer(site.mask)
            if mask.dtype != torch.bool or mask.shape != weight.shape:
                problems.append(f"{fqn}: mask {mask.dtype} {tuple(mask.shape)} vs weight {tuple(weight.shape)}")
                continue
            active = int(mask.sum())
            if active != site.active:
                problems.append(f"{fqn}: {active} active weights, budget {site.active}")
            owner, _, name = fqn.rpartition(".")
            if site.opaque and parametrize.is_parametrized(self.get_submodule(owner), name):
                with torch.no_grad():
                    computed = getattr(self.get_submodule(owner), name)
                if bool(computed[~mask].ne(0).any()):
                    problems.append(
                        f"{fqn}: a parametrization computes this weight, which an opaque leaf module "
                        f"reads itself, so its inactive entries reach the output; remove the "
                        f"parametrization or register the leaf's code for tracing"
                    )
            if bool(weight.detach()[~mask].ne(0).any()):
                problems.append(
                    f"{fqn}: inactive weights are not zero (edited since the last forward, which "
                    f"would zero them before use; sparse.rezero() zeroes them now)"
                )
        if problems:
            raise RuntimeError("fxsparse invariant violated:\n  " + "\n  ".join(problems))

    @torch.no_grad()
    def rezero(self) -> None:
        """Sets every inactive weight to exactly zero now.

        Never needed for correctness: every forward does it first, whatever edited the weights
        (``.data`` included), so inactive weights cannot reach an output or a gradient. Use it
        before reading the parameters outside a forward after such an edit (``state_dict()``
        calls it itself) and :meth:`verify` then passes.
        """
        capture = self.growth_capture
        for fqn, (weight, mask) in self._weights_and_masks():
            zero_inactive_(weight, capture.bit_mask(fqn, mask, weight))

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.rezero()  # a checkpoint holds exact zeros at inactive entries, whatever edited them
        return super().state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False, *, budget: str = "keep",
    ) -> Any:
        """``nn.Module.load_state_dict``, checked first: nothing changes unless all of it loads.

        Each mask must be of its weight's shape, bool (or 0/1 values, converted), and with
        ``budget="keep"`` (the default) the masks must hold this module's parameter budget:
        the same total active count (drop-and-grow methods keep it; SNFS and RigL-SG/SM move
        weights between layers), and layers budgeted dense stay dense. ``budget="adopt"`` takes
        the checkpoint's topology, whatever its counts (resuming gradual pruning on
        ``sparsify(model, 1.0)``, another density's checkpoint).

        Raises:
            StateDictError (a ValueError and a RuntimeError): the keys and what is wrong with
                each; the module is unchanged.
        """
        if budget not in ("keep", "adopt"):
            raise ValueError(f"expected budget='keep' or 'adopt', got {budget!r}")
        if strict:
            own = super().state_dict(keep_vars=True)
            problems = [f"{k}: missing from the state_dict" for k in own if k not in state_dict]
            problems += [f"{k}: not a key of this module" for k in state_dict if k not in own]
            if problems:
                raise StateDictError(_state_dict_message(problems))
        self._load_budget = budget
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._load_budget = "keep"
        self.rezero()  # weights the loaded masks made inactive
        return result

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # Runs before any of this module's own tensors or submodules are loaded (also when a
        # parent module loads), so a bad mask leaves the module untouched.
        budget = getattr(self, "_load_budget", "keep")
        counts = self._check_masks(state_dict, prefix, budget)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for fqn, count in counts.items():  # the loaded topology
            site = self._fxsparse.sites[fqn]
            if budget == "adopt" and count != site.active:  # the checkpoint's budget is the layer's now
                site.target_density = count / math.prod(site.shape)
            site.active = count

    def _check_masks(self, state_dict: dict[str, Any], prefix: str, budget: str) -> dict[str, int]:
        """The active count of every mask in ``state_dict``; converts 0/1 masks to bool in it
        (torch's own copy of the caller's dict). Raises StateDictError on a bad mask."""
        problems, counts, over_budget = [], {}, False
        sites = self._fxsparse.sites
        mask_keys = {site.mask for site in sites.values()}
        for key, mine in nn.Module.state_dict(self, keep_vars=True).items():  # torch would load the rest
            value = None if key in mask_keys else state_dict.get(prefix + key)
            if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape != mine.shape:
                problems.append(f"{prefix + key}: shape {tuple(value.shape)}, this module's is {tuple(mine.shape)}")
        for fqn, site in sites.items():
            key = prefix + site.mask
            if key not in state_dict:
                continue
            value, shape = state_dict[key], site.shape
            if not isinstance(value, torch.Tensor):
                problems.append(f"{key}: expected a bool tensor, got {type(value).__name__}")
            elif tuple(value.shape) != tuple(shape):
                problems.append(f"{key}: shape {tuple(value.shape)}, but the weight {fqn} is {tuple(shape)}")
            elif value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
                problems.append(f"{key}: expected a bool mask (or 0/1 values), got {value.dtype} with other values")
            else:
                state_dict[key] = value.to(torch.bool)
                counts[fqn] = int(state_dict[key].count_nonzero())
                if budget == "keep" and site.target_density >= 1.0 and counts[fqn] != math.prod(shape):
                    over_budget = True
                    problems.append(
                        f"{key}: {counts[fqn]} of {math.prod(shape)} active, but this layer is budgeted dense"
                    )
        if budget == "keep" and not problems and counts:
            have = sum(site.active for site in sites.values())
            loaded = sum(counts.get(fqn, site.active) for fqn, site in sites.items())
            if loaded != have:
                over_budget = True
                differ = [prefix + sites[f].mask for f, c in counts.items() if c != sites[f].active]
                problems.append(
                    f"the masks hold {loaded} active weights, this module's budget is {have} "
                    f"(density {have / sum(math.prod(s.shape) for s in sites.values()):.4f}); masks whose "
                    f"count differs: {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}"
                )
        if over_budget:
            problems.append(
                "to take the checkpoint's topology as it is (resuming gradual pruning on sparsify(model, "
                "1.0), another density's masks), pass load_state_dict(..., budget='adopt')"
            )
        if problems:
            raise StateDictError(_state_dict_message(problems))
        return counts

    # -------------------------------------------------------------------------------- updates
    @torch.no_grad()
    def rigl_step(
        self,
        drop_fraction: float,
        optimizer: torch.optim.Optimizer | None = None,
        grow: str = "gradient",
        *,
        grow_from: Mapping[str, torch.Tensor] | None = None,
        redistribute: str | None = None,
    ) -> dict[str, LayerChange]:
        """One topology update of every sparse layer (Evci et al. 2020, section 3).

        Per layer with ``n`` active weights: drop the ``k = floor(drop_fraction * n)`` active
        weights of smallest ``|w|``, then grow the ``k`` inactive ones of largest ``|dL/d(w*m)|``
        (``grow="gradient"``, RigL) or at random (``grow="random"``, SET). New connections start
        at 0 and their optimizer state (momentum, Adam moments: every state tensor of the
        weight's shape) is zeroed; dropped weights and their state are zeroed. Active counts do
        not change. Call it after ``loss.backward()`` of a step run while armed (see
        :meth:`arm_growth`); the captured gradients are consumed.

        Args:
            drop_fraction: fraction of each layer's active weights replaced, in [0, 1].
            optimizer: the optimizer training this module, whose state is zeroed where the
                topology changed.
            grow: a registered growth criterion (:func:`grow_scores`).
            grow_from: tensors of the weights' shapes to score growth by instead of the
                captured gradients (SNFS passes its dense momentum); consumed like them.
            redistribute: ``None`` (each layer regrows what it dropped, RigL), ``"score"``
                (the network's regrowth goes to layers in proportion to the mean growth tensor
                magnitude over their active weights: RigL-SG with gradients, SNFS with dense
                momentum) or ``"momentum"`` (in proportion to the mean magnitude of the
                optimizer's momentum over active weights: RigL-SM). The total active count is
                constant; layer counts move (:func:`fxsparse.budgets.redistribute`). Layers
                budgeted dense stay dense.

        Returns:
            ``{fqn: LayerChange}`` for every sparse layer.

        Raises:
            ValueError: bad ``drop_fraction`` or ``grow``, or no gradient captured for growth.
            FloatingPointError: a layer's active weights or growth tensor hold NaN or inf (a
                NaN loss, an fp16 overflow); raised before any mask changes, naming the layers.

        Example:
            >>> loss = model(x).sum(); loss.backward()          # doctest: +SKIP
            >>> changes = model.rigl_step(0.3, optimizer=opt)   # doctest: +SKIP
        """
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not (
            math.isfinite(drop_fraction) and 0.0 <= drop_fraction <= 1.0
        ):
            raise ValueError(f"expected drop_fraction in [0, 1], got {drop_fraction!r}; RigL uses 0.3 (cosine-annealed)")
        if grow not in _GROW_SCORES:
            raise ValueError(f"expected grow to be one of {grow_scores()}, got {grow!r}")
        score_fn, needs_gradient, threadsafe = _GROW_SCORES[grow]
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer (or None), got {type(optimizer).__name__}")
        if redistribute not in (None, "score", "momentum"):
            raise ValueError(f"expected redistribute to be None, 'score' or 'momentum', got {redistribute!r}")
        if redistribute == "score" and not needs_gradient and grow_from is None:
            raise ValueError(f"redistribute='score' needs a growth tensor; grow={grow!r} scores without one")
        if redistribute == "momentum" and optimizer is None:
            raise ValueError("redistribute='momentum' reads the optimizer's momentum: pass optimizer=")
        capture = self.growth_capture
        grads = capture.grads if grow_from is None else dict(grow_from)
        if needs_gradient or grow_from is not None:
            missing = [fqn for fqn in self._fxsparse.sites if fqn not in grads]
            if missing and grow_from is None and len(missing) < len(self._fxsparse.sites):
                # a backward reached the other layers: these ones' outputs do not reach the loss
                # (a pooler computed and dropped, a head the loss does not use), so their dense
                # gradient is exactly zero
                for fqn in missing:
                    weight = self._leaf_weight(fqn)
                    grads[fqn] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
                missing = []
            if missing:
                raise ValueError(
                    f"expected a dense growth gradient from a preceding backward, but none was "
                    f"captured for {len(missing)} layer(s) (first: {missing[0]!r}). Fix: run "
                    f"loss.backward() on this module before rigl_step, with capture armed "
                    f"(sparse.arm_growth() before the forward; fxsparse.RigLScheduler does this "
                    f"for you), or use grow='random' (SET), which needs no gradient."
                )
            _all_reduce_mean([grads[fqn] for fqn in self._fxsparse.sites])
        _refuse_nonfinite(self, list(self._fxsparse.sites), grads if (needs_gradient or grow_from is not None) else {}, "rigl_step")

        sites = self._fxsparse.sites
        if redistribute is None:
            updated = [fqn for fqn, site in sites.items() if site.active < math.prod(site.shape)]
            grow_counts: dict[str, int | None] = dict.fromkeys(updated)
        else:
            updated = [fqn for fqn, site in sites.items() if site.target_density < 1.0]
            grow_counts = dict(self._redistribution(updated, drop_fraction, redistribute, grads, optimizer))

        update_index = int(self.get_buffer(UPDATES))

        @torch.no_grad()  # grad mode is per thread
        def select(fqn: str) -> topology.TopologyUpdate:  # reads only: every layer, then apply
            weight, mask = self._leaf_weight(fqn), self.get_buffer(sites[fqn].mask)
            score = score_fn(self, fqn, weight, mask, grads.get(fqn), update_index)
            # a registered score is the update's to overwrite (see register_grow_score)
            return topology.update_mask(
                mask, weight, score, drop_fraction, scratch=True, absolute=True, grow_count=grow_counts[fqn]
            )

        todo = [fqn for fqn in sites if fqn in grow_counts]
        results = dict(zip(todo, topology.map_layers(
            select, todo, [math.prod(sites[fqn].shape) for fqn in todo], parallel=threadsafe and self._on_cpu(todo),
        )))
        changes = {}
        for fqn, site in sites.items():
            result = results.get(fqn)
            if result is None:
                changes[fqn] = LayerChange(site.active, 0, 0, 0)
                continue
            weight, mask = self._leaf_weight(fqn), self.get_buffer(site.mask)
            topology.apply_update(weight, mask, result, _optimizer_state(optimizer, weight))
            site.active += result.grown_idx.numel() - result.dropped_idx.numel()
            changes[fqn] = LayerChange(
                site.active, result.dropped_idx.numel(), result.grown_idx.numel(), result.regrown
            )
        self.get_buffer(UPDATES).add_(1)
        capture.clear()
        return changes

    @torch.no_grad()
    def prune(
        self, counts: Mapping[str, int], optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, LayerChange]:
        """Removes the smallest-magnitude active weights of each named layer until ``counts[fqn]``
        remain (magnitude pruning; masks only shrink). Removed weights, their gradient and their
        optimizer state are zeroed. Layers not named are unchanged.

        Raises:
            ValueError: an unknown layer, or a count above the layer's active count.
        """
        sites = self._fxsparse.sites
        unknown = [fqn for fqn in counts if fqn not in sites]
        if unknown:
            raise ValueError(f"expected sparse weight FQNs, got unknown {unknown}; valid: {list(sites)}")
        _refuse_nonfinite(self, [f for f in counts if f in sites], {}, "prune")
        todo = [fqn for fqn, site in sites.items() if fqn in counts and counts[fqn] != site.active]

        @torch.no_grad()  # grad mode is per thread
        def select(fqn: str) -> topology.TopologyUpdate:
            return topology.prune_mask(self.get_buffer(sites[fqn].mask), self._leaf_weight(fqn).detach(), counts[fqn])

        results = dict(zip(todo, topology.map_layers(
            select, todo, [math.prod(sites[fqn].shape) for fqn in todo], parallel=self._on_cpu(todo)
        )))
        changes = {}
        for fqn, site in sites.items():
            result = results.get(fqn)
            if result is None:
                changes[fqn] = LayerChange(site.active, 0, 0, 0)
                continue
            weight, mask = self._leaf_weight(fqn), self.get_buffer(site.mask)
            topology.apply_update(weight, mask, result, _optimizer_state(optimizer, weight))
            if weight.grad is not None:
                topology.zero_state_at([weight.grad], result.dropped_idx)
            site.active = counts[fqn]
            site.target_density = site.active / math.prod(site.shape)  # what it is budgeted now
            changes[fqn] = LayerChange(site.active, result.dropped_idx.numel(), 0, 0)
        return changes

    def _on_cpu(self, names: list[str]) -> bool:
        """Whether every named layer's weight and mask live on the CPU (threaded selection)."""
        return all(
            self._leaf_weight(fqn).device.type == "cpu" == self.get_buffer(self._fxsparse.sites[fqn].mask).device.type
            for fqn in names
        )

    def _redistribution(
        self, names: list[str], drop_fraction: float, statistic: str,
        grads: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
    ) -> dict[str, int]:
        """Per layer, how many connections it grows when the regrowth is redistributed."""
        scores, capacity, total = {}, {}, 0
        for fqn in names:
            site = self._fxsparse.sites[fqn]
            mask = self.get_buffer(site.mask)
            k = topology.drop_count(site.active, drop_fraction)
            total += k
            capacity[fqn] = mask.numel() - site.active + k
            if statistic == "score":
                source = grads[fqn]
            else:
                source = _momentum(optimizer, self._leaf_weight(fqn))
                if source is None:
                    raise ValueError(
                        f"redistribute='momentum' needs the optimizer's momentum of {fqn!r}, but "
                        f"{type(optimizer).__name__} holds none (yet); use SGD with momentum or "
                        f"Adam/AdamW, and update after their first step"
                    )
            value = float(source.detach().abs().mul_(mask).sum()) / max(site.active, 1)
            scores[fqn] = value if math.isfinite(value) else 0.0
        return budgets.redistribute(total, capacity, scores)


class StateDictError(ValueError, RuntimeError):
    """A state_dict that cannot be loaded into a SparseGraphModule; nothing was changed."""


def _state_dict_message(problems: list[str]) -> str:
    return (
        "fxsparse: cannot load this state_dict into the sparse module; nothing was changed:\n  "
        + "\n  ".join(problems)
    )


def finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN or inf: one sum (NaN and inf survive a sum), and the
    exact elementwise check only when the sum is not finite (it may have overflowed)."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.detach().sum())) or bool(torch.isfinite(tensor).all())


def _momentum(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> torch.Tensor | None:
    """The optimizer's first-moment state of ``param``: SGD's momentum buffer, Adam's exp_avg."""
    if optimizer is None:
        return None
    state = optimizer.state.get(param, {})
    for key in ("momentum_buffer", "exp_avg"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            return value
    return None


def _unpickle_exported(
    tables: tuple[dict[str, Any], dict[str, Any], dict[str, Any], set[str]], graphs: dict[bool, dict[str, Any]],
    state: _State, training: bool, specs: dict[str, Any], class_name: str,
) -> SparseGraphModule:
    """Rebuilds a module captured by torch.export from its tables and its graphs' data."""
    modules, parameters, buffers, non_persistent = tables
    root = nn.Module()
    root._modules.update(modules)
    root._parameters.update(parameters)
    root._buffers.update(buffers)
    mode_graphs = {mode: graph_from_state(data) for mode, data in graphs.items()}
    sparse = SparseGraphModule(root, mode_graphs[training], class_name=class_name)
    for table, items in ((sparse._modules, modules), (sparse._parameters, parameters), (sparse._buffers, buffers)):
        table.clear()
        table.update(items)
    sparse._non_persistent_buffers_set = set(non_persistent)
    for name, spec in specs.items():
        setattr(sparse, name, spec)
    sparse.recompile()
    sparse._set_state(dataclasses.replace(state, mode_graphs=mode_graphs))
    sparse.training = training
    return sparse


def _unpickle(body: dict[str, Any], import_block: str) -> SparseGraphModule:
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
    return _deserialize_graph_module(forward, body, graph_module_cls=SparseGraphModule)  # type: ignore[return-value]


def _optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]


def _refuse_nonfinite(
    module: SparseGraphModule, names: list[str], growth: Mapping[str, torch.Tensor], what: str,
) -> None:
    """Raises FloatingPointError, before any mask changes, when a layer's weights (dropped by
    magnitude) or growth tensor (grown by magnitude) hold NaN or inf: ranking them would corrupt
    the topology. Only what the model computes with counts: inactive entries are zeroed (as
    every forward does) before a second look."""
    bad = []
    capture = module.growth_capture
    for fqn in names:
        weight, mask = module._leaf_weight(fqn), module.get_buffer(module._fxsparse.sites[fqn].mask)
        if not finite(weight):  # inactive entries may hold an edit's NaN: they do not count
            zero_inactive_(weight, capture.bit_mask(fqn, mask, weight))
        if not finite(weight):
            bad.append(f"{fqn} (weights)")
        if fqn in growth and not finite(growth[fqn]):
            bad.append(f"{fqn} (growth gradient)" if what == "rigl_step" else fqn)
    if bad:
        raise FloatingPointError(
            f"fxsparse {what}: NaN or inf in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            + f" ({', '.join(bad[1:6])}{' ...' if len(bad) > 6 else ''})" * (len(bad) > 1)
            + "; no mask was changed. A NaN/inf loss or an overflowing fp16 backward causes this: "
            "check the loss, lower the learning rate, or under fp16 autocast pass "
            "scaler=torch.amp.GradScaler() to fxsparse.RigLScheduler, which skips such steps"
        )


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Averages growth gradients over data-parallel ranks so every rank grows the same set."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(world)
