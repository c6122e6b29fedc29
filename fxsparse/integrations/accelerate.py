"""Sparse training in a loop of your own with Hugging Face ``accelerate``.

accelerate leaves the loop to the user, so the integration is the object the loop calls right
before ``optimizer.step()``, on every micro-batch, inside ``accelerator.accumulate``::

    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, mixed_precision="bf16")
    model, optimizer, loader = accelerator.prepare(fxsparse.sparsify(net, 0.1), optimizer, loader)
    sparse = SparseTraining(accelerator, model, optimizer, total_steps=optimizer_steps(accelerator, loader, epochs))
    accelerator.register_for_checkpointing(sparse)   # accelerator.save_state / load_state keep it
    for epoch in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model(batch["x"]), batch["y"]))
                sparse.step()       # on a topology-update iteration the step below updates nothing
                optimizer.step()
                optimizer.zero_grad()

On micro-batches that only accumulate, :meth:`SparseTraining.step` does nothing (as
``optimizer.step()`` does nothing there under accelerate); on the last one of each optimizer step
it runs the :class:`~fxsparse.TopologyScheduler`, which sees the growth gradient summed over the
whole step. Under ``mixed_precision="fp16"`` the scheduler unscales with the accelerator's
``GradScaler``, whose ``step`` and ``update`` still run on update iterations.
"""

from __future__ import annotations

import math
from typing import Any

from fxsparse.integrations.common import SkippedStep, log_scalars, make_scheduler, scheduler_options

__all__ = ["SparseTraining", "optimizer_steps"]


def optimizer_steps(accelerator: Any, loader: Any, epochs: int) -> int:
    """The optimizer steps of ``epochs`` epochs over ``loader`` as prepared by ``accelerator``
    (its length is per process), with its gradient accumulation: the scheduler's ``total_steps``."""
    return math.ceil(len(loader) / accelerator.gradient_accumulation_steps) * epochs


class SparseTraining:
    """Runs a :class:`~fxsparse.TopologyScheduler` on the ``SparseGraphModule`` in ``model`` (as
    ``accelerator.prepare`` returned it) and the optimizer inside ``optimizer``.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model, optimizer: as ``accelerator.prepare`` returned them.
        total_steps: optimizer steps of the run (:func:`optimizer_steps`).
        method, delta_t, alpha, end_fraction, density, init, begin_step, growth_candidates:
            as :class:`~fxsparse.TopologyScheduler`, in optimizer steps.

    ``state_dict``/``load_state_dict`` are the scheduler's, so that
    ``accelerator.register_for_checkpointing(this)`` saves and restores it with the model (whose
    masks are buffers) and the optimizer.
    """

    def __init__(self, accelerator: Any, model: Any, optimizer: Any, total_steps: int, method: str = "rigl",
                 **options: Any) -> None:
        self.accelerator = accelerator
        self.scheduler = make_scheduler(model, optimizer, total_steps, scheduler_options(method=method, **options),
                                        getattr(accelerator, "scaler", None))
        self._skip: SkippedStep | None = None

    def step(self) -> bool:
        """Call before every ``optimizer.step()``. Returns False on a topology-update iteration
        (whose optimizer step then updates nothing), True otherwise."""
        if self._skip is not None:  # the previous update's step ran, or a GradScaler skipped it
            self._skip.close()
            self._skip = None
        if not self.accelerator.sync_gradients:  # a micro-batch that only accumulates
            return True
        if self.scheduler.step():
            return True
        self._skip = SkippedStep(self.scheduler.optimizer)
        return False

    def stats(self) -> dict[str, float]:
        """:meth:`~fxsparse.TopologyScheduler.stats` as ``fxsparse/<name>``, for ``accelerator.log``."""
        return log_scalars(self.scheduler)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
