"""The masked-weight op: inactive weights cannot reach the output and get exactly zero gradient.

Invariant 3 (docs/invariants.md) needs two things of every sparsified weight ``w`` with mask ``m``:
the forward must compute with ``w * m`` whatever values the inactive entries hold, and the
weight's gradient must be ``dL/d(w*m) * m``. It must hold on every path by which code can edit a
weight: an optimizer step (foreach or fused), ``torch.no_grad()`` in place, ``copy_``,
``nn.init``, ``load_state_dict`` (``assign=`` too), ``torch.utils.swap_tensors``, and ``.data``
(assignment or in place), which PyTorch does not record anywhere: ``p.data`` is a new tensor
with its own version counter, so no version check, hook or identity can tell that it changed.
The op therefore trusts nothing and costs one weight-sized pass per forward:

- Forward. The graph's first node, :func:`mask_prologue`, sets the inactive entries of every
  sparsified weight to exactly zero, in place, before anything reads them. It clears their bits
  (its bits, as integers, times the bool mask), so NaN and inf become zero
  too, at the speed of a float multiply; it writes through ``.data``, so the weight's version
  counter does not move (the values an earlier forward saved for its backward are unchanged
  unless an edit had already changed them). The consumer then reads ``w`` directly
  (``w * m == w``). A weight that is not a leaf (``torch.nn.utils.parametrize`` computes it
  each forward) is never written: the per-weight node computes ``where(m, w, 0)`` out of place
  instead, and autograd masks its gradient.
- Backward. Since ``w == w * m``, autograd's ``dL/dw`` is ``dL/d(w*m)``; when the backward pass
  has finished, the inactive bits of every ``w.grad`` it accumulated into are cleared in place:
  one pass, no allocation, the total over every use of ``w`` and any loss term outside the
  module. A hook that runs when a gradient has been accumulated into ``w.grad``
  (``register_post_accumulate_grad_hook``, installed by the prologue on any parameter that
  lacks it) notes the weight and, for the first one of a backward, queues the masking pass as
  one of autograd's final callbacks, which re-queues itself once so that it runs after every
  callback queued during the backward (DistributedDataParallel's copy of its averaged buckets
  into ``.grad`` among them). One pass at the end costs less than a pass in each hook, in the
  middle of the backward's own traffic. ``torch.autograd.grad`` does not accumulate into
  ``.grad`` and so returns the unmasked ``dL/d(w*m)``.
- Growth. RigL grows by ``|dL/d(w*m)|``, dense over inactive entries too. The per-weight node
  of the graph hooks that gradient only while :attr:`Masker.armed` was set at forward time (the
  update steps); otherwise it hands the weight through, so ordinary steps keep no dense tensor
  beyond autograd's own. Where the coming update is known to rank that gradient alone, one
  backward per step, per layer counts kept (a scheduler's RigL step: :attr:`Masker.plan`), the
  hook keeps only what the update can choose from (:func:`fxsparse.topology.growth_candidates`:
  the best inactive entries and the active ones), so an update step holds no dense copy either.

The only mask is the bool buffer (the public contract; 1 byte a weight). The passes multiply the
weight's bits, viewed as integers of its element width, by it in place (``bits * 1`` keeps an
active entry bit for bit, ``bits * 0`` zeroes an inactive one, NaN and inf included). PyTorch
converts the bool operand to the integer type on the fly and multiplies with vector
instructions, about twice as fast as a float-times-bool multiply (``benchmarks/mask_dtype.py``)
and as fast as an ``and`` with a persistent integer copy of the mask, without the 4 bytes a
float32 weight such a copy would hold. A large weight is multiplied in slices, so that the
converted mask of a slice stays in the cache (:func:`_mul_bits`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsparse.sharding import is_sharded, local
from fxsparse.topology import GrowthCandidates, growth_candidates

__all__ = ["Masker", "MASKER", "UPDATES", "mask_grad_", "zero_inactive_", "zero_inactive_all_", "mask_grads_all_", "mask_prologue", "mask_on", "bit_mask", "masked_nodes"]

MASKER = "fxsparse_masker"  # the name of a SparseGraphModule's Masker submodule
UPDATES = "fxsparse_updates"  # the name of its buffer counting topology updates


def masked_nodes(graph: torch.fx.Graph, masker: str, fqn: str) -> list[torch.fx.Node]:
    """The masked-weight nodes (calls of the ``masker`` submodule) of the weight ``fqn``."""
    return [n for n in graph.nodes if n.op == "call_module" and n.target == masker and n.kwargs.get("name") == fqn]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def mask_on(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as the multiplier of ``like``'s bits: the bool mask itself, on ``like``'s device.
    ``bits(like) * mask`` keeps every bit of an active entry (``x * 1``) and zeroes an inactive
    one (``x * 0``), NaN and inf patterns included: an integer-times-bool multiply, about twice
    as fast as a float-times-bool one on CPU."""
    return local(mask).to(device=local(like).device, dtype=torch.bool)


bit_mask = mask_on  # its name while it returned an integer copy of the mask


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    # an integer view of the same memory, outside autograd (no version-counter bump on `tensor`);
    # of a sharded tensor, the rank's own part
    tensor = local(tensor)
    return tensor.data.view(_BITS[tensor.element_size()])


# PyTorch multiplies integers by a bool tensor by first converting the whole bool operand to a
# temporary of the integer type. For a large weight that temporary is bigger than the caches
# and than glibc's largest reusable block (32 MiB), so each pass maps and faults in fresh pages:
# 1.2-1.3 ns a weight at 9-45 M weights against 0.25-0.28 ns in slices of 2**18 (whose 1 MiB
# temporary stays in the L2 cache), measured on this project's 2-core host
# (`benchmarks/mask_dtype.py --large`). Smaller weights are multiplied whole: a slice costs a
# few microseconds of dispatch.
_SLICE = 1 << 18
_SLICED_ABOVE = 1 << 21


def _flat(tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor``'s elements in memory order as one flat view, or None when they are not one
    dense block (a view with gaps) or not laid out like a standard memory format."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).view(-1)  # the permuted tensor is contiguous: a view, never a copy
    return None


def _mul_bits(out: torch.Tensor, bits: torch.Tensor, mask: torch.Tensor) -> None:
    """``out = bits * mask`` (``out`` may be ``bits``), in slices for a large weight."""
    # the same shape and strides: one layout, so the three flatten alike (or none does)
    if bits.numel() > _SLICED_ABOVE and bits.stride() == mask.stride() == out.stride():
        flat_bits, flat_mask, flat_out = _flat(bits), _flat(mask), _flat(out)
        if flat_bits is not None:
            for start in range(0, flat_bits.numel(), _SLICE):
                end = start + _SLICE
                torch.mul(flat_bits[start:end], flat_mask[start:end], out=flat_out[start:end])
            return
    torch.mul(bits, mask, out=out)


def _mul_bits_all(bits: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """``b *= m`` for every pair, in place: the large ones in slices (:func:`_mul_bits`), the
    others in one ``torch._foreach_mul_`` call. A Python loop here would run between the
    kernels, where each Python step costs microseconds on cold caches."""
    small_bits, small_masks = [], []
    for b, m in zip(bits, masks):
        if b.numel() > _SLICED_ABOVE or b.device != m.device:
            _mul_bits(b, b, m)
        else:
            small_bits.append(b)
            small_masks.append(m)
    if small_bits:
        torch._foreach_mul_(small_bits, small_masks)


def zero_inactive_all_(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """:func:`zero_inactive_` of every weight (masks from :func:`mask_on`), in one call."""
    _mul_bits_all([_bits(w) for w in weights], masks)


def mask_grads_all_(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """:func:`mask_grad_` in place of every weight's ``.grad`` (masks from :func:`mask_on`), in one call."""
    _mul_bits_all([_bits(w.grad) for w in weights], masks)


def mask_grad_(weight: torch.Tensor, mask: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """Sets the inactive entries of ``weight.grad`` to zero (``mask`` from :func:`mask_on`);
    returns the new grad. In place unless ``inplace`` is False (then ``.grad`` is replaced)."""
    grad = weight.grad
    if inplace:
        bits = _bits(grad)
        _mul_bits(bits, bits, mask)
        return grad
    # a masked copy in the same pass: as much memory traffic as masking in place
    masked = torch.empty_like(grad)
    _mul_bits(_bits(masked), _bits(grad), mask)
    weight.grad = masked
    return masked


def zero_inactive_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Sets the inactive entries of ``weight`` to exactly zero, in place, without bumping its
    version counter (``mask`` from :func:`mask_on`)."""
    bits = _bits(weight)
    _mul_bits(bits, bits, mask)


class _Pending:
    """What the gradient hooks of one :class:`Masker` share: the weights a running backward
    accumulated gradients into (masked when it ends) and the backward the pass is queued on."""

    __slots__ = ("due", "task", "masker")

    def __init__(self, masker: Masker) -> None:
        self.due: dict[str, torch.Tensor] = {}
        self.task: int | None = None
        self.masker = weakref.ref(masker)

    def first(self, task: int) -> None:
        """The first gradient of a backward (or a call outside autograd's engine): queue the
        masking pass, or run it now."""
        masker = self.masker()
        if masker is None:  # the module is gone: keep nothing alive
            self.due.clear()
        elif task < 0:  # not inside autograd's engine: nothing to wait for
            masker.flush_gradients()
        else:
            self.task = task
            torch.autograd.Variable._execution_engine.queue_callback(masker._queue_last)


_graph_task = torch._C._current_graph_task_id


class _GradMaskHook:
    """The post-accumulate-grad hook of one sparsified parameter.

    It only notes the parameter (and queues the masking pass for the first of a backward):
    it runs between the backward's kernels, where every Python step costs microseconds on
    cold caches (about 30 us a hook on a ViT before it was cut to this). The pass at the end
    masks a noted gradient only while the masker still serves that very parameter: a hook
    left on a parameter the module no longer uses (after ``.to()`` replaced it, or
    ``swap_tensors`` moved it) changes nothing, and holds the masker weakly.
    """

    __slots__ = ("pending", "name")

    def __init__(self, masker: Masker, name: str) -> None:
        self.pending = masker._pending
        self.name = name

    def masker(self) -> Masker | None:
        return self.pending.masker()

    def __call__(self, param: torch.Tensor) -> None:
        pending = self.pending
        pending.due[self.name] = param
        task = _graph_task()
        if pending.task != task:
            pending.first(task)


class _RecordHook:
    """The growth-gradient hook of a weight used inside an opaque leaf: the parameter's total
    gradient of one backward, before it is accumulated and masked (``dL/d(w*m)``, as ``w`` holds
    zeros where ``m`` does), recorded while the masker is armed."""

    def __init__(self, masker: Masker, name: str) -> None:
        self.masker = weakref.ref(masker)
        self.name = name

    def __call__(self, grad: torch.Tensor) -> None:
        masker = self.masker()
        if masker is not None and masker.armed:
            masker._record(self.name, grad)


@torch.fx.node.has_side_effect
@torch.compiler.disable
def mask_prologue(
    masker: Masker, names: tuple[str, ...], weights: list[torch.Tensor], masks: list[torch.Tensor],
    hooked: tuple[str, ...] = (),
) -> None:
    """The prologue of every SparseGraphModule forward: see :meth:`Masker.prologue`.

    It runs eagerly (under torch.compile it is where the graph starts), before any weight is read.
    """
    masker.prologue(names, weights, masks, hooked)


zero_dirty = mask_prologue  # the name graphs pickled by fxsparse <= 0.1 call


class Masker(nn.Module):
    """The one module every masked-weight node of a SparseGraphModule calls.

    It holds no parameters or buffers (the masks live beside their weights); it switches the
    recording of growth gradients, stores them by weight FQN, and caches per weight the integer
    mask and which parameter object it masks the gradient of.

    Attributes:
        armed: while True, forwards record ``dL/d(w*m)`` in :attr:`grads` during backward.
        accumulate: sum recorded gradients over every backward since the last clear (gradient
            accumulation over micro-batches). When False, a new backward pass replaces the
            previous one's gradient and uses within one pass are summed.
        grads: recorded dense gradients by weight FQN.
        plan: weight FQN -> how many the coming update grows at most: for these weights the
            recorded gradient is reduced, as the backward produces it, to
            :attr:`candidates` (set by a scheduler's :meth:`arm_growth`; exact for one
            backward per armed step, see :func:`fxsparse.topology.growth_candidates`).
        candidates: the reduced growth gradients of one backward, by weight FQN.
        spoiled: planned weights that got a second gradient while armed (a sum of backward
            passes cannot be ranked from candidates).
        backwards: backward passes that ended since the counter was reset (the scheduler counts
            them per step).
        sharded: the weights are sharded (FSDP2's ``fully_shard``; :mod:`fxsparse.sharding`):
            the shards are zeroed before FSDP gathers them and their gradients masked and
            recorded when the backward ends, so the graph's own prologue and masked-weight
            nodes hand the gathered weights through.
    """

    def __init__(self) -> None:
        super().__init__()
        self.armed = True
        self.accumulate = False
        self.grads: dict[str, torch.Tensor] = {}
        self._tasks: dict[str, int] = {}
        self._masks: dict[str, torch.Tensor] = {}  # the mask the prologue last saw, by name
        # by name: the parameter whose gradient is masked, as (id, tensor implementation)
        self._served: dict[str, tuple[int, int]] = {}
        self._pending = _Pending(self)  # gradients accumulated, masked when the backward ends
        self.plan: dict[str, int] = {}
        self.candidates: dict[str, GrowthCandidates] = {}
        self.spoiled: set[str] = set()
        self.backwards = 0
        self.sharded = False

    def forward(self, weight: torch.Tensor, mask: torch.Tensor, name: str, kernel: bool = False) -> torch.Tensor:
        if kernel:  # a kernel computed from the weight (fxsparse.kernels): masked out of place, always
            weight = torch.where(mask, weight, weight.new_zeros(()))
        elif self.sharded:  # a gathered weight, built from zeroed shards; its gradient is recorded on the shard
            return weight
        elif weight.grad_fn is not None:
            # computed each forward (a parametrization): masked out of place, never written
            weight = torch.where(mask, weight, weight.new_zeros(()))
        # Otherwise the prologue has already zeroed the inactive entries of `weight` and hooked
        # its gradient; an ordinary step hands the weight through untouched.
        if not (self.armed and torch.is_grad_enabled() and weight.requires_grad):
            return weight
        return self._record_gradient(weight, name)

    @torch.compiler.disable
    def _record_gradient(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        # Under torch.compile an armed forward breaks the graph here: the hook that keeps the
        # dense growth gradient runs eagerly, on update steps only (dynamo guards on `armed`).
        out = weight.view_as(weight)
        out.register_hook(functools.partial(self._record, name))
        return out

    def prologue(
        self, names: tuple[str, ...], weights: list[torch.Tensor], masks: list[torch.Tensor],
        hooked: tuple[str, ...] = (),
    ) -> None:
        """Zeroes the inactive entries of every weight, and makes sure each weight's gradient is
        masked when it is accumulated. Weights named in ``hooked`` (used inside opaque leaf
        modules, where no masked-weight node sees them) also get their dense growth gradient
        recorded by a hook on the parameter."""
        if self.sharded:  # the shards were zeroed before FSDP gathered these weights
            return
        leaves, on = [], []
        for name, weight, mask in zip(names, weights, masks):
            self._masks[name] = mask
            if weight.grad_fn is not None:
                continue  # not a parameter but computed from one: the masked-weight node masks it
            leaves.append(weight)
            on.append(mask_on(mask, weight))
            if weight.requires_grad and self._served.get(name) != (id(weight), weight._cdata):
                self._hook(name, weight, name in hooked)
        zero_inactive_all_(leaves, on)

    def _hook(self, name: str, weight: torch.Tensor, record: bool) -> None:
        """Makes ``weight`` the parameter whose gradient is masked as ``name`` (a new module, a
        copy, a parameter replaced by ``.to()`` or ``load_state_dict(assign=True)``)."""
        served = self._served.get(name)
        table = weight._post_accumulate_grad_hooks
        if served is not None and served[0] == id(weight) and table:
            # torch.utils.swap_tensors gave this object another tensor: its hook table stayed
            # with the object, but the hooks now run for the other one. Re-wire a fresh table.
            others = [h for h in table.values() if not (isinstance(h, _GradMaskHook) and h.masker() is self)]
            weight._post_accumulate_grad_hooks = None
            for hook in others:
                weight.register_post_accumulate_grad_hook(hook)
        weight.register_post_accumulate_grad_hook(_GradMaskHook(self, name))
        if record:
            weight.register_hook(_RecordHook(self, name))
        self._served[name] = (id(weight), weight._cdata)

    def serves(self, name: str, weight: torch.Tensor) -> bool:
        """True when ``weight`` is the parameter this masker masks the gradient of as ``name``."""
        return self._served.get(name) == (id(weight), weight._cdata)

    def mask_after_backward(self, name: str, weight: torch.Tensor) -> None:
        """Masks ``weight.grad`` once the running backward pass has finished (see the module
        docstring): what the post-accumulate-grad hook does."""
        _GradMaskHook(self, name)(weight)

    def _queue_last(self) -> None:
        # runs among the final callbacks; re-queued, it runs after those queued before it
        torch.autograd.Variable._execution_engine.queue_callback(self.flush_gradients)

    def flush_gradients(self) -> None:
        """Masks every gradient accumulated since the last flush (the end of a backward)."""
        pending = self._pending
        due, pending.due, pending.task = pending.due, {}, None
        self.backwards += 1
        if self.sharded:
            self._flush_shards(due)
            return
        leaves, on = [], []
        for name, weight, grad in self._served_grads(due):
            if name in self.grads:  # a recorded gradient may share .grad's storage: a masked copy
                self.mask_gradient(name, weight)
            else:
                leaves.append(weight)
                on.append(mask_on(self._masks[name], grad))
        mask_grads_all_(leaves, on)

    def _served_grads(self, due: dict[str, torch.Tensor]) -> Any:
        """(name, parameter, its gradient) of the noted parameters that have a gradient and that
        this masker still serves."""
        for name, weight in due.items():
            if weight.grad is not None and self.serves(name, weight):
                yield name, weight, weight.grad

    def _flush_shards(self, due: dict[str, torch.Tensor]) -> None:
        """The end of a backward on sharded weights: each rank's part of the reduce-scattered
        gradient is dense (the forward read ``w == w * m``): kept as the growth gradient while
        armed, then masked in place."""
        bits, on = [], []
        for name, _, grad in self._served_grads(due):
            mask = self._masks[name]
            if self.armed:
                self._record_shard(name, grad, mask)
            bits.append(_bits(grad))
            on.append(mask_on(mask, grad))
        _mul_bits_all(bits, on)

    def _record_shard(self, name: str, grad: torch.Tensor, mask: torch.Tensor) -> None:
        dense = local(grad).detach().clone()
        held = self.grads.get(name)
        if held is not None and self.accumulate and is_sharded(held):
            # .grad kept accumulating, but its inactive entries were masked after the last
            # backward: add back what was recorded there
            dense += torch.where(local(mask), 0, local(held))
        self.grads[name] = type(grad).from_local(dense, grad.device_mesh, grad.placements, run_check=False,
                                                 shape=grad.shape, stride=grad.stride()) if is_sharded(grad) else dense

    def mask_gradient(self, name: str, weight: torch.Tensor) -> None:
        """Zeroes the inactive entries of ``weight.grad`` (the post-accumulate-grad hook's work).

        In place, except while a recorded dense gradient of this weight is held: it may share
        the storage that autograd accumulated into ``.grad``.
        """
        mask_grad_(weight, self.mask_on(name, self._masks[name], weight), inplace=name not in self.grads)

    def mask_on(self, name: str, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``mask`` as :func:`mask_on` of ``weight``: the bool mask itself (on its device)."""
        return mask_on(mask.detach(), weight)

    bit_mask = mask_on  # its name while it returned an integer copy of the mask

    def record(self, name: str, grad: torch.Tensor) -> None:
        """Records ``grad`` as the dense growth gradient of the weight ``name`` (in its shape):
        what a layout that computes its own product (:mod:`fxsparse.layouts`) calls in its
        backward on an armed step. Several calls in one backward add up."""
        self._record(name, grad)

    def _record(self, name: str, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        grad = grad.detach()
        if name in self.plan and self._reduce(name, grad):
            return
        if name in self.grads and (self.accumulate or self._tasks.get(name) == task):
            self.grads[name] = self.grads[name] + grad
        else:
            self.grads[name] = grad
        self._tasks[name] = task

    def _reduce(self, name: str, grad: torch.Tensor) -> bool:
        """Keeps ``grad`` as growth candidates; False when it must be kept dense instead."""
        mask = self._masks.get(name)
        if mask is None or grad.device.type != "cpu" or mask.device.type != "cpu" or grad.shape != mask.shape:
            return False
        if name in self.candidates or name in self.spoiled:  # a second gradient: not summable
            self.candidates.pop(name, None)
            self.spoiled.add(name)
            return True
        self.candidates[name] = growth_candidates(mask.detach(), grad, self.plan[name])
        return True

    def note_backward(self) -> None:
        """A backward reached a layer that has no masked weight to note (a compact layer): the
        end of that backward is counted (:attr:`backwards`) as a masked weight's would be."""
        pending = self._pending
        task = _graph_task()
        if pending.task != task:
            pending.first(task)

    def keep_candidates(self, name: str, make: Callable[[int], GrowthCandidates]) -> bool:
        """For a layer that makes its own growth candidates (a compact layer, block by block,
        without the dense gradient): keeps ``make(count)`` when the update plans candidates for
        ``name``; False when it wants the dense gradient instead (:meth:`_record` it)."""
        if name not in self.plan:
            return False
        if name in self.candidates or name in self.spoiled:  # a second gradient: not summable
            self.candidates.pop(name, None)
            self.spoiled.add(name)
            return True
        self.candidates[name] = make(self.plan[name])
        return True

    def clear(self) -> None:
        """Forgets every recorded gradient (and growth candidates)."""
        self.grads.clear()
        self._tasks.clear()
        self.candidates.clear()
        self.spoiled.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles rebuild the caches from their own tensors.
        state = dict(super().__getstate__())
        state["_masks"] = {}
        state["_served"] = {}  # the copy's prologue hooks the copy's own parameters
        state["_pending"] = None  # made anew for the copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.pop("_due", None)  # pickled by fxsparse <= 0.4
        self.__dict__.pop("_queued", None)
        self._pending = _Pending(self)
        for key, default in (("plan", {}), ("candidates", {}), ("spoiled", set()), ("backwards", 0), ("sharded", False)):
            self.__dict__.setdefault(key, default)  # pickled by fxsparse <= 0.4
        self.__dict__.pop("_bit_masks", None)  # pickled by fxsparse <= 0.3: a per-weight integer cache

    def extra_repr(self) -> str:
        return f"armed={self.armed}, accumulate={self.accumulate}, recorded={len(self.grads)}"
