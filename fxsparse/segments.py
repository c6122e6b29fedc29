"""What a checkpointed graph calls at run time (:mod:`fxsparse.passes.checkpoint` writes the
calls): a segment under non-reentrant ``torch.utils.checkpoint``, and a leaf module that the
segment receives as an argument. Registered as leaf functions, so re-tracing a graph records
them instead of running them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SEGMENT_PREFIX", "run_checkpointed", "call_module"]

SEGMENT_PREFIX = "fxsparse_checkpoint_"  # the submodules holding the segments' graphs


def run_checkpointed(segment: nn.Module, options: Mapping[str, Any], *inputs: Any) -> Any:
    """Runs ``segment(*inputs)`` under non-reentrant ``torch.utils.checkpoint``, with
    ``options`` (``preserve_rng_state``, ``determinism_check``, ...) passed on.

    The recomputation in the backward leaves the state it would update as the forward left it:
    a training-mode BatchNorm updates its running statistics once a step, not twice. The
    module's buffers among the inputs (positions in ``segment.state_inputs``, written by the
    pass) and those of the leaf modules among them are put back after each recomputation where
    it changed them."""
    if not torch.is_grad_enabled():
        return segment(*inputs)
    calls = 0

    def run(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return segment(*args)
        kept = [(t, t.clone()) for t in _state_tensors(segment, args)]
        try:
            return segment(*args)
        finally:
            with torch.no_grad():  # compared by value: batch_norm updates its statistics without a version bump
                for tensor, value in kept:
                    if not torch.equal(tensor, value):
                        tensor.copy_(value)

    return checkpoint(run, *inputs, use_reentrant=False, **dict(options))


def _state_tensors(segment: nn.Module, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """Tensors a recomputation could update in place: the module's buffers among ``args`` and
    the buffers of the leaf modules among them."""
    found: dict[int, torch.Tensor] = {}
    for i in getattr(segment, "state_inputs", ()):
        arg = args[i]
        tensors = arg.buffers() if isinstance(arg, nn.Module) else [arg] if isinstance(arg, torch.Tensor) else []
        for tensor in tensors:
            found.setdefault(id(tensor), tensor)
    return list(found.values())


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A leaf module called inside a segment (the module is one of the segment's inputs)."""
    return module(*args, **kwargs)
