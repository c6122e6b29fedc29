"""The masked-weight op: ``w * mask`` forward, ``grad * mask`` to ``w``, dense grad kept on demand.

RigL grows connections by ``|dL/d(w*m)|``, the gradient with respect to the *masked* weight,
dense over inactive positions too. That gradient flows through the op's output anyway; the op
hooks it only while :attr:`Masker.armed` was set at forward time (the update steps), so ordinary
steps keep no dense tensor beyond autograd's own.

Cost: one multiply in the forward and one in the backward (``grad * mask``, in place where
the graph allows): the two weight-sized passes that invariant 3 needs (inactive weights cannot
reach the output, and get exactly zero gradient). The persistent masks are bool
(the public contract), but a float-times-bool multiply runs about 6x slower on CPU than
float-times-float (PyTorch's mixed-dtype loop is not vectorized; see benchmarks/step_time.py),
so the op multiplies by a cached copy of the mask in the weight's dtype. The cache is keyed by
the bool mask's identity and version counter, so any in-place change of a mask (a topology
update, ``load_state_dict``, a user's edit) refreshes it before the next forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

__all__ = ["Masker", "masked_weight"]


class _MaskedWeight(torch.autograd.Function):
    """``w * m``; backward gives ``grad * m`` to ``w``, in place when the graph allows it."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.inplace = inplace
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if ctx.inplace:
            # the gradient is a fresh tensor that only this op reads (see mask_weights), so
            # masking it in place saves a weight-sized allocation and its page faults
            return grad.mul_(mask), None, None
        return grad * mask, None, None


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``weight * mask`` (mask in the weight's dtype) whose weight gradient is masked.

    ``inplace`` lets the backward mask the incoming gradient in place; only safe when no other
    node of the graph reads that gradient (the masked weight feeds conv/linear/matmul directly).
    """
    return _MaskedWeight.apply(weight, mask, inplace)


class Masker(nn.Module):
    """The one module every masked-weight node of a SparseGraphModule calls.

    It holds no parameters or buffers (the masks live beside their weights); it switches the
    capture of growth gradients, stores them by weight FQN, and caches the compute masks.

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
        self._compute_masks: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def forward(
        self, weight: torch.Tensor, mask: torch.Tensor, name: str, inplace: bool = False
    ) -> torch.Tensor:
        if torch.compiler.is_compiling() and not self.armed:
            # inductor fuses the cast into the multiply (and the backward's); no cache needed
            return weight * mask.to(weight.dtype)
        return self._eager(weight, mask, name, inplace)

    @torch.compiler.disable
    def _eager(self, weight: torch.Tensor, mask: torch.Tensor, name: str, inplace: bool) -> torch.Tensor:
        # Under torch.compile an armed forward breaks the graph here: the hook that keeps the
        # dense growth gradient runs eagerly, on update steps only (dynamo guards on `armed`).
        armed = self.armed and torch.is_grad_enabled() and weight.requires_grad
        # when armed, a hook keeps the dense gradient, so it must not be masked in place
        out = masked_weight(weight, self.compute_mask(name, mask, weight), inplace and not armed)
        if armed:
            out.register_hook(functools.partial(self._record, name))
        return out

    def compute_mask(self, name: str, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``mask`` in ``weight``'s dtype and device, rebuilt when the mask changed in place."""
        entry = self._compute_masks.get(name)
        if (
            entry is None
            or entry[0] is not mask
            or entry[1] != mask._version
            or entry[2].dtype != weight.dtype
            or entry[2].device != weight.device
        ):
            values = mask.detach().to(device=weight.device, dtype=weight.dtype)
            entry = (mask, mask._version, values)
            self._compute_masks[name] = entry
        return entry[2]

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

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # Copies and pickles rebuild the cache from their own masks.
        state = dict(state)
        state["_compute_masks"] = {}
        return state

    def extra_repr(self) -> str:
        return f"armed={self.armed}, accumulate={self.accumulate}, captured={len(self.grads)}"
