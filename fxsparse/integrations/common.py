"""What the framework integrations share, framework-free: the sparse module inside wrappers, the
plain optimizer inside wrappers, and skipping the optimizer step of a topology-update iteration
from outside the loop that calls it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxsparse.graph_module import SparseGraphModule
from fxsparse.serialization import untie_shared_tensors  # noqa: F401  (re-exported: its former home)

__all__ = ["find_sparse", "plain_optimizer", "SkippedStep", "make_scheduler", "scheduler_options", "log_scalars",
           "untie_shared_tensors", "tensorboard_writer", "log_topology"]

# attributes under which wrappers keep what they wrap: DistributedDataParallel (module),
# torch.compile (_orig_mod), Lightning's strategy wrappers (_forward_module)
_WRAPPED = ("module", "_orig_mod", "_forward_module")


def find_sparse(model: Any) -> SparseGraphModule:
    """The :class:`SparseGraphModule` that ``model`` is or wraps (DDP, ``torch.compile``,
    accelerate's and Lightning's wrappers), or the one among the submodules of ``model`` (a
    LightningModule holding it). Raises ``TypeError`` if there is none, or more than one."""
    seen: set[int] = set()
    outer = model
    while isinstance(model, nn.Module) and id(model) not in seen:
        if isinstance(model, SparseGraphModule):
            return model
        seen.add(id(model))
        inner = next((getattr(model, a) for a in _WRAPPED if isinstance(getattr(model, a, None), nn.Module)), None)
        if inner is None:
            break
        model = inner
    found = [m for m in outer.modules() if isinstance(m, SparseGraphModule)] if isinstance(outer, nn.Module) else []
    if len(found) == 1:
        return found[0]
    raise TypeError(
        f"expected the model being trained to be (or hold exactly one) fxsparse.SparseGraphModule, found "
        f"{len(found)} in {type(outer).__name__}; sparsify it first: model = fxsparse.sparsify(model, density, ...)"
    )


def plain_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper (accelerate's
    ``AcceleratedOptimizer.optimizer``, Lightning's ``LightningOptimizer._optimizer``)."""
    seen: set[int] = set()
    while id(optimizer) not in seen:  # AcceleratedOptimizer is itself an Optimizer subclass: unwrap first
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("expected a torch.optim.Optimizer (or a framework's wrapper of one) to train the sparse module")
    return optimizer


class SkippedStep:
    """Makes one ``optimizer.step()`` update nothing: a RigL update iteration does not step the
    weights (as in Evci et al. 2020's implementation), while a framework's loop calls the step
    itself, through wrappers of its own (accelerate's ``AcceleratedOptimizer``, a
    ``GradScaler``, Lightning's precision plugins).

    It empties the optimizer's parameter groups for that one call and puts them back in a step
    post-hook, so no state moves (no momentum, no Adam step count), whoever calls the step. A
    ``GradScaler`` still unscales, checks and updates its scale as on any other iteration, and
    the learning-rate schedule advances, as the official implementation's global step does.
    ``now=False`` empties them in a step pre-hook (for loops that unscale inside the step's
    caller, before the step); ``now=True`` at once (for a hook that runs inside the step, after
    its closure's backward: Lightning). Call :meth:`close` when the iteration ends, in case the
    step never ran (a ``GradScaler`` skipping it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, now: bool = False) -> None:
        self.optimizer = optimizer
        self.saved: list[Any] | None = None
        self.handles = [optimizer.register_step_post_hook(lambda *_: self.close())]
        if now:
            self._empty()
        else:
            self.handles.append(optimizer.register_step_pre_hook(lambda *_: self._empty()))

    def _empty(self) -> None:
        self.saved = [group["params"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["params"] = []

    def close(self) -> None:
        """Puts the parameter groups back and removes the hooks (idempotent)."""
        if self.saved is not None:
            for group, params in zip(self.optimizer.param_groups, self.saved):
                group["params"] = params
            self.saved = None
        for handle in self.handles:
            handle.remove()
        self.handles = []


def tensorboard_writer(log_dir: str) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` into ``log_dir``, or None when tensorboard is
    not installed (it is optional: ``fxsparse[tensorboard]``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)


def log_topology(writer: Any, scheduler: Any, step: int, logged: int) -> int:
    """After a topology update not yet logged (``len(scheduler.history) > logged``), writes the
    per-layer densities and the mask images (:func:`fxsparse.plot.log_tensorboard`) through
    ``writer`` at ``step``; returns how many updates are now logged."""
    if writer is None or len(scheduler.history) <= logged:
        return logged
    from fxsparse.plot import log_tensorboard

    log_tensorboard(writer, scheduler.sparse, None, step, images=True)
    return len(scheduler.history)


def log_scalars(scheduler: Any, prefix: str = "fxsparse/") -> dict[str, float]:
    """``scheduler.stats()`` under ``prefix``: the scalars every integration logs."""
    return {prefix + name: value for name, value in scheduler.stats().items()}


def make_scheduler(model: Any, optimizer: Any, total_steps: int, options: dict[str, Any], scaler: Any = None) -> Any:
    """A :class:`~fxsparse.TopologyScheduler` for the sparse module in ``model`` and the plain
    optimizer in ``optimizer``, over ``total_steps`` optimizer steps, with ``options`` (the
    scheduler's keyword arguments an integration was given)."""
    from fxsparse.scheduler import TopologyScheduler

    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"expected the framework to know its number of optimizer steps (>= 1), got {total_steps!r}; "
                         "set max_steps (or a finite dataset and epochs)")
    return TopologyScheduler(find_sparse(model), plain_optimizer(optimizer), total_steps, scaler=scaler, **options)


SCHEDULER_OPTIONS = ("method", "delta_t", "alpha", "end_fraction", "density", "init", "begin_step", "growth_candidates")


def scheduler_options(**options: Any) -> dict[str, Any]:
    """The scheduler's keyword arguments an integration was given, checked by name."""
    unknown = sorted(set(options) - set(SCHEDULER_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected scheduler option(s) {unknown}; expected some of {list(SCHEDULER_OPTIONS)}")
    return dict(options)
