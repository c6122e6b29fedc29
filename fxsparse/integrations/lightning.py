"""Sparse training inside Lightning (``lightning.pytorch.Trainer``): a ``Callback``.

Lightning calls ``on_before_optimizer_step`` after the backward passes of an optimizer step
(after the ``GradScaler`` unscaled the gradients under ``precision="16-mixed"``), inside the
step, before any weight moves; the callback runs the scheduler there and, on a topology-update
iteration, makes that one step of the plain optimizer update nothing
(:class:`fxsparse.integrations.common.SkippedStep`). Steps are Lightning's optimizer steps
(``trainer.global_step``) over ``trainer.estimated_stepping_batches``, which already counts
``accumulate_grad_batches``, devices and ``max_steps`` or ``max_epochs``. The scheduler's state
is the callback's state, which Lightning saves in every checkpoint and restores on
``trainer.fit(..., ckpt_path=...)``; the masks are buffers of the model, in its ``state_dict``.

Example::

    class LitModel(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = fxsparse.sparsify(timm.create_model("resnet18", num_classes=10), density=0.1)
        ...

    trainer = lightning.Trainer(max_epochs=10, callbacks=[SparseTrainingCallback(delta_t=100)])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from fxsparse.integrations.common import (
    SkippedStep, log_scalars, log_topology, make_scheduler, plain_optimizer, scheduler_options,
)

__all__ = ["SparseTrainingCallback"]


class SparseTrainingCallback(Callback):
    """Runs a :class:`~fxsparse.TopologyScheduler` on the ``SparseGraphModule`` the
    LightningModule holds (one, as any submodule).

    Args:
        method, delta_t, alpha, end_fraction, density, init, begin_step, growth_candidates:
            as :class:`~fxsparse.TopologyScheduler`, in optimizer steps.
        log: log :meth:`~fxsparse.TopologyScheduler.stats` as ``fxsparse/<name>`` through the
            LightningModule's logger on every step (Lightning writes them every
            ``log_every_n_steps``); and, when the Trainer's logger is a TensorBoard one, each
            layer's density and its mask as an image after every topology update
            (:func:`fxsparse.plot.log_tensorboard`).

    Works with one optimizer (the LightningModule's automatic optimization), under AMP
    (``"16-mixed"``, ``"bf16-mixed"``), gradient accumulation and DDP (every rank makes the
    same update: the scheduler averages growth gradients over the ranks).
    """

    def __init__(self, method: str = "rigl", *, log: bool = True, **options: Any) -> None:
        self.options = scheduler_options(method=method, **options)
        self.log_stats = log
        self.scheduler: Any = None
        self._restored: dict[str, Any] | None = None
        self._skip: SkippedStep | None = None
        self._logged = 0  # topology updates whose masks went to TensorBoard

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"fxsparse: expected one optimizer training the sparse module, got {len(trainer.optimizers)}")
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("fxsparse: the number of optimizer steps is unknown (an infinite dataset); set max_steps")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scheduler = make_scheduler(pl_module, trainer.optimizers[0], int(total), self.options, scaler)
        if self._restored is not None:  # trainer.fit(ckpt_path=...): Lightning restored us before the optimizer existed
            self.scheduler.load_state_dict(self._restored)
            self._restored = None
        self._logged = len(self.scheduler.history)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self.scheduler.step():  # the topology was updated: no weight step this iteration
            self._skip = SkippedStep(plain_optimizer(optimizer), now=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._skip is not None:  # the step ran, or the GradScaler skipped it: undo either way
            self._skip.close()
            self._skip = None
        if self.log_stats and self.scheduler is not None:
            pl_module.log_dict(log_scalars(self.scheduler), on_step=True, on_epoch=False, batch_size=1)
            writer = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
            if callable(getattr(writer, "add_image", None)):  # a TensorBoard logger
                self._logged = log_topology(writer, self.scheduler, trainer.global_step, self._logged)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("scheduler")
