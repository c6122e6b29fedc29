"""The masked-weight op: inactive weights cannot reach the output and get exactly zero gradient.

Invariant 3 of docs/DESIGN.md needs two things of every sparsified weight ``w`` with mask ``m``:
the forward must compute with ``w * m`` whatever values the inactive entries hold, and the
weight's gradient must be ``dL/d(w*m) * m``. The op keeps both with as few weight-sized passes as
possible, and with no per-weight work in the forward of an ordinary step:

- Forward. Inactive weights are kept at exactly zero in the parameter itself, so ``w * m == w``
  and the consumer reads ``w`` directly. The graph's first node, :func:`zero_dirty`, remembers
  the weight's (and mask's) version counter at which it last zeroed the inactive entries; any
  in-place change of either since then (an optimizer step, a user's edit, ``load_state_dict``)
  makes it zero them again, in place, before use. An optimizer step that provably keeps zeros
  at zero (an elementwise optimizer fed masked gradients from zeroed state, see
  :func:`fxsparse.RigLScheduler`) may mark the weights clean, and then ordinary steps pay no
  forward pass at all.
- Backward. Since ``w == w * m``, autograd's ``dL/dw`` is ``dL/d(w*m)``; a hook that runs when
  the gradient has been accumulated into ``w.grad`` (``register_post_accumulate_grad_hook``,
  installed by the prologue) multiplies it by ``m`` in place: one pass, no allocation, the
  total over every use of ``w`` and any loss term outside the module. ``torch.autograd.grad``
  does not accumulate into ``.grad`` and so returns the unmasked ``dL/d(w*m)``.
- Growth. RigL grows by ``|dL/d(w*m)|``, dense over inactive entries too. The per-weight node
  of the graph hooks that gradient only while :attr:`Masker.armed` was set at forward time (the
  update steps); otherwise it hands the weight through, so ordinary steps keep no dense tensor
  beyond autograd's own.

The persistent masks are bool (the public contract); the multiplies use a cached copy in the
weight's dtype, since float-times-bool runs several times slower than float-times-float on CPU
(PyTorch's mixed-dtype loop is not vectorized; ``benchmarks/mask_dtype.py`` measures it). The
cache is keyed by the bool mask's identity and version counter.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["Masker", "mask_grad_", "zero_inactive_", "zero_dirty", "ZERO_PRESERVING_OPTIMIZERS"]


@torch.no_grad()
def mask_grad_(weight: torch.Tensor, mask: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """Multiplies ``weight.grad`` by ``mask`` (of the weight's dtype); returns the new grad.

    In place unless ``inplace`` is False (then ``.grad`` is replaced by a new tensor).
    """
    grad = weight.grad
    if inplace:
        return grad.mul_(mask)
    weight.grad = grad * mask
    return weight.grad


class _GradMaskHook:
    """The post-accumulate-grad hook of one sparsified parameter.

    Holds its :class:`Masker` weakly and acts only while the masker still serves this very
    parameter: a hook left on a parameter the module no longer uses (after ``.to()`` replaced
    it, say) does nothing and keeps nothing alive.
    """

    def __init__(self, masker: Masker, name: str) -> None:
        self.masker = weakref.ref(masker)
        self.name = name

    def __call__(self, param: torch.Tensor) -> None:
        masker = self.masker()
        if masker is not None and param.grad is not None and masker.serves(self.name, param):
            masker.mask_gradient(self.name, param)


class _CaptureHook(_GradMaskHook):
    """The growth-gradient hook of a weight used inside an opaque leaf: the parameter's total
    gradient of one backward, before it is accumulated and masked (``dL/d(w*m)``, as ``w`` holds
    zeros where ``m`` does), recorded while the masker is armed."""

    def __call__(self, grad: torch.Tensor) -> None:  # type: ignore[override]
        masker = self.masker()
        if masker is not None and masker.armed:
            masker._record(self.name, grad)


@torch.no_grad()
def zero_inactive_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Sets the inactive entries of ``weight`` to zero, in place (``mask`` of its dtype)."""
    weight.mul_(mask)


@torch.fx.node.has_side_effect
@torch.compiler.disable
def zero_dirty(
    masker: Masker, names: tuple[str, ...], weights: list[torch.Tensor], masks: list[torch.Tensor],
    hooked: tuple[str, ...] = (),
) -> None:
    """The prologue of every SparseGraphModule forward: see :meth:`Masker.zero_dirty`.

    It runs eagerly (under torch.compile it is where the graph starts), before any weight is read.
    """
    masker.zero_dirty(names, weights, masks, hooked)


# Optimizers whose step is elementwise: a zero weight with zero gradient and zero state stays
# exactly zero (weight decay, momentum, Adam's moments and AdamW's decay all multiply or add
# zeros). Not in the list: anything that mixes entries (Shampoo, Muon, LBFGS).
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
    torch.optim.Adagrad, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
)


class Masker(nn.Module):
    """The one module every masked-weight node of a SparseGraphModule calls.

    It holds no parameters or buffers (the masks live beside their weights); it switches the
    capture of growth gradients, stores them by weight FQN, and caches per weight the compute
    mask and the versions at which the inactive entries were last known to be zero.

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
        self._clean: dict[str, tuple[int, int, int, int]] = {}
        self._grad_tokens: dict[str, tuple[int, int]] = {}
        self._masks: dict[str, torch.Tensor] = {}  # the mask the prologue last saw, by name
        self._hooked: dict[str, weakref.ref[torch.Tensor]] = {}  # the parameter hooked, by name

    def forward(self, weight: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
        # The graph's prologue (zero_dirty) has already zeroed the inactive entries of `weight`
        # and hooked its gradient; an ordinary step hands the weight through untouched.
        if not (self.armed and torch.is_grad_enabled() and weight.requires_grad):
            return weight
        return self._capture(weight, name)

    @torch.compiler.disable
    def _capture(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        # Under torch.compile an armed forward breaks the graph here: the hook that keeps the
        # dense growth gradient runs eagerly, on update steps only (dynamo guards on `armed`).
        out = weight.view_as(weight)
        out.register_hook(functools.partial(self._record, name))
        return out

    def zero_dirty(
        self, names: tuple[str, ...], weights: list[torch.Tensor], masks: list[torch.Tensor],
        hooked: tuple[str, ...] = (),
    ) -> None:
        """Zeroes the inactive entries of every weight changed since they were last zeroed, and
        makes sure each weight's gradient is masked when it is accumulated. Weights named in
        ``hooked`` (used inside opaque leaf modules, where no masked-weight node sees them) also
        get their dense growth gradient captured by a hook on the parameter."""
        for name, weight, mask in zip(names, weights, masks):
            if self._clean.get(name) != _versions(weight, mask):
                zero_inactive_(weight, self.compute_mask(name, mask, weight))
                self._clean[name] = _versions(weight, mask)
            self._masks[name] = mask
            if not self.serves(name, weight) and weight.requires_grad:
                weight.register_post_accumulate_grad_hook(_GradMaskHook(self, name))
                if name in hooked:
                    weight.register_hook(_CaptureHook(self, name))
                self._hooked[name] = weakref.ref(weight)

    def serves(self, name: str, weight: torch.Tensor) -> bool:
        """True when ``weight`` is the parameter this masker masks the gradient of as ``name``."""
        ref = self._hooked.get(name)
        return ref is not None and ref() is weight

    def mask_gradient(self, name: str, weight: torch.Tensor) -> None:
        """Multiplies ``weight.grad`` by its mask (the post-accumulate-grad hook's work).

        In place, except while a captured dense gradient of this weight is held: it may share
        the storage that autograd accumulated into ``.grad``.
        """
        values = self.compute_mask(name, self._masks[name], weight)
        grad = mask_grad_(weight, values, inplace=name not in self.grads)
        # which tensor, at which version, left here masked: if the weight's .grad is still
        # exactly this at the optimizer step, its inactive entries are exactly zero
        self._grad_tokens[name] = (grad.data_ptr(), grad._version)

    def mark_clean(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Records that ``weight``'s inactive entries are zero now (so the forward may skip it)."""
        self._clean[name] = _versions(weight, mask)

    def is_clean(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> bool:
        """True when nothing changed ``weight`` or ``mask`` since its inactive entries were zeroed."""
        return self._clean.get(name) == _versions(weight, mask)

    def trusted_weights(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, weight, mask)`` of every weight the last forward's prologue hooked whose
        inactive entries are still zero and whose ``.grad`` is absent or exactly as the
        gradient hook left it: an elementwise optimizer step keeps those entries zero.

        Reads the prologue's own records (no module lookups): a parameter replaced since that
        forward is simply not listed, and so is zeroed again by the next forward.
        """
        trusted = []
        for name, ref in self._hooked.items():
            weight, mask = ref(), self._masks.get(name)
            if weight is None or mask is None or not self.is_clean(name, weight, mask):
                continue
            if weight.grad is None or self.grad_is_masked(name, weight):
                trusted.append((name, weight, mask))
        return trusted

    def grad_is_masked(self, name: str, weight: torch.Tensor) -> bool:
        """True when ``weight.grad`` is untouched since this op's backward masked it."""
        grad = weight.grad
        return grad is not None and self._grad_tokens.get(name) == (grad.data_ptr(), grad._version)

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
        # Copies and pickles rebuild the caches from their own tensors.
        state = dict(super().__getstate__())
        state["_compute_masks"] = {}
        state["_clean"] = {}
        state["_grad_tokens"] = {}
        state["_masks"] = {}
        state["_hooked"] = {}  # the copy's prologue hooks the copy's own parameters
        return state

    def extra_repr(self) -> str:
        return f"armed={self.armed}, accumulate={self.accumulate}, captured={len(self.grads)}"


def _versions(weight: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int, int]:
    # identities too: a module moved with .to() holds new tensors at old version numbers
    return (id(weight), weight._version, id(mask), mask._version)
