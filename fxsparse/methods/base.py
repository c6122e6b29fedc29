"""The method object and the one update loop every drop-and-grow method shares.

A :class:`Method` says what a topology update does, through hooks in the manner of jaxpruner's
``SparseTrainer`` classes: which weights to drop (:meth:`Method.drop_scores`, magnitude by
default), which to grow (:meth:`Method.grow_scores`, the registered score named by
:attr:`Method.grow`), and how many each layer grows (:meth:`Method.grow_counts`: as many as it
dropped, or the network's regrowth redistributed). :func:`drop_and_grow` runs the update with
those hooks on a :class:`~fxsparse.SparseGraphModule`: it checks the growth tensors, selects
every layer's update (reading only; threads on CPU), then applies them all, zeroing optimizer
state where the topology changed. :func:`prune` is the loop of magnitude pruning (masks only
shrink). Nothing here imports torch.fx or the graph module: ``sparse`` is used through its
sites, masks and weights.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fxsparse import budgets, sharding, topology
from fxsparse.layouts import layout_of
from fxsparse.masking import UPDATES
from fxsparse.registry import GROW_SCORES, register_grow_score
from fxsparse.schedules import is_update_step

__all__ = ["Method", "LayerChange", "drop_and_grow", "prune", "checked_step", "finite", "nonfinite_error", "fixed_count_refusal", "check_redistribute", "REDISTRIBUTE", "derived_seed", "momentum_of"]


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


class Method:
    """A dynamic-sparse-training method: what its topology updates do.

    Subclass it and override a hook, as RigL is SET with another grow score (Evci et al. 2020).
    Register a subclass with :func:`fxsparse.methods.register_method` to use it as
    ``TopologyScheduler(method=name)``; the scheduler decides when updates happen.

    Class attributes:
        name: the scheduler's ``method=``.
        paper: where it comes from.
        grow: a registered growth score (``"gradient"``, ``"random"``, or one of
            :func:`fxsparse.register_grow_score`); None: the method never grows.
        redistribute: how the regrowth is shared among layers: None keeps every layer's count,
            ``"score"`` by the mean growth tensor over active weights, ``"momentum"`` by the
            optimizer's mean momentum over active weights.
        dense_momentum: grows from a moving average of the dense gradient, so it needs the
            dense gradient on every step (SNFS).
        prunes: magnitude pruning along a schedule: no growth, masks only shrink.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    grow: ClassVar[str | None] = None
    redistribute: ClassVar[str | None] = None
    dense_momentum: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    # ------------------------------------------------------------------------------- hooks
    def needs_gradient(self) -> bool:
        """Whether an update reads the dense growth gradient (recording armed on update steps)."""
        return self.grow is not None and GROW_SCORES.get(self.grow).needs_gradient

    def ranks_gradient_only(self) -> bool:
        """Whether an update reads the growth gradient only to rank ``|grad|`` within each layer,
        growing as many as it drops: RigL's own hooks (magnitude drop, the ``"gradient"`` score,
        counts kept). Then growth candidates kept when the backward ends select exactly what
        the dense gradient would (:func:`fxsparse.topology.update_from_candidates`), and an
        update step needs no dense copy of the gradient. Any overridden hook says no."""
        cls = type(self)
        return (
            self.grow == "gradient" and self.redistribute is None and not self.dense_momentum and not self.prunes
            and GROW_SCORES.get("gradient").fn is _gradient_score
            and cls.drop_scores is Method.drop_scores and cls.grow_scores is Method.grow_scores
            and cls.grow_counts is Method.grow_counts
        )

    def drop_scores(
        self, sparse: Any, fqn: str, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor | None,
    ) -> torch.Tensor:
        """The active weights of smallest ``|score|`` are dropped; by default the weight itself
        (magnitude). ``grad``: the layer's growth tensor, when the method reads one (do not
        change it: the grow score may consume it). Return the weight, or a new tensor."""
        return weight

    def grow_scores(
        self, sparse: Any, fqn: str, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor | None,
        update: int,
    ) -> torch.Tensor:
        """The inactive positions of largest score are grown; by default the registered score
        :attr:`grow` (which may overwrite ``grad``: the update consumes it)."""
        assert self.grow is not None
        return GROW_SCORES.get(self.grow).fn(sparse, fqn, weight, mask, grad, update)

    def grow_counts(
        self, sparse: Any, drop_fraction: float, grads: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
    ) -> dict[str, int | None]:
        """How many each updated layer grows, by FQN (None: as many as it drops). Layers not
        named are left as they are. By default every layer that is not dense regrows what it
        dropped; with :attr:`redistribute` the network's regrowth goes where the statistic is
        largest, layers budgeted dense staying dense (:func:`fxsparse.budgets.redistribute`)."""
        sites = sparse._fxsparse.sites
        if self.redistribute is None:
            return {fqn: None for fqn, site in sites.items() if site.active < math.prod(site.shape)}
        names = [fqn for fqn, site in sites.items() if site.target_density < 1.0]
        return dict(_redistribution(sparse, names, drop_fraction, self.redistribute, grads, optimizer))

    # ------------------------------------------------------------ what the scheduler asks
    def bind(self, scheduler: Any, density: float | None, init: str, begin_step: int) -> None:
        """Checks (and takes) the scheduler's settings, once, when the scheduler is made: a
        drop-and-grow method keeps the density ``sparsify`` gave, so it refuses ``density=``."""
        if density is not None:
            raise ValueError(
                f"density= is the target of method='pruning'; method {self.name!r} keeps the density "
                f"sparsify gave ({scheduler.sparse.density:.4f})"
            )

    def is_update_step(self, scheduler: Any, step: int) -> bool:
        """Whether ``step`` (counted from 1) updates the topology: every ``delta_t`` steps until
        ``t_end`` for a method that grows."""
        return self.grow is not None and is_update_step(step, scheduler.delta_t, scheduler.t_end)

    def arms(self, scheduler: Any, step: int) -> bool:
        """Whether the forward of ``step`` captures dense gradients."""
        return self.needs_gradient() and self.is_update_step(scheduler, step)

    def observe(self, scheduler: Any, step: int) -> None:
        """Called every step, before its update (SNFS folds its momentum here)."""

    def update(
        self, scheduler: Any, step: int, grow_from: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, LayerChange]:
        """The topology update of ``step``: ``sparse.rigl_step(method=self)`` at the scheduler's
        drop fraction (:func:`drop_and_grow` with this method's hooks)."""
        return scheduler.sparse.rigl_step(
            scheduler.drop_fraction(step), scheduler.optimizer, grow_from=grow_from, method=self
        )

    def after_step(self, scheduler: Any, step: int) -> None:
        """Called at the end of every counted step."""

    def optimizer_steps_on_update(self) -> bool:
        """Whether the optimizer steps on an update iteration: not for drop-and-grow, as in the
        official implementation (the weights just grown are zero)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides the scheduler's own counters."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def threadsafe(self) -> bool:
        """Whether layers may be selected on several threads (the grow score reads only its
        arguments)."""
        return self.grow is not None and GROW_SCORES.get(self.grow).threadsafe

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------- the update loop
@torch.no_grad()
def drop_and_grow(
    sparse: Any, method: Method, drop_fraction: float, optimizer: torch.optim.Optimizer | None,
    grow_from: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerChange]:
    """One topology update of every sparse layer of ``sparse`` as ``method`` says: drop
    ``k = floor(drop_fraction * active)`` by :meth:`Method.drop_scores`, grow by
    :meth:`Method.grow_scores` as many as :meth:`Method.grow_counts` says, then apply: new
    connections at 0 with zeroed optimizer state, dropped ones zeroed (invariants 1 and 4).
    ``grow_from`` replaces the captured gradients as growth tensors; both are consumed."""
    sites = sparse._fxsparse.sites
    masker = sparse.masker
    # growth candidates kept when the backward ended stand for those layers' dense gradients
    reduced = dict(masker.candidates) if grow_from is None and method.ranks_gradient_only() else {}
    grads = _growth_tensors(sparse, method, grow_from, reduced)
    needed = method.needs_gradient() or grow_from is not None
    _refuse_nonfinite(sparse, list(sites), grads if needed else {}, "rigl_step", reduced)
    counts = method.grow_counts(sparse, drop_fraction, grads, optimizer)
    update_index = int(sparse.get_buffer(UPDATES))

    @torch.no_grad()  # grad mode is per thread
    def select(fqn: str) -> topology.TopologyUpdate:  # reads only: every layer, then apply
        layout = layout_of(sparse, fqn)
        values = layout.active_values(sparse, fqn) if fqn in reduced else None
        if values is not None:  # the active values themselves, in the weight's order: no dense weight
            return topology.update_from_candidates(layout.mask(sparse, fqn), values, reduced[fqn], drop_fraction,
                                                   absolute=True, active_scores=True)
        weight, mask = layout.weight(sparse, fqn), layout.mask(sparse, fqn)
        if fqn in reduced:
            return topology.update_from_candidates(mask, weight, reduced[fqn], drop_fraction, absolute=True)
        drop = method.drop_scores(sparse, fqn, weight, mask, grads.get(fqn))
        score = method.grow_scores(sparse, fqn, weight, mask, grads.get(fqn), update_index)
        if sharding.is_sharded(mask):  # the same selection over every rank's shard (collectives)
            k = topology.drop_count(sites[fqn].active, drop_fraction)  # the layer's count, over every shard
            return sharding.update_mask(mask, drop, score, k, k if counts[fqn] is None else counts[fqn], absolute=True)
        return topology.update_mask(mask, drop, score, drop_fraction, scratch=True, absolute=True, grow_count=counts[fqn])

    todo = [fqn for fqn in sites if fqn in counts]
    parallel = method.threadsafe() and _on_cpu(sparse, todo) and not _sharded(sparse, todo)
    results = dict(zip(todo, topology.map_layers(select, todo, [math.prod(sites[f].shape) for f in todo], parallel=parallel)))
    changes = _apply(sparse, results, optimizer)
    sparse.get_buffer(UPDATES).add_(1)
    masker.clear()
    return changes


@torch.no_grad()
def prune(sparse: Any, counts: Mapping[str, int], optimizer: torch.optim.Optimizer | None) -> dict[str, LayerChange]:
    """Removes the smallest-magnitude active weights of each named layer until ``counts[fqn]``
    remain; removed weights, their gradient and their optimizer state are zeroed, and each
    pruned layer is budgeted at its new count."""
    sites = sparse._fxsparse.sites
    unknown = [fqn for fqn in counts if fqn not in sites]
    if unknown:
        raise ValueError(f"expected sparse weight FQNs, got unknown {unknown}; valid: {list(sites)}")
    fixed = [f for f in counts if f in sites and layout_of(sparse, f).fixed_count]
    if fixed:
        raise fixed_count_refusal(sparse, fixed, "pruning changes their counts")
    _refuse_nonfinite(sparse, [f for f in counts if f in sites], {}, "prune")
    todo = [fqn for fqn, site in sites.items() if fqn in counts and counts[fqn] != site.active]

    @torch.no_grad()  # grad mode is per thread
    def select(fqn: str) -> topology.TopologyUpdate:
        mask, weight = sparse._mask(fqn), sparse._leaf_weight(fqn).detach()
        if sharding.is_sharded(mask):
            return sharding.update_mask(mask, weight, weight, sites[fqn].active - counts[fqn], 0, absolute=True)
        return topology.prune_mask(mask, weight, counts[fqn])

    results = dict(zip(todo, topology.map_layers(
        select, todo, [math.prod(sites[fqn].shape) for fqn in todo],
        parallel=_on_cpu(sparse, todo) and not _sharded(sparse, todo),
    )))
    changes = _apply(sparse, results, optimizer, zero_grad=True)
    for fqn in results:
        site = sites[fqn]
        site.target_density = site.active / math.prod(site.shape)  # what it is budgeted now
    return changes


def _apply(
    sparse: Any, results: Mapping[str, topology.TopologyUpdate], optimizer: torch.optim.Optimizer | None,
    zero_grad: bool = False,
) -> dict[str, LayerChange]:
    """Applies every layer's selected update (``zero_grad``: also zero the gradient of what was
    dropped) and returns each layer's change, unchanged layers included."""
    moved = [f for f, r in results.items() if layout_of(sparse, f).fixed_count and r.grown_idx.numel() != r.dropped_idx.numel()]
    if moved:  # before any layer changes
        raise fixed_count_refusal(sparse, moved, "this update moves weights between layers")
    changes = {}
    for fqn, site in sparse._fxsparse.sites.items():
        result = results.get(fqn)
        if result is None:
            changes[fqn] = LayerChange(site.active, 0, 0, 0)
            continue
        layout = layout_of(sparse, fqn)
        layout.apply(sparse, fqn, result, _optimizer_state(optimizer, layout.trainable(sparse, fqn)), zero_grad)
        site.active += result.grown_idx.numel() - result.dropped_idx.numel()
        changes[fqn] = LayerChange(site.active, result.dropped_idx.numel(), result.grown_idx.numel(), result.regrown)
    return changes


def _growth_tensors(
    sparse: Any, method: Method, grow_from: Mapping[str, torch.Tensor] | None, reduced: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """The tensors growth is scored by: ``grow_from``, or the captured dense gradients (a layer
    that a backward did not reach while it reached others has an exactly zero gradient); empty
    when the method scores without them. Averaged over data-parallel ranks. The layers in
    ``reduced`` have growth candidates instead."""
    sites = sparse._fxsparse.sites
    grads = dict(sparse.masker.grads) if grow_from is None else dict(grow_from)
    if not (method.needs_gradient() or grow_from is not None):
        return grads
    if sparse.masker.spoiled and grow_from is None:
        raise ValueError(
            f"the growth gradient of {len(sparse.masker.spoiled)} layer(s) (first: {sorted(sparse.masker.spoiled)[0]!r}) "
            "came from more than one backward, but was armed to be kept as growth candidates of one backward "
            "(arm_growth(candidates=...)), which cannot be summed; nothing was changed. Arm without candidates "
            "when several backward passes make one step's gradient"
        )
    unusable = [fqn for fqn in sparse.masker.candidates if fqn not in reduced] if grow_from is None else []
    if unusable:
        raise ValueError(
            f"the growth gradient of {len(unusable)} layer(s) (first: {unusable[0]!r}) was kept as growth candidates "
            f"(arm_growth(candidates=...)), which only a RigL update growing by |grad| with per-layer counts kept "
            f"can rank, not {method!r}; nothing was changed. Arm without candidates for this update"
        )
    missing = [fqn for fqn in sites if fqn not in grads and fqn not in reduced]
    if missing and grow_from is None and len(missing) < len(sites):
        # a backward reached the other layers: these ones' outputs do not reach the loss (a
        # pooler computed and dropped, a head the loss does not use): their gradient is zero
        for fqn in missing:
            grads[fqn] = torch.zeros_like(sparse._leaf_weight(fqn), memory_format=torch.contiguous_format)
        missing = []
    if missing:
        raise ValueError(
            f"expected a dense growth gradient from a preceding backward, but none was "
            f"captured for {len(missing)} layer(s) (first: {missing[0]!r}). Fix: run "
            f"loss.backward() on this module before rigl_step, with recording armed "
            f"(sparse.arm_growth() before the forward; fxsparse.RigLScheduler does this "
            f"for you), or use grow='random' (SET), which needs no gradient."
        )
    _all_reduce_mean([grads[fqn] for fqn in sites if fqn in grads])
    return grads


def _redistribution(
    sparse: Any, names: list[str], drop_fraction: float, statistic: str,
    grads: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
) -> dict[str, int]:
    """Per layer, how many connections it grows when the regrowth is redistributed."""
    scores, capacity, total = {}, {}, 0
    for fqn in names:
        site = sparse._fxsparse.sites[fqn]
        mask = sparse._mask(fqn)
        k = topology.drop_count(site.active, drop_fraction)
        total += k
        capacity[fqn] = mask.numel() - site.active + k
        if statistic == "score":
            source = grads[fqn]
        else:
            source = momentum_of(optimizer, sparse._leaf_weight(fqn))
            if source is None:
                raise ValueError(
                    f"redistribute='momentum' needs the optimizer's momentum of {fqn!r}, but "
                    f"{type(optimizer).__name__} holds none (yet); use SGD with momentum or "
                    f"Adam/AdamW, and update after their first step"
                )
        value = _masked_abs_sum(source, mask) / max(site.active, 1)
        scores[fqn] = value if math.isfinite(value) else 0.0
    return budgets.redistribute(total, capacity, scores)


def _masked_abs_sum(source: torch.Tensor, mask: torch.Tensor) -> float:
    """The sum of ``|source|`` over the active entries (over every shard of sharded ones)."""
    if sharding.is_sharded(mask):
        part = float(sharding.local(source).detach().abs().mul_(sharding.local(mask)).sum(dtype=torch.float64))
        return float(sharding.all_sum(part, sharding.span_of(mask).group, torch.float64))
    return float(source.detach().abs().mul_(mask).sum())


def _sharded(sparse: Any, names: list[str]) -> bool:
    """Whether any named layer's mask is sharded: its selection runs collectives, in one order
    on every rank (never on threads)."""
    return any(sharding.is_sharded(sparse._mask(fqn)) for fqn in names)


def _on_cpu(sparse: Any, names: list[str]) -> bool:
    """Whether every named layer's weight and mask live on the CPU (threaded selection)."""

    def on_cpu(fqn: str) -> bool:
        layout = layout_of(sparse, fqn)
        if not layout.keeps_parameter:
            return layout.trainable(sparse, fqn).device.type == "cpu"
        return layout.weight(sparse, fqn).device.type == "cpu" == layout.mask(sparse, fqn).device.type

    return all(on_cpu(fqn) for fqn in names)


def fixed_count_refusal(sparse: Any, names: list[str], why: str) -> ValueError:
    """The error of a method that would change the active count of layers whose layout keeps it
    fixed (:attr:`fxsparse.layouts.Layout.fixed_count`)."""
    kinds = sorted({sparse._fxsparse.sites[f].layout for f in names})
    return ValueError(
        f"fxsparse: {len(names)} layer(s) in the {'/'.join(kinds)} layout ({', '.join(names[:3])}"
        f"{' ...' if len(names) > 3 else ''}) keep a fixed number of active weights, but {why}; nothing was changed. "
        "Use a method with constant per-layer counts (static, SET, RigL), or sparsify with layout='masked' for SNFS, "
        "RigL-SG/SM and pruning"
    )


REDISTRIBUTE = (None, "score", "momentum")


def check_redistribute(redistribute: Any) -> None:
    """Raises ValueError unless ``redistribute`` is one of :data:`REDISTRIBUTE`."""
    if redistribute not in REDISTRIBUTE:
        raise ValueError(
            f"expected redistribute to be None, 'score' or 'momentum', got {redistribute!r}: None keeps each "
            "layer's count (RigL), 'score' moves regrowth to the layers with the largest growth scores, "
            "'momentum' to those with the largest optimizer momentum (SNFS)"
        )


def checked_step(
    drop_fraction: float, optimizer: torch.optim.Optimizer | None, grow: str,
    grow_from: Mapping[str, torch.Tensor] | None, redistribute: str | None, method: Method | None,
) -> Method:
    """The method one ``rigl_step`` runs, its arguments checked: ``method`` itself, or a
    drop-and-grow method made of ``grow`` and ``redistribute``. Raises ValueError / TypeError
    saying what was expected."""
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not (
        math.isfinite(drop_fraction) and 0.0 <= drop_fraction <= 1.0
    ):
        raise ValueError(f"expected drop_fraction in [0, 1], got {drop_fraction!r}; RigL uses 0.3 (cosine-annealed)")
    if method is not None:  # a method object: its hooks and attributes decide
        grow, redistribute = method.grow or grow, method.redistribute
    needs_gradient = method.needs_gradient() if method is not None else GROW_SCORES.get(grow, "grow").needs_gradient
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or None), got {type(optimizer).__name__}")
    check_redistribute(redistribute)
    if redistribute == "score" and not needs_gradient and grow_from is None:
        raise ValueError(f"redistribute='score' needs a growth tensor; grow={grow!r} scores without one")
    if redistribute == "momentum" and optimizer is None:
        raise ValueError("redistribute='momentum' reads the optimizer's momentum: pass optimizer=")
    if method is None:
        method = type("RigLStep", (Method,), {"grow": grow, "redistribute": redistribute})()
    return method


# ------------------------------------------------------------------------------------ helpers
def finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN or inf: one sum (NaN and inf survive a sum), and the
    exact elementwise check only when the sum is not finite (it may have overflowed)."""
    if not tensor.is_floating_point():
        return True
    if sharding.is_sharded(tensor):  # every rank's part
        return sharding.all_true(finite(sharding.local(tensor)), sharding.span_of(tensor).group)
    return bool(torch.isfinite(tensor.detach().sum())) or bool(torch.isfinite(tensor).all())


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from ``parts`` (no Python hash randomisation)."""
    data = repr(parts).encode()
    return (zlib.crc32(data) | zlib.adler32(data) << 32) & (2**63 - 1)


def momentum_of(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> torch.Tensor | None:
    """The optimizer's first-moment state of ``param``: SGD's momentum buffer, Adam's exp_avg."""
    if optimizer is None:
        return None
    state = optimizer.state.get(param, {})
    for key in ("momentum_buffer", "exp_avg"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            return value
    return None


def _optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """Every state tensor of ``param``'s shape (momentum, Adam's moments): zeroed where the
    topology changes."""
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]


def _refuse_nonfinite(
    sparse: Any, names: list[str], growth: Mapping[str, torch.Tensor], what: str, reduced: Mapping[str, Any] | None = None,
) -> None:
    """Raises FloatingPointError, before any mask changes, when a layer's weights (dropped by
    magnitude) or growth tensor (grown by magnitude) hold NaN or inf: ranking them would corrupt
    the topology. Only what the model computes with counts: inactive entries are zeroed (as
    every forward does) before a second look."""
    checks: list[tuple[str, bool]] = []  # (what, finite on this rank)
    sharded = False
    for fqn in names:
        layout = layout_of(sparse, fqn)
        weight = layout.trainable(sparse, fqn)
        if not finite(sharding.local(weight)):  # inactive entries may hold an edit's NaN: they do not count
            layout.rezero(sparse, fqn)
        sharded |= sharding.is_sharded(weight)
        checks.append((f"{fqn} (weights)", finite(sharding.local(weight))))
        label = f"{fqn} (growth gradient)" if what == "rigl_step" else fqn
        if fqn in growth:
            checks.append((label, finite(sharding.local(growth[fqn]))))
        if reduced and fqn in reduced:
            checks.append((label, reduced[fqn].finite))
    # sharded: every rank's shards, in one all-reduce
    flags = sharding.all_true_each([ok for _, ok in checks]) if sharded else [ok for _, ok in checks]
    bad = list(dict.fromkeys(label for (label, _), ok in zip(checks, flags) if not ok))
    if bad:
        raise nonfinite_error(what, bad, "no mask was changed")


def nonfinite_error(what: str, bad: list[str], consequence: str) -> FloatingPointError:
    """The one message of every refusal of NaN or inf: where (``bad``, the first named), what
    the refusal kept (``consequence``), the usual causes and the fix."""
    more = f" and {len(bad) - 1} more ({', '.join(bad[1:6])}{' ...' if len(bad) > 6 else ''})" if len(bad) > 1 else ""
    return FloatingPointError(
        f"fxsparse {what}: NaN or inf in {bad[0]}{more}; {consequence}. A NaN/inf loss or an overflowing "
        "fp16 backward causes this: check the loss, lower the learning rate, or under fp16 autocast pass "
        "scaler=torch.amp.GradScaler() to fxsparse.RigLScheduler, which skips such steps"
    )


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Averages growth gradients over data-parallel ranks so every rank grows the same set."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for tensor in tensors:
        if sharding.is_sharded(tensor):  # FSDP's reduce-scatter averaged it already
            continue
        dist.all_reduce(tensor)
        tensor.div_(world)


# ------------------------------------------------------------------------------ growth scores
@register_grow_score("gradient", needs_gradient=True, threadsafe=True)
def _gradient_score(sparse: Any, fqn: str, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor | None,
                    update: int) -> torch.Tensor:
    assert grad is not None
    return grad.abs_()  # the update consumes the captured gradient: its storage is free to reuse


@register_grow_score("random", needs_gradient=False, threadsafe=True)
def _random_score(sparse: Any, fqn: str, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor | None,
                  update: int) -> torch.Tensor:
    # Seeded by (seed, update index, layer): identical on every rank and after a resume.
    generator = torch.Generator().manual_seed(derived_seed(sparse._fxsparse.seed, update, fqn))
    return torch.rand(mask.shape, generator=generator).to(mask.device)

