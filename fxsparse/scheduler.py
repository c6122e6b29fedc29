"""RigLScheduler: when to update the topology, by how much, and which growth criterion to use."""

from __future__ import annotations

from typing import Any

import torch

from fxsparse.graph_module import LayerChange, SparseGraphModule
from fxsparse.masking import ZERO_PRESERVING_OPTIMIZERS
from fxsparse.schedules import cosine_drop_fraction, end_step, is_update_step

__all__ = ["RigLScheduler", "register_method", "available_methods"]

# method name -> growth criterion of rigl_step (None: the topology never changes)
_METHODS: dict[str, str | None] = {}


def register_method(name: str, grow: str | None) -> None:
    """Registers a dynamic-sparse-training method by the growth criterion it uses."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    _METHODS[name] = grow


def available_methods() -> list[str]:
    """Names accepted by ``RigLScheduler(method=...)``."""
    return sorted(_METHODS)


register_method("rigl", "gradient")  # Evci et al. 2020: grow by |dL/d(w*m)|
register_method("set", "random")  # Mocanu et al. 2018: grow at random
register_method("static", None)  # the random initial mask, never changed


class RigLScheduler:
    """Drives the topology updates of a SparseGraphModule from an ordinary training loop.

    Every ``delta_t`` steps until ``end_fraction * total_steps`` it calls
    ``sparse.rigl_step(f(t))`` with the cosine-annealed drop fraction
    ``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))`` (Evci et al. 2020). It arms the capture of
    dense growth gradients only for the update steps, so other steps keep no dense tensor. With
    an elementwise optimizer (SGD, Adam, AdamW, ...; see ``ZERO_PRESERVING_OPTIMIZERS``) it also
    tells the masked op after each optimizer step which weights provably still hold zeros at
    their inactive entries, so ordinary forwards skip re-zeroing them.

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
        self._trusted: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        if type(optimizer) in ZERO_PRESERVING_OPTIMIZERS:  # exact: a subclass may step differently
            optimizer.register_step_pre_hook(self._before_optimizer_step)
            optimizer.register_step_post_hook(self._after_optimizer_step)
        self._arm_for(1)

    @property
    def grow(self) -> str | None:
        return _METHODS[self.method]

    def drop_fraction(self, step: int) -> float:
        """The drop fraction an update at ``step`` uses."""
        return cosine_drop_fraction(step, self.alpha, self.t_end)

    def is_update_step(self, step: int) -> bool:
        return self.grow is not None and is_update_step(step, self.delta_t, self.t_end)

    def _arm_for(self, step: int) -> None:
        needs = self.grow is not None and self.grow == "gradient" and self.is_update_step(step)
        self.sparse.arm_growth(needs)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # A weight whose inactive entries are zero, with a gradient exactly as the masked op
        # left it (zero there) and state zeroed at every topology change, keeps them zero
        # through an elementwise optimizer step: the next forward need not zero them again.
        masker = self.sparse.growth_capture
        self._trusted = [
            (fqn, weight, mask)
            for fqn, (weight, mask) in self.sparse._weights_and_masks()
            if masker.is_clean(fqn, weight, mask)
            and (weight.grad is None or masker.grad_is_masked(fqn, weight))
        ]

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        masker = self.sparse.growth_capture
        for fqn, weight, mask in self._trusted:
            masker.mark_clean(fqn, weight, mask)
        self._trusted = []

    def step(self) -> bool:
        """Call once per iteration after ``backward()``; False means skip ``optimizer.step()``.

        On an update iteration the topology is updated from this iteration's gradients and, as
        in the official implementation, the optimizer does not step.
        """
        self.step_count += 1
        updated = self.is_update_step(self.step_count)
        if updated:
            self.last_changes = self.sparse.rigl_step(
                self.drop_fraction(self.step_count), self.optimizer, grow=self.grow  # type: ignore[arg-type]
            )
        self._arm_for(self.step_count + 1)
        return not updated

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the step count and the configuration."""
        return {
            "step_count": self.step_count, "total_steps": self.total_steps, "delta_t": self.delta_t,
            "alpha": self.alpha, "end_fraction": self.end_fraction, "method": self.method,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("total_steps", "delta_t", "alpha", "end_fraction", "method"):
            setattr(self, key, state[key])
        self.t_end = end_step(self.total_steps, self.end_fraction)
        self.step_count = int(state["step_count"])
        self._arm_for(self.step_count + 1)

    def __repr__(self) -> str:
        return (
            f"RigLScheduler(method={self.method!r}, step={self.step_count}, delta_t={self.delta_t}, "
            f"alpha={self.alpha}, t_end={self.t_end})"
        )
