"""The masked-weight op: ``w * mask`` forward, ``grad * mask`` to ``w``, dense grad kept on demand.

RigL grows connections by ``|dL/d(w*m)|``, the gradient with respect to the *masked* weight,
dense over inactive positions too. That gradient flows through this op's backward anyway; the op
keeps a reference to it only while :attr:`Masker.armed` was set at forward time (the update
steps), so ordinary steps keep no dense tensor beyond autograd's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Masker", "masked_weight"]


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: torch.Tensor, mask: torch.Tensor, capture: Masker | None, name: str
    ) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.capture = capture
        ctx.name = name
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (mask,) = ctx.saved_tensors
        if ctx.capture is not None:
            ctx.capture._record(ctx.name, grad)
        return grad * mask, None, None, None


def masked_weight(
    weight: torch.Tensor, mask: torch.Tensor, capture: Masker | None = None, name: str = ""
) -> torch.Tensor:
    """``weight * mask`` whose weight gradient is masked; ``capture`` keeps the dense one."""
    return _MaskedWeight.apply(weight, mask, capture, name)


class Masker(nn.Module):
    """The one module every masked-weight node of a SparseGraphModule calls.

    It holds no parameters or buffers (the masks live beside their weights); it only switches
    the capture of growth gradients and stores them, by weight FQN.

    Attributes:
        armed: while True, forwards record ``dL/d(w*m)`` in :attr:`grads` during backward.
        accumulate: sum captured gradients over every backward since the last clear (gradient
            accumulation over micro-batches). When False, a new backward pass replaces the
            previous one's gradient and uses within one pass are summed.
        grads: captured dense gradients by weight FQN.
    """

    def __init__(self) -> None:
        super().__init__()
        self.armed = True
        self.accumulate = False
        self.grads: dict[str, torch.Tensor] = {}
        self._tasks: dict[str, int] = {}

    def forward(self, weight: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
        capture = self if self.armed and torch.is_grad_enabled() else None
        return _MaskedWeight.apply(weight, mask, capture, name)

    def _record(self, name: str, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        grad = grad.detach()
        if name in self.grads and (self.accumulate or self._tasks.get(name) == task):
            self.grads[name] = self.grads[name] + grad
        else:
            self.grads[name] = grad
        self._tasks[name] = task

    def clear(self) -> None:
        """Forgets every captured gradient."""
        self.grads.clear()
        self._tasks.clear()

    def extra_repr(self) -> str:
        return f"armed={self.armed}, accumulate={self.accumulate}, captured={len(self.grads)}"
