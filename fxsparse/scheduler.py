"""TopologyScheduler: when to update the topology; the method object says what an update does.

The scheduler counts steps, anneals the drop fraction, arms the recording of dense gradients on the
steps that need it, unscales them under a ``GradScaler``, checks the ranks agree before an
update, and asks its method (:mod:`fxsparse.methods`) the rest. ``RigLScheduler`` is its old
name, kept as an alias.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fxsparse.distributed import assert_in_sync
from fxsparse.graph_module import LayerChange, SparseGraphModule
from fxsparse.methods import Method, available_methods, make_method, register_method
from fxsparse.layouts import layout_of
from fxsparse.methods.base import fixed_count_refusal
from fxsparse.schedules import GradualPruning, cosine_drop_fraction, end_step
from fxsparse.topology import drop_count

__all__ = ["TopologyScheduler", "RigLScheduler", "Method", "register_method", "available_methods"]


class TopologyScheduler:
    """Drives the topology updates of a SparseGraphModule from an ordinary training loop.

    Every ``delta_t`` steps until ``end_fraction * total_steps`` it calls
    ``sparse.rigl_step(f(t))`` with the cosine-annealed drop fraction
    ``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))`` (Evci et al. 2020), growing and
    redistributing as ``method`` says (:func:`available_methods`; :class:`Method`). It arms the
    recording of dense growth gradients only for the update steps (every step for SNFS), so other
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

    Memory: while every step has run one backward (no gradient accumulation), a RigL update
    step keeps no dense copy of the gradient: each layer's gradient is reduced to its growth
    candidates as the backward produces it (:func:`fxsparse.topology.growth_candidates`), which
    select exactly what the dense gradient would. Otherwise (accumulation, SNFS, RigL-SG/SM,
    custom hooks, several processes, off CPU, ``growth_candidates=False``) the dense gradient
    is kept. A step that runs a second backward after every earlier step ran one raises
    before anything changes; run it again and the scheduler keeps the dense gradient from then on.

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
        growth_candidates: bool = True,
    ) -> None:
        if not isinstance(sparse, SparseGraphModule):
            raise TypeError(
                f"expected the SparseGraphModule returned by fxsparse.sparsify, got "
                f"{type(sparse).__name__}; wrap your model first: sparse = fxsparse.sparsify(model, density)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if method not in available_methods():
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
        self.history: list[dict[str, Any]] = []  # one record per topology update (:meth:`stats`)
        self.scaler = scaler
        self.skipped_steps = 0  # steps not counted: non-finite gradients under a GradScaler
        self.what = make_method(method)  # what an update does (fxsparse.methods)
        self.growth_candidates = bool(growth_candidates)
        self._one_backward: bool | None = None  # every step seen so far ran one backward (None: none seen)
        fixed = [f for f in sparse._fxsparse.sites if layout_of(sparse, f).fixed_count]
        if fixed and (self.what.redistribute is not None or self.what.prunes):
            raise fixed_count_refusal(sparse, fixed, f"method {method!r} changes per-layer counts")
        self.what.bind(self, density, init, begin_step)
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"expected scaler to be a torch.amp.GradScaler (or None), got {type(scaler).__name__}")
        self._arm_for(1)

    @property
    def spec(self) -> Method:
        """The method object (its class attributes describe it: ``grow``, ``redistribute`` ...)."""
        return self.what

    @property
    def grow(self) -> str | None:
        return self.what.grow

    @property
    def momentum(self) -> dict[str, torch.Tensor]:
        """SNFS's dense momentum by weight FQN (empty for other methods)."""
        return getattr(self.what, "momentum", {})

    @property
    def pruning(self) -> GradualPruning | None:
        """The pruning schedule of ``method="pruning"`` (None for other methods)."""
        return getattr(self.what, "schedule", None)

    def drop_fraction(self, step: int) -> float:
        """The drop fraction an update at ``step`` uses."""
        return cosine_drop_fraction(step, self.alpha, self.t_end)

    def is_update_step(self, step: int) -> bool:
        """True when ``step`` (counted from 1) updates the topology (drop-and-grow or prune)."""
        return self.what.is_update_step(self, step)

    def _arm_for(self, step: int) -> None:
        # accumulate: every backward of the step counts (micro-batches of gradient accumulation)
        armed = self.what.arms(self, step)
        self.sparse.arm_growth(armed, accumulate=True, candidates=self._candidate_counts(step) if armed else None)
        self.sparse.masker.backwards = 0

    def _candidate_counts(self, step: int) -> dict[str, int] | None:
        """Per masked layer, how many the update of ``step`` grows, when its gradient may be kept
        as growth candidates (exact: see the class docstring); else None."""
        if not (self.growth_candidates and self._one_backward and self.what.ranks_gradient_only()):
            return None
        # kept for the largest fraction this schedule uses, alpha, so that a rigl_step(alpha)
        # called by hand on this step's gradient is exact too
        return growth_candidate_counts(self.sparse, max(self.alpha, self.drop_fraction(step)))

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
        step = self.step_count + 1
        masker = self.sparse.masker
        if masker.spoiled:  # accumulation began on an update step: its first backward was reduced
            self._one_backward = False
            self._arm_for(step)
            raise RuntimeError(
                f"fxsparse: update step {step} ran more than one backward after every earlier step ran one, so the "
                "growth gradient of its first backward was kept only as growth candidates, which cannot be summed; "
                "nothing was changed. Run this step's forward and backward passes again: the scheduler keeps the "
                "dense gradient from now on (pass growth_candidates=False to start that way)"
            )
        self._one_backward = masker.backwards == 1 and self._one_backward is not False
        if (masker.grads or masker.candidates) and self.scaler is not None and not self._unscale(masker):
            masker.clear()  # the scaler skips this optimizer step: it did not happen
            self.skipped_steps += 1
            self._arm_for(step)
            return True
        updated = self.is_update_step(step)
        self.what.observe(self, step)
        if updated:  # a rank whose masks diverged would update differently: stop it first
            assert_in_sync(self.sparse, weights=False)
            self.last_changes = self.what.update(self, step)
            self.history.append(_record(step, None if self.what.prunes else self.drop_fraction(step), self.last_changes))
        self.what.after_step(self, step)
        self.step_count = step  # counted once done: a step that raised can be run again
        self._arm_for(step + 1)
        return not updated or self.what.optimizer_steps_on_update()

    def _unscale(self, masker: Any) -> bool:
        """Divides the captured gradients by the scaler's scale, in place; False if any of them
        is not finite (as GradScaler itself decides to skip a step). Growth candidates are only
        ranked within their layer: a positive scale leaves their order as it is."""
        assert self.scaler is not None
        if not all(c.finite for c in masker.candidates.values()):
            return False
        tensors = list(masker.grads.values())
        if not tensors:
            return True
        found_inf = torch.zeros(1, device=tensors[0].device)
        inv_scale = torch.full((1,), 1.0 / float(self.scaler.get_scale()), device=tensors[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, inv_scale)
        return not bool(found_inf.item())

    def stats(self) -> dict[str, float]:
        """Scalars for a training log: the step count, the module's density, and of the latest
        topology update its step, drop fraction, connections dropped and grown (summed over
        layers) and churn (grown / active). Integrations log these under ``fxsparse/``."""
        out = {"step": float(self.step_count), "density": float(self.sparse.density), "updates": float(len(self.history))}
        if self.history:
            last = self.history[-1]
            active = sum(layer["active"] for layer in last["layers"].values())
            grown = sum(layer["grown"] for layer in last["layers"].values())
            out.update(
                update_step=float(last["step"]), drop_fraction=float(last["drop_fraction"]),
                dropped=float(sum(layer["dropped"] for layer in last["layers"].values())), grown=float(grown),
                churn=grown / active if active else 0.0,
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the step count, the configuration, and the method's state
        (SNFS's dense momentum, the pruning schedule's start and targets)."""
        return {
            "step_count": self.step_count, "total_steps": self.total_steps, "delta_t": self.delta_t,
            "alpha": self.alpha, "end_fraction": self.end_fraction, "method": self.method,
            "momentum": {}, "initial": {}, "final": {}, "pruning": None, **self.what.state_dict(),
            "skipped_steps": self.skipped_steps, "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("total_steps", "delta_t", "alpha", "end_fraction", "method"):
            setattr(self, key, state[key])
        self.t_end = end_step(self.total_steps, self.end_fraction)
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.history = [dict(r) for r in state.get("history", [])]
        self.what = make_method(self.method)
        self.what.load_state_dict(state)
        self._one_backward = None  # observed again from the resumed steps
        self._arm_for(self.step_count + 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, step={self.step_count}, delta_t={self.delta_t}, "
            f"alpha={self.alpha}, t_end={self.t_end})"
        )


RigLScheduler = TopologyScheduler  # the name it had while it drove RigL alone


def _record(step: int, drop_fraction: float | None, changes: dict[str, LayerChange]) -> dict[str, Any]:
    """One entry of ``TopologyScheduler.history``: plain numbers, so that it pickles and logs.
    ``drop_fraction`` None (pruning, which removes and grows nothing back): the fraction of the
    active weights this update removed."""
    if drop_fraction is None:
        dropped = sum(c.dropped for c in changes.values())
        before = sum(c.active for c in changes.values()) + dropped
        drop_fraction = dropped / before if before else 0.0
    return {
        "step": step, "drop_fraction": float(drop_fraction),
        "layers": {fqn: {"active": c.active, "dropped": c.dropped, "grown": c.grown, "regrown": c.regrown}
                   for fqn, c in changes.items()},
    }


def growth_candidate_counts(sparse: SparseGraphModule, drop_fraction: float) -> dict[str, int] | None:
    """For a RigL update at ``drop_fraction`` after one backward: per masked layer whose growth
    gradient may be kept as growth candidates, how many it grows. Layers left out keep the
    dense gradient: a weight recorded in several places (its gradients are summed), off CPU
    (selection there is ``torch.topk``'s, whose ties are not ordered) or budgeted dense. A
    compact layer makes its candidates block by block, without the dense gradient. None under
    several processes (the ranks' dense gradients are averaged first)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return None
    counts = {}
    for fqn, site in sparse._fxsparse.sites.items():
        if site.active == math.prod(site.shape):
            continue
        device = layout_of(sparse, fqn).trainable(sparse, fqn).device.type
        if _record_points(sparse, fqn) == 1 and device == "cpu":
            counts[fqn] = drop_count(site.active, drop_fraction)
    return counts


def _record_points(sparse: SparseGraphModule, fqn: str) -> int:
    """How many places record ``fqn``'s growth gradient in one training backward (its layout
    counts them in the training graph)."""
    graph = (sparse._fxsparse.mode_graphs or {}).get(True, sparse.graph)
    return layout_of(sparse, fqn).reads(sparse, fqn, graph)
