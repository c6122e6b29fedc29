"""RigLScheduler: when to update the topology, by how much, and which growth criterion to use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fxsparse import budgets
from fxsparse.distributed import assert_in_sync
from fxsparse.graph_module import LayerChange, SparseGraphModule, finite, grow_score_needs_gradient
from fxsparse.schedules import GradualPruning, cosine_drop_fraction, end_step, is_update_step, pruned_density

__all__ = ["RigLScheduler", "Method", "register_method", "available_methods"]


@dataclass(frozen=True)
class Method:
    """What a dynamic-sparse-training method does at its topology updates.

    Attributes:
        name: the scheduler's ``method=``.
        grow: the growth score of :meth:`SparseGraphModule.rigl_step` (``"gradient"``,
            ``"random"``, or one registered with :func:`fxsparse.register_grow_score`); None
            when the method never grows.
        redistribute: how the regrowth is shared among layers (``rigl_step``'s
            ``redistribute``): None keeps every layer's count.
        dense_momentum: grow from an exponential moving average of the dense gradient, which
            needs the dense gradient on every step (SNFS): memory for one dense tensor per
            sparse weight and a dense backward every step.
        prune: gradual magnitude pruning: no growth, the masks only shrink along the cubic
            schedule of Zhu & Gupta (2017) to the scheduler's ``density``.
        paper: where it comes from.
    """

    name: str
    grow: str | None = None
    redistribute: str | None = None
    dense_momentum: bool = False
    prune: bool = False
    paper: str = ""


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, grow: str | None = None, *, redistribute: str | None = None, dense_momentum: bool = False,
    prune: bool = False, paper: str = "",
) -> Method:
    """Registers a method for ``RigLScheduler(method=name)``: see :class:`Method`.

    Example:
        >>> fxsparse.register_method("rigl-my-score", "my_score")  # doctest: +SKIP
    """
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if redistribute not in (None, "score", "momentum"):
        raise ValueError(f"expected redistribute None, 'score' or 'momentum', got {redistribute!r}")
    if prune and (grow is not None or redistribute is not None or dense_momentum):
        raise ValueError("a pruning method neither grows nor redistributes")
    method = Method(name, grow, redistribute, dense_momentum, prune, paper)
    _METHODS[name] = method
    return method


def available_methods() -> list[str]:
    """Names accepted by ``RigLScheduler(method=...)``."""
    return sorted(_METHODS)


register_method("static", None, paper="random mask at init, never changed")
register_method("set", "random", paper="Mocanu et al. 2018: grow at random")
register_method("rigl", "gradient", paper="Evci et al. 2020: grow by |dL/d(w*m)|")
register_method(
    "snfs", "gradient", redistribute="score", dense_momentum=True,
    paper="Dettmers & Zettlemoyer 2019 (sparse momentum): grow by dense momentum, redistribute by its mean",
)
register_method(
    "rigl-sg", "gradient", redistribute="score",
    paper="Sundar & Dwaraknath 2021: RigL, regrowth redistributed by mean sparse gradient",
)
register_method(
    "rigl-sm", "gradient", redistribute="momentum",
    paper="Sundar & Dwaraknath 2021: RigL, regrowth redistributed by mean sparse momentum",
)
register_method("pruning", prune=True, paper="Zhu & Gupta 2017: gradual magnitude pruning, dense to sparse")


class RigLScheduler:
    """Drives the topology updates of a SparseGraphModule from an ordinary training loop.

    Every ``delta_t`` steps until ``end_fraction * total_steps`` it calls
    ``sparse.rigl_step(f(t))`` with the cosine-annealed drop fraction
    ``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))`` (Evci et al. 2020), growing and
    redistributing as ``method`` says (:func:`available_methods`; :class:`Method`). It arms the
    capture of dense growth gradients only for the update steps (every step for SNFS), so other
    steps keep no dense tensor; captured gradients are summed over every backward of a step, so
    with gradient accumulation the growth gradient is that of the whole optimizer step.

    Mixed precision: pass the ``torch.amp.GradScaler`` as ``scaler``. The captured gradients
    are then divided by its scale before they are ranked, redistributed or folded into SNFS's
    momentum, and a step whose captured gradients are not finite (the scaler will skip that
    optimizer step) is not counted: no update, no momentum, and the step is run again as the same
    step number. Without a scaler, an update whose growth gradient or weights are not finite
    raises ``FloatingPointError`` naming the layers, before any mask changes.

    ``method="pruning"`` is dense-to-sparse: start from ``fxsparse.sparsify(model, 1.0)`` (or
    any denser topology) and give the target ``density`` and ``init``; every ``delta_t`` steps
    from ``begin_step`` to ``t_end`` each layer's smallest-magnitude weights are removed along
    the cubic of Zhu & Gupta (2017), ending exactly at the target counts. On pruning steps the
    optimizer still steps (``step()`` returns True).

    Under ``torch.distributed`` the growth tensors (gradients, SNFS's momentum) are averaged over
    the ranks before each update and every choice is deterministic, so all ranks make the same
    update; drops read the weights, which data parallelism keeps identical.

    Example:
        >>> scheduler = RigLScheduler(sparse, opt, total_steps=len(loader) * epochs)  # doctest: +SKIP
        >>> for x, y in loader:                                                       # doctest: +SKIP
        ...     loss_fn(sparse(x), y).backward()
        ...     if scheduler.step():   # False when the topology was updated instead
        ...         opt.step()
        ...     opt.zero_grad()
    """

    def __init__(
        self,
        sparse: SparseGraphModule,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        delta_t: int = 100,
        alpha: float = 0.3,
        end_fraction: float = 0.75,
        method: str = "rigl",
        *,
        density: float | None = None,
        init: str = "erk",
        begin_step: int = 0,
        scaler: Any = None,
    ) -> None:
        if not isinstance(sparse, SparseGraphModule):
            raise TypeError(
                f"expected the SparseGraphModule returned by fxsparse.sparsify, got "
                f"{type(sparse).__name__}; wrap your model first: sparse = fxsparse.sparsify(model, density)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if method not in _METHODS:
            raise ValueError(f"expected method to be one of {available_methods()}, got {method!r}")
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"expected delta_t (steps between updates) to be an int >= 1, got {delta_t!r}")
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"expected alpha (initial drop fraction) in [0, 1], got {alpha!r}")
        self.sparse = sparse
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.delta_t = delta_t
        self.alpha = alpha
        self.end_fraction = end_fraction
        self.method = method
        self.t_end = end_step(total_steps, end_fraction)
        self.step_count = 0
        self.last_changes: dict[str, LayerChange] | None = None
        self.momentum: dict[str, torch.Tensor] = {}  # SNFS's dense momentum, by weight FQN
        self.scaler = scaler
        self.skipped_steps = 0  # steps not counted: non-finite gradients under a GradScaler
        spec = _METHODS[method]
        if spec.redistribute == "momentum" and not _has_momentum(optimizer):
            raise ValueError(
                f"method {method!r} redistributes by the optimizer's momentum, but this "
                f"{type(optimizer).__name__} has none; use SGD(momentum=0.9) or Adam/AdamW"
            )
        if spec.redistribute == "momentum" and delta_t < 2:
            raise ValueError(
                f"method {method!r} reads the optimizer's momentum, which exists only after an optimizer "
                f"step, and update steps skip it: expected delta_t >= 2, got {delta_t}"
            )
        self.pruning: GradualPruning | None = None
        self._initial: dict[str, float] = {}
        self._final: dict[str, int] = {}
        if spec.prune:
            self._setup_pruning(density, init, begin_step)
        elif density is not None:
            raise ValueError(
                f"density= is the target of method='pruning'; method {method!r} keeps the density "
                f"sparsify gave ({sparse.density:.4f})"
            )
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"expected scaler to be a torch.amp.GradScaler (or None), got {type(scaler).__name__}")
        self._arm_for(1)

    def _setup_pruning(self, density: float | None, init: str, begin_step: int) -> None:
        if density is None:
            raise ValueError(
                "method='pruning' needs the target: RigLScheduler(sparse, opt, T, method='pruning', "
                "density=0.1, init='erk'), with sparse = fxsparse.sparsify(model, 1.0)"
            )
        sites = self.sparse._fxsparse.sites
        shapes = {fqn: site.shape for fqn, site in sites.items()}
        finals = budgets.layer_densities(shapes, density, init, dense=budgets.default_dense(shapes, init))
        self._final = {fqn: budgets.count_for_density(math.prod(site.shape), finals[fqn]) for fqn, site in sites.items()}
        too_sparse = [fqn for fqn, site in sites.items() if site.active < self._final[fqn]]
        if too_sparse:
            raise ValueError(
                f"pruning only removes weights, but {len(too_sparse)} layer(s) start below their "
                f"target count (first: {too_sparse[0]!r}); start from fxsparse.sparsify(model, 1.0)"
            )
        self._initial = {fqn: site.active / math.prod(site.shape) for fqn, site in sites.items()}
        self.pruning = GradualPruning(begin_step, self.t_end, self.delta_t)

    @property
    def spec(self) -> Method:
        return _METHODS[self.method]

    @property
    def grow(self) -> str | None:
        return self.spec.grow

    def drop_fraction(self, step: int) -> float:
        """The drop fraction an update at ``step`` uses."""
        return cosine_drop_fraction(step, self.alpha, self.t_end)

    def is_update_step(self, step: int) -> bool:
        """True when ``step`` (counted from 1) updates the topology (drop-and-grow or prune)."""
        if self.pruning is not None:
            return self.pruning.fraction_pruned(step) > self.pruning.fraction_pruned(step - 1)
        return self.grow is not None and is_update_step(step, self.delta_t, self.t_end)

    def _arm_for(self, step: int) -> None:
        spec = self.spec
        if spec.dense_momentum:
            needs = step <= self.t_end
        else:
            needs = spec.grow is not None and grow_score_needs_gradient(spec.grow) and self.is_update_step(step)
        # accumulate: every backward of the step counts (micro-batches of gradient accumulation)
        self.sparse.arm_growth(needs, accumulate=True)

    def step(self) -> bool:
        """Call once per optimizer step after the ``backward()`` calls; False: skip ``optimizer.step()``.

        On a drop-and-grow iteration the topology is updated from this iteration's gradients
        and, as in the official implementation, the optimizer does not step. Pruning steps and
        all others return True. Under a ``scaler``, a step whose captured gradients are not
        finite returns True (``scaler.step`` skips it) and is not counted.

        Raises:
            FloatingPointError: without a scaler, the growth gradients or weights of an update
                (or SNFS's gradients on any step) hold NaN or inf; no mask was changed.
            RuntimeError: under torch.distributed, the ranks' masks differ before an update.
        """
        spec = self.spec
        step = self.step_count + 1
        capture = self.sparse.growth_capture
        if capture.grads and self.scaler is not None and not self._unscale(capture.grads):
            capture.clear()  # the scaler skips this optimizer step: it did not happen
            self.skipped_steps += 1
            self._arm_for(step)
            return True
        updated = self.is_update_step(step)
        if spec.dense_momentum:
            self._fold_momentum()
        if updated:  # a rank whose masks diverged would update differently: stop it first
            assert_in_sync(self.sparse, weights=False)
        if updated and spec.prune:
            self.last_changes = self._prune(step)
        elif updated:
            grow_from = None
            if spec.dense_momentum:  # rigl_step consumes what it grows from: hand it copies
                grow_from = {fqn: m.clone() for fqn, m in self.momentum.items()}
            self.last_changes = self.sparse.rigl_step(
                self.drop_fraction(step), self.optimizer, grow=spec.grow,  # type: ignore[arg-type]
                grow_from=grow_from, redistribute=spec.redistribute,
            )
        if spec.dense_momentum and step >= self.t_end:
            self.momentum = {}  # the topology is frozen: nothing grows any more
        self.step_count = step  # counted once done: a step that raised can be run again
        self._arm_for(step + 1)
        return not updated or spec.prune

    def _unscale(self, grads: dict[str, torch.Tensor]) -> bool:
        """Divides the captured gradients by the scaler's scale, in place; False if any of them
        is not finite (as GradScaler itself decides to skip a step)."""
        assert self.scaler is not None
        tensors = list(grads.values())
        found_inf = torch.zeros(1, device=tensors[0].device)
        inv_scale = torch.full((1,), 1.0 / float(self.scaler.get_scale()), device=tensors[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, inv_scale)
        return not bool(found_inf.item())

    def _fold_momentum(self) -> None:
        """SNFS: ``m <- beta * m + g`` with this step's dense gradient (beta: the optimizer's)."""
        grads = self.sparse.growth_capture.grads
        beta = _beta(self.optimizer)
        bad = [fqn for fqn, grad in grads.items() if not finite(grad)]
        if bad:
            raise FloatingPointError(
                f"fxsparse: the dense gradient of {bad[0]!r}" + (f" and {len(bad) - 1} more layer(s)" if len(bad) > 1 else "")
                + " holds NaN or inf, and SNFS would fold it into its momentum for good; nothing was "
                "changed. Check the loss for NaN/inf; with fp16 autocast pass scaler=GradScaler(...) "
                "to RigLScheduler, which skips such steps as the scaler does"
            )
        for fqn in self.sparse._fxsparse.sites:
            grad = grads.get(fqn)
            if grad is None:
                continue
            held = self.momentum.get(fqn)
            self.momentum[fqn] = grad.clone() if held is None else held.mul_(beta).add_(grad)
        self.sparse.growth_capture.clear()

    def _prune(self, step: int) -> dict[str, LayerChange]:
        assert self.pruning is not None
        progress = self.pruning.fraction_pruned(step)
        counts = {}
        for fqn, site in self.sparse._fxsparse.sites.items():
            size = math.prod(site.shape)
            final = self._final[fqn]
            want = final if progress >= 1.0 else budgets.count_for_density(
                size, pruned_density(self._initial[fqn], final / size, progress)
            )
            counts[fqn] = min(site.active, max(final, want))  # masks only shrink, never past the target
        return self.sparse.prune(counts, self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the step count, the configuration, and method state
        (SNFS's dense momentum, the pruning schedule's start and targets)."""
        return {
            "step_count": self.step_count, "total_steps": self.total_steps, "delta_t": self.delta_t,
            "alpha": self.alpha, "end_fraction": self.end_fraction, "method": self.method,
            "momentum": dict(self.momentum), "initial": dict(self._initial), "final": dict(self._final),
            "pruning": None if self.pruning is None else (self.pruning.begin, self.pruning.end, self.pruning.frequency),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("total_steps", "delta_t", "alpha", "end_fraction", "method"):
            setattr(self, key, state[key])
        self.t_end = end_step(self.total_steps, self.end_fraction)
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.momentum = dict(state.get("momentum", {}))
        self._initial = dict(state.get("initial", {}))
        self._final = dict(state.get("final", {}))
        schedule = state.get("pruning")
        self.pruning = None if schedule is None else GradualPruning(*schedule)
        self._arm_for(self.step_count + 1)

    def __repr__(self) -> str:
        return (
            f"RigLScheduler(method={self.method!r}, step={self.step_count}, delta_t={self.delta_t}, "
            f"alpha={self.alpha}, t_end={self.t_end})"
        )


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    group = optimizer.param_groups[0]
    return bool(group.get("momentum", 0)) or "betas" in group


def _beta(optimizer: torch.optim.Optimizer) -> float:
    """The first-moment decay of the optimizer (SGD's momentum, Adam's beta1), else 0.9."""
    group = optimizer.param_groups[0]
    beta = group.get("momentum") or (group.get("betas") or (0.9,))[0]
    return float(beta) if beta else 0.9
