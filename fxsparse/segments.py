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
    ``options`` (``preserve_rng_state``, ``determinism_check``, ...) passed on."""
    if not torch.is_grad_enabled():
        return segment(*inputs)
    return checkpoint(segment, *inputs, use_reentrant=False, **dict(options))


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A leaf module called inside a segment (the module is one of the segment's inputs)."""
    return module(*args, **kwargs)
