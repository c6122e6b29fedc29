"""SparseGraphModule: a GraphModule whose sparsified weights are read through their masks.

State that must survive a copy or a save is a registered buffer: each mask is a persistent bool
buffer beside its weight (``layer1.0.conv1.weight`` -> ``layer1.0.conv1.weight_mask``) and the
number of topology updates so far is the buffer ``fxsparse_updates``, so ``state_dict()``
restores the exact topology and random growth continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse import checkpointing, methods
from fxsparse.interop import ModelInterop
from fxsparse.recapture import follow_signature
from fxsparse.accounting import _batch_size, flop_report
from fxsparse.capture import check_shapes, graph_from_state, graph_state, pytree_specs, static_dims
from fxsparse.layouts import Layout, layout_of
from fxsparse import blocks as _blocks
from fxsparse import sharding
from fxsparse.masking import MASKER, UPDATES, Masker, zero_inactive_all_
from fxsparse.methods.base import LayerChange, derived_seed, finite
from fxsparse.registry import GROW_SCORES, grow_scores, register_grow_score
from fxsparse.state import StateDictError, adopt_loaded, check_keys, check_masks, invariant_problems, save_layouts, take_layouts

__all__ = ["SparseGraphModule", "LayerChange", "SparsitySummary", "register_grow_score", "grow_scores",
           "grow_score_needs_gradient", "StateDictError", "finite", "derived_seed", "UPDATES"]

_PRESERVED = "_user_preserved_attributes"  # GraphModule.__deepcopy__ restores these attributes


@dataclass
class _Site:
    """What is known about one sparsified weight besides its tensors."""

    mask: str  # qualified name of the mask buffer
    shape: tuple[int, ...]
    target_density: float
    active: int  # the layer's exact active count, kept by every topology update
    opaque: bool = False  # used inside an opaque leaf module (the module-level fallback)
    layout: str = "masked"  # its layout's registered name (fxsparse.layouts)
    storage: str = ""  # the submodule holding it where its layout keeps its own storage (compact)
    # a product reads a kernel computed from it: "graph", or the path of the layer inside an opaque
    # leaf that computes it (fxsparse.kernels); the mask goes on that kernel
    kernel: str = ""


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
    layouts: dict[str, Any] = field(default_factory=dict)  # fqn -> fxsparse.layouts.LayoutChoice
    skeleton: nn.Module | None = None  # the model sparsify was given, weights on meta (fxsparse.unwrap)
    checkpointing: dict[str, Any] | None = None  # fxsparse.checkpointing: graphs as captured, blocks
    # export: the call signature the graphs are of, and the graphs of the others seen (fxsparse.recapture)
    signature: Any = None
    signatures: dict[Any, Any] = field(default_factory=dict)
    blocks: dict[str, Any] | None = None  # fxsparse.blocks: graphs as captured, the blocks kept as modules


def grow_score_needs_gradient(name: str) -> bool:
    """Whether the growth score ``name`` reads the dense gradient (so capture must be armed)."""
    return GROW_SCORES.get(name, "a growth score").needs_gradient


class SparsitySummary:
    """Per-layer table of a SparseGraphModule: name, shape, density, active/total, and the
    dense and sparse inference FLOPs per sample when the input shape is known."""

    def __init__(self, rows: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> None:
        self.rows = rows
        self.skipped = skipped

    @classmethod
    def of(cls, module: Any) -> SparsitySummary:
        """The table of a SparseGraphModule (its FLOP columns when it knows its input shapes)."""
        per_layer = {}
        inputs = module.example_inputs()
        if inputs is not None:
            batch = _batch_size(inputs)
            per_layer = {r.name: r for r in flop_report(module, inputs).rows if r.kind == "weight"}
        rows = []
        for fqn, mask in module.masks.items():
            active = _active(module, fqn, mask)
            row = {"name": fqn, "shape": tuple(mask.shape), "density": active / mask.numel(),
                   "active": active, "total": mask.numel()}
            if inputs is not None:
                found = per_layer.get(fqn)
                row["dense_flops"] = found.dense_flops / batch if found else 0.0
                row["sparse_flops"] = found.sparse_flops / batch if found else 0.0
            rows.append(row)
        return cls(rows, module.skipped)

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


def _inputs_of_spec(spec: Any, device: torch.device) -> Any:
    """Zeros of the shapes and dtypes an input spec (``_State.input_spec``) records, or None."""
    if spec is None:
        return None

    def make(item: tuple[Any, ...]) -> Any:
        return torch.zeros(item[1], dtype=item[2], device=device) if item[0] == "tensor" else item[1]

    if len(spec) == 2 and isinstance(spec[1], dict):
        return tuple(make(i) for i in spec[0]), {k: make(i) for k, i in spec[1].items()}
    return tuple(make(item) for item in spec)


def _follow_mode(sparse: SparseGraphModule) -> None:
    """Has ``sparse`` run the graph of the mode ``sparse.training`` says, however it was set:
    code that restores modes by assignment (``module.training = mode``, as Lightning's evaluation
    loop does after validation) never calls ``train()``; the submodules keep the modes they have."""
    graphs = sparse.__dict__.get("_fxsparse") and sparse._fxsparse.mode_graphs
    if graphs and sparse.graph is not graphs[bool(sparse.training)]:
        sparse.graph = graphs[bool(sparse.training)]  # recompiles: only when the mode changes


def _advertise_signature(sparse: SparseGraphModule) -> None:
    """Gives an exported module's ``forward`` the model's signature: the graph's own takes only
    the example's keywords, but the module takes every keyword the model takes (other keyword
    sets are captured on first call), and frameworks read the signature to decide what to pass
    (``Trainer`` drops the dataset columns ``forward`` does not name, ``labels`` among them)."""
    state = sparse.__dict__.get("_fxsparse")
    if state is None or state.capture != "export" or state.skeleton is None:
        return
    try:
        type(sparse).forward.__signature__ = inspect.signature(type(state.skeleton).forward)
    except (TypeError, ValueError):  # a forward without a signature to read
        pass


def _before_call(sparse: SparseGraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """What a call does before the graph runs: an exported module takes the graphs of the call's
    signature (other keywords or another dtype than they were captured with: fxsparse.recapture);
    every module the graph of its mode, however the mode was set (``module.training = mode``, as
    Lightning's evaluation loop does, never calls ``train()``); an exported graph's inputs are
    checked against the dims torch.export fixed."""
    exported = sparse.__dict__.get("_fxsparse") is not None and sparse._fxsparse.capture == "export"
    if sparse.__dict__.get("_fxsparse") is not None:
        sync_shards(sparse)
    if exported:
        follow_signature(sparse, args, kwargs)
    _follow_mode(sparse)
    if exported:
        _check_call(sparse, args, kwargs)


def _owners(sparse: SparseGraphModule) -> list[tuple[str, dict[str, Any], str, dict[str, Any], str]]:
    """(fqn, the parameter table and name of its weight, the buffer table and name of its mask)
    of every sparse weight a module attribute holds, found once per module object: where
    ``fully_shard`` puts its DTensors and ``sharding.shard_masks`` the masks."""
    cached = sparse.__dict__.get("_fxsparse_owners")
    if cached is None or cached[0] != id(sparse):
        found = []
        for fqn, site in sparse._fxsparse.sites.items():
            owner_name, _, name = fqn.rpartition(".")
            owner = sparse.get_submodule(owner_name) if owner_name else sparse
            mask_owner, _, mask_name = site.mask.rpartition(".")
            if layout_of(sparse, fqn).keeps_parameter and name in owner._parameters:
                found.append((fqn, owner._parameters, name, sparse.get_submodule(mask_owner)._buffers, mask_name))
        cached = (id(sparse), found)
        sparse.__dict__["_fxsparse_owners"] = cached
    return cached[1]


def sync_shards(sparse: SparseGraphModule) -> bool:
    """Under ``fully_shard``: shards the masks like their weights (once), zeroes the inactive
    entries of every weight's shard and hooks its gradient; the masker then leaves the
    gathered weights alone (:mod:`fxsparse.sharding`). Runs before FSDP gathers anything: a
    call's first step, and before updates, state dicts and loads. True when sharded."""
    masker = sparse._modules[MASKER]
    owners = _owners(sparse)
    plain = nn.Parameter  # a DTensor parameter is of another type: the type check is the cheap one
    if not any(type(p) is not plain and sharding.is_sharded(p) for p in (table.get(name) for _, table, name, _, _ in owners)):
        masker.sharded = False
        return False
    # what to zero, found again only when a weight or mask object changed (fully_shard, a load with assign)
    cached = sparse.__dict__.get("_fxsparse_shards")
    if cached is None or cached[0] != _identities(owners):
        _blocks.keep_wrapped(sparse)  # blocks fully_shard wrapped before keep_blocks(): kept now, in place
        sharding.shard_masks(sparse)
        names = sharding.sharded_sites(sparse)
        found = []
        for fqn in names:  # the shards themselves: no DTensor dispatch per call
            weight, mask = sparse._leaf_weight(fqn), sparse._mask(fqn)
            found.append((fqn, weight, mask, sharding.local(weight), sharding.local(mask)))
        cached = (_identities(owners), found)  # after keeping blocks and sharding masks
        sparse.__dict__["_fxsparse_shards"] = cached
    with torch.no_grad():
        for fqn, weight, mask, _, _ in cached[1]:
            masker._masks[fqn] = mask
            if weight.requires_grad and not masker.serves(fqn, weight):
                masker._hook(fqn, weight, False)
        zero_inactive_all_([entry[3] for entry in cached[1]], [entry[4] for entry in cached[1]])
    masker.sharded = True
    return True


def _identities(owners: list[tuple[str, dict[str, Any], str, dict[str, Any], str]]) -> tuple[int, ...]:
    """The ids of every sparse weight and mask object the module holds now."""
    weights = (id(table.get(name)) for _, table, name, _, _ in owners)
    masks = (id(table.get(name)) for _, _, _, table, name in owners)
    return (*weights, *masks)


def _active(module: Any, fqn: str, mask: torch.Tensor) -> int:
    """The active count of a layer: its mask's, or of a sharded mask the layer's budget, which
    every update and load keeps equal to it (no communication)."""
    return module._fxsparse.sites[fqn].active if sharding.is_sharded(mask) else int(mask.sum())


def _below_wrappers(sparse: SparseGraphModule, compile: Any) -> Any:
    """Runs GraphModule's ``recompile`` onto the module's per-instance class: GraphModule compiles
    onto ``type(self)``, and a wrapper that swapped the class (fully_shard's ``FSDP<...>``
    subclass) must not get the code, whose ``__call__`` would then call itself."""
    wrapper = type(sparse)
    own = next((c for c in wrapper.__mro__ if c.__qualname__.endswith("<locals>.GraphModuleImpl")), wrapper)
    sparse.__class__ = own
    try:
        return compile()
    finally:
        sparse.__class__ = wrapper


def _restored(copied: SparseGraphModule) -> SparseGraphModule:
    """A deep copy with the model's container types back (``fxsparse.blocks.restore_containers``)."""
    if copied.__dict__.get("_fxsparse") is not None:
        _blocks.restore_containers(copied)
    return copied


def _check_call(sparse: SparseGraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The inputs of an exported graph checked against the dims torch.export fixed (a clear
    error instead of one from deep inside the model's code); the fixed dims of each graph are
    found once."""
    cached = sparse.__dict__.get("_fxsparse_static")
    if cached is None or cached[0] is not sparse.graph:
        cached = (sparse.graph, static_dims(sparse.graph))
        sparse.__dict__["_fxsparse_static"] = cached
    if any(fixed for _, fixed in cached[1]):
        check_shapes(sparse, cached[1], args, kwargs)


class SparseGraphModule(ModelInterop, torch.fx.GraphModule):
    """A traced model whose conv/linear/matmul weights are masked, with RigL topology updates.

    Made by :func:`fxsparse.sparsify`; see its docstring for an example. Every parameter keeps
    its original FQN; the masks are persistent bool buffers named ``<weight fqn>_mask``.
    """

    _fxsparse: _State

    def recompile(self) -> Any:
        result = _below_wrappers(self, super().recompile)
        _advertise_signature(self)
        return result

    def _set_state(self, state: _State) -> None:
        self._fxsparse = state
        _advertise_signature(self)
        # GraphModule.__deepcopy__ re-creates the module from its graph and then restores the
        # attributes named here, so the python-side state survives deepcopy; an exported graph's
        # code reads the pytree specs of its inputs and outputs.
        preserved = self.meta.setdefault(_PRESERVED, {})
        preserved["_fxsparse"] = state
        preserved.update(pytree_specs(self))

    def train(self, mode: bool = True) -> SparseGraphModule:
        """Sets the mode as ``nn.Module.train`` does; a module whose modes compute differently
        (a capture bakes the mode into its graph) also switches to the graph captured in that mode."""
        super().train(mode)
        _follow_mode(self)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _before_call(self, args, kwargs)
        return super().__call__(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> SparseGraphModule:
        # .to(device) / .cuda() / .cpu(): an exported graph names the device it was captured on
        # (arange(..., device=cpu) and the like): follow the parameters to their new device
        result = super()._apply(fn, recurse)
        state = getattr(self, "_fxsparse", None)
        if state is not None and state.mode_graphs:
            _follow_device(self)
        return result

    @property
    def capture(self) -> str:
        """How the model became a graph: ``"symbolic"`` (torch.fx tracing) or ``"export"``."""
        return self._fxsparse.capture

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)  # GraphModule pickles its code and re-traces it as a plain GraphModule

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseGraphModule:
        return _restored(super().__deepcopy__(memo))  # GraphModule rebuilds containers as plain modules

    # ----------------------------------------------------------------------------------- views
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks by weight FQN of the original model: the live mask buffers of the masked
        layout, masks computed from the indices of compact layers."""
        return {fqn: self._mask(fqn) for fqn in self._fxsparse.sites}

    def _mask(self, fqn: str) -> torch.Tensor:
        return layout_of(self, fqn).mask(self, fqn)

    def _weights_and_masks(self) -> Iterator[tuple[str, tuple[nn.Parameter, torch.Tensor]]]:
        for fqn in self._fxsparse.sites:
            yield fqn, (self._leaf_weight(fqn), self._mask(fqn))

    def layout_of(self, fqn: str) -> Layout:
        """The layout holding the sparse weight ``fqn`` (:mod:`fxsparse.layouts`): its views,
        updates and capabilities."""
        if fqn not in self._fxsparse.sites:
            raise KeyError(f"expected a sparse weight's FQN, got {fqn!r}; valid: {list(self._fxsparse.sites)[:10]}")
        return layout_of(self, fqn)

    def compact_layer(self, fqn: str) -> Any:
        """The :class:`fxsparse.layouts.compact.CompactWeight` holding ``fqn``
        (``layout="compact"``), or None where it is in another layout."""
        return layout_of(self, fqn).storage(self, fqn) if self._fxsparse.sites[fqn].layout == "compact" else None

    @property
    def layouts(self) -> dict[str, Any]:
        """Per sparse weight, its layout and why (:class:`fxsparse.layouts.LayoutChoice`)."""
        return dict(self._fxsparse.layouts)

    def _leaf_weight(self, fqn: str) -> nn.Parameter:
        """The weight decisions read, in its dense shape (the layout's view): the parameter the
        mask of ``fqn`` applies to (``get_parameter(fqn)``, or, where ``torch.nn.utils.parametrize``
        computes that weight, the parametrization's ``original``); for a compact layer a new
        dense tensor (edit the layer's ``values`` instead)."""
        return layout_of(self, fqn).weight(self, fqn)  # type: ignore[return-value]

    @property
    def sparse_weights(self) -> dict[str, nn.Parameter]:
        """The sparsified parameters, by FQN (a compact layer's weight as a dense copy)."""
        return {fqn: self._leaf_weight(fqn) for fqn in self._fxsparse.sites}

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(fqn, reason)`` of the conv/linear/matmul weights left dense, with why."""
        return list(self._fxsparse.skipped)

    @property
    def density(self) -> float:
        """Active over total weights of the sparsified layers (no communication when sharded)."""
        active = total = 0
        for fqn, mask in self.masks.items():
            active += _active(self, fqn, mask)
            total += mask.numel()
        return active / total

    @property
    def masker(self) -> Masker:
        """The :class:`fxsparse.masking.Masker` every masked-weight node calls: it zeroes inactive
        weights, masks gradients and records the dense growth gradients (``.armed``,
        ``.accumulate``, ``.grads``). ``growth_capture`` is its former name."""
        return self.get_submodule(MASKER)  # type: ignore[return-value]

    growth_capture = masker  # its former name, kept as an alias

    def arm_growth(self, enabled: bool = True, *, accumulate: bool = False, candidates: Mapping[str, int] | None = None) -> None:
        """Turns the recording of ``dL/d(w*m)`` on or off for the following forward passes.

        A freshly sparsified module is armed, so ``loss.backward(); sparse.rigl_step(0.3)`` works
        as is; :class:`fxsparse.RigLScheduler` arms only the update steps. Arming forgets what
        was recorded. ``candidates`` (FQN -> most grown): keep only growth candidates there
        (:func:`fxsparse.topology.growth_candidates`; exact after one backward)."""
        masker = self.masker
        masker.clear()
        masker.armed, masker.accumulate = bool(enabled), bool(accumulate)
        masker.plan = dict(candidates or {}) if enabled else {}

    def summary(self) -> SparsitySummary:
        """A per-layer table (name, shape, density, active/total; dense and sparse inference
        FLOPs per sample when ``sparsify`` was given ``example_inputs``); ``print`` it."""
        return SparsitySummary.of(self)

    def example_inputs(self) -> Any:
        """Inputs of the shapes and dtypes ``sparsify`` was given (zeros), or None: a tuple of
        positional inputs, or ``(args, kwargs)`` when it was given keyword inputs."""
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return _inputs_of_spec(self._fxsparse.input_spec, device)

    def named_masks(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.masks.items()

    # ------------------------------------------------------------------------------ invariants
    def verify(self) -> None:
        """Checks the invariants that hold between updates; raises RuntimeError if one fails.

        Every mask is a bool tensor of its weight's shape with exactly the layer's active count,
        and every inactive weight is exactly zero.
        """
        problems = invariant_problems(self)
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
        sync_shards(self)
        for fqn in self._fxsparse.sites:
            layout_of(self, fqn).rezero(self, fqn)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.rezero()  # a checkpoint holds exact zeros at inactive entries, whatever edited them
        return super().state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_layouts(self, destination, prefix)  # the masked layout's format, whatever the layout

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
            check_keys(super().state_dict(keep_vars=True), state_dict)
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
        counts = check_masks(self, state_dict, prefix, budget)
        taken = take_layouts(self, state_dict, prefix, missing_keys if strict else None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        adopt_loaded(self, counts, taken, budget)

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
        method: methods.Method | None = None,
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
            method: a :class:`fxsparse.methods.Method` whose hooks decide the update (drop and
                grow scores, grow counts; its ``grow`` and ``redistribute`` replace the
                arguments): how a :class:`~fxsparse.TopologyScheduler` runs its method.

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
        method = methods.base.checked_step(drop_fraction, optimizer, grow, grow_from, redistribute, method)
        sync_shards(self)
        return methods.drop_and_grow(self, method, drop_fraction, optimizer, grow_from)

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
        sync_shards(self)
        return methods.prune(self, counts, optimizer)


def _reduce(self: SparseGraphModule) -> tuple[Any, ...]:
    """How a SparseGraphModule pickles: rebuilt as one (GraphModule would rebuild a plain
    GraphModule by re-tracing its code)."""
    state = getattr(self, "_fxsparse", None)
    if state is not None and state.mode_graphs:
        # an exported graph's code cannot be re-traced (pytree specs, ATen ops): pickle the
        # module's tables and each mode's graph as data (fxsparse.capture.graph_state); the
        # graphs as captured where checkpointing rewrote them (it is turned on again), the
        # current call signature's only (others are captured again when called)
        checkpoint = checkpointing.options(self)
        captured = state.checkpointing["graphs"] if checkpoint else state.mode_graphs
        graphs = {mode: graph_state(graph) for mode, graph in captured.items()}
        modules = {k: v for k, v in self._modules.items() if not k.startswith(checkpointing.SEGMENT_PREFIX)}
        tables = (modules, dict(self._parameters), dict(self._buffers), set(self._non_persistent_buffers_set))
        kept = dataclasses.replace(state, mode_graphs=None, signatures={}, checkpointing=None)
        return (_unpickle_exported, (tables, graphs, kept, self.training, pytree_specs(self), type(self).__name__,
                                     checkpoint))
    checkpoint = checkpointing.options(self) if state is not None else None
    if checkpoint is not None:  # pickled as captured (segments re-trace badly), checkpointed again when loaded
        checkpointing.disable(self)
        try:
            _, (body, import_block) = torch.fx.GraphModule.__reduce__(self)
        finally:
            checkpointing.enable(self, **checkpoint)
        # the body holds the state object itself, which now says checkpointing again
        unsegmented = dataclasses.replace(state, checkpointing=None)
        body = {**body, "_fxsparse": unsegmented}
        if isinstance(body.get("meta"), dict):
            preserved = {**body["meta"].get(_PRESERVED, {}), "_fxsparse": unsegmented}
            body["meta"] = {**body["meta"], _PRESERVED: preserved}
        return (_unpickle, (body, import_block, checkpoint))
    _, (body, import_block) = torch.fx.GraphModule.__reduce__(self)
    return (_unpickle, (body, import_block))


def _unpickle_exported(
    tables: tuple[dict[str, Any], dict[str, Any], dict[str, Any], set[str]], graphs: dict[bool, dict[str, Any]],
    state: _State, training: bool, specs: dict[str, Any], class_name: str, checkpoint: dict[str, Any] | None = None,
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
    if checkpoint is not None:
        checkpointing.enable(sparse, **checkpoint)
    return sparse


def _unpickle(body: dict[str, Any], import_block: str, checkpoint: dict[str, Any] | None = None) -> SparseGraphModule:
    import torch.fx._symbolic_trace as symbolic
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    # the code's import block calls torch.fx.wrap("<dotted name>") for wrapped functions, which
    # registers them for every later trace under a name its globals lack: every later
    # symbolic_trace then fails with a KeyError. Keep torch's registry as it was.
    registry = getattr(symbolic, "_wrapped_fns_to_patch", {})
    before = set(registry)
    try:
        forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
        sparse = _deserialize_graph_module(forward, body, graph_module_cls=SparseGraphModule)
    finally:
        for key in set(registry) - before:
            del registry[key]
    # torch copies back the body's attributes the new module lacks, and it has a `meta`: the
    # attributes a deepcopy restores (the state among them) would be lost for the next copy
    preserved = body.get("meta", {}).get(_PRESERVED, {})
    sparse.meta.setdefault(_PRESERVED, {}).update({k: v for k, v in preserved.items() if k not in sparse.meta[_PRESERVED]})
    if checkpoint is not None:
        checkpointing.enable(sparse, **checkpoint)
    return sparse  # type: ignore[return-value]


def _follow_device(self: SparseGraphModule) -> None:
    """Moves the devices an exported graph names to the parameters' device."""
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
