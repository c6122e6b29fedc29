"""The masked op's mechanics: what the forward writes, what it leaves alone, and the hooks.

The edit-path property suite (test_edit_paths.py) checks the invariant end to end; these tests
pin down the pieces it relies on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import fxsparse
from fxsparse import masking
from invariants import assert_inactive_no_influence

pytestmark = pytest.mark.usefixtures("front_end")  # every test under both front-ends (tests/frontends.py)


def _sparse(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return fxsparse.sparsify(net, 0.3)


def _inactive_grads_zero(sparse):
    return all(bool(sparse.sparse_weights[f].grad[~m].eq(0).all()) for f, m in sparse.masks.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_zeroing_clears_every_bit_pattern_and_keeps_active_bits(dtype):
    weight = torch.randn(7, 9).to(dtype)
    mask = torch.rand(7, 9) < 0.4
    weight[~mask & (torch.rand(7, 9) < 0.5)] = float("nan")
    weight[~mask & (torch.rand(7, 9) < 0.5)] = float("-inf")
    active = weight[mask].clone()
    masking.zero_inactive_(weight, masking.bit_mask(mask, weight))
    assert torch.equal(weight[mask].view(torch.int8), active.view(torch.int8))  # bit for bit
    assert bool(weight[~mask].eq(0).all()) and not bool(torch.signbit(weight[~mask]).any())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced view"])
def test_a_large_weight_is_masked_in_slices_exactly(monkeypatch, layout):
    """Above a size the passes go slice by slice (the whole-tensor integer temporary would not
    fit the caches); each slice must cover the same weights of the weight and of its mask, in
    every layout, and a layout that is not one dense block must still be masked whole."""
    monkeypatch.setattr(masking, "_SLICE", 7)  # slices that do not divide the sizes below
    monkeypatch.setattr(masking, "_SLICED_ABOVE", 20)
    torch.manual_seed(0)
    weight = torch.randn(4, 6, 3, 5)
    if layout == "channels_last":
        weight = weight.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        weight = weight.flatten(1).t()  # (90, 4) with transposed strides
    elif layout == "sliced view":
        weight = weight[:, :, :, 1:4]  # gaps between rows: not one block
    mask = torch.empty_like(weight, dtype=torch.bool).copy_(torch.rand(weight.shape) < 0.4)
    weight[~mask & (torch.rand(weight.shape) < 0.5)] = float("nan")
    weight.grad = torch.empty_like(weight).copy_(torch.randn(weight.shape))
    active, active_grad = weight[mask].clone(), weight.grad[mask].clone()
    masking.zero_inactive_(weight, masking.bit_mask(mask, weight))
    assert torch.equal(weight[mask].view(torch.int32), active.view(torch.int32))
    assert bool(weight[~mask].eq(0).all()) and not bool(torch.signbit(weight[~mask]).any())
    grad = weight.grad
    masked = masking.mask_grad_(weight, masking.bit_mask(mask, weight), inplace=False)
    assert masked is weight.grad and masked.stride() == grad.stride()
    assert torch.equal(masked[mask], active_grad) and bool(masked[~mask].eq(0).all())
    assert bool(grad[~mask].ne(0).any())  # the unmasked gradient is left as it was
    masking.mask_grad_(weight, masking.bit_mask(mask, weight))
    assert torch.equal(weight.grad, masked)


def test_every_forward_zeroes_without_moving_the_version_counter():
    sparse = _sparse()
    x = torch.randn(5, 16)
    weight = sparse.sparse_weights["0.weight"]
    sparse(x)
    version = weight._version
    weight.data.add_(1.0)  # invisible to version counters
    out = sparse(x)
    assert weight._version == version
    sparse.verify()
    assert_inactive_no_influence(sparse, x)
    assert out.shape == (5, 4)


def test_two_forwards_then_one_backward_is_not_an_autograd_error():
    sparse = _sparse()
    x = torch.randn(5, 16)
    first = sparse(x).square().sum()
    sparse.sparse_weights["0.weight"].data.mul_(2.0)  # a .data edit between the two forwards
    second = sparse(x).square().sum()
    (first + second).backward()
    assert _inactive_grads_zero(sparse)


def test_gradients_are_masked_after_every_way_of_replacing_the_parameter():
    sparse = _sparse()
    x = torch.randn(5, 16)
    for replace in (
        lambda s: s.load_state_dict({k: v.clone() for k, v in s.state_dict().items()}, assign=True),
        lambda s: torch.utils.swap_tensors(s.sparse_weights["0.weight"], torch.nn.Parameter(torch.randn(32, 16))),
        lambda s: s.to(torch.float64),
        lambda s: s.to(torch.float32),
    ):
        sparse(x.to(next(sparse.parameters()).dtype)).sum().backward()  # hooks on the old tensors
        replace(sparse)
        sparse.zero_grad()
        sparse(x.to(next(sparse.parameters()).dtype)).square().sum().backward()
        assert _inactive_grads_zero(sparse)


def test_a_parametrized_weight_is_masked_out_of_place_and_never_written():
    class Shift(torch.nn.Module):
        def forward(self, w):
            return w + 1.0

    sparse = _sparse()
    x = torch.randn(5, 16)
    parametrize.register_parametrization(sparse.get_submodule("0"), "weight", Shift())
    original = sparse.sparse_weights["0.weight"]
    assert original is sparse.get_submodule("0").parametrizations.weight.original
    before = original.detach().clone()
    out = sparse(x)
    out.square().sum().backward()
    assert torch.equal(original.detach(), before)
    mask = sparse.masks["0.weight"]
    expected = torch.nn.functional.linear(x, torch.where(mask, before + 1.0, 0.0), sparse.get_parameter("0.bias"))
    expected = torch.nn.functional.linear(expected.relu(), sparse.get_parameter("2.weight"), sparse.get_parameter("2.bias"))
    torch.testing.assert_close(out, expected)
    assert bool(original.grad[~mask].eq(0).all())
    sparse.rigl_step(0.3)  # the update works on the parametrization's original
    sparse.verify()


def test_rezero_and_state_dict_give_exact_zeros_after_an_edit():
    sparse = _sparse()
    sparse.sparse_weights["2.weight"].data.fill_(float("nan"))
    sparse.sparse_weights["0.weight"].data.add_(3.0)
    with pytest.raises(RuntimeError, match="inactive weights are not zero.*rezero"):
        sparse.verify()
    state = sparse.state_dict()
    for fqn, mask in sparse.masks.items():
        assert bool(state[fqn][~mask].eq(0).all())
    sparse.sparse_weights["0.weight"].data.add_(3.0)
    sparse.rezero()
    sparse.verify()


def test_a_copy_masks_its_own_gradients_and_the_original_its_own():
    sparse = _sparse()
    x = torch.randn(5, 16)
    copied = copy.deepcopy(sparse)
    for module in (copied, sparse, copied, sparse):
        module.zero_grad()
        module(x).square().sum().backward()
        assert _inactive_grads_zero(module)


def test_a_parametrization_on_one_owner_of_a_tied_weight_computes_as_in_eager(front_end):
    if front_end == "export":
        pytest.skip(
            "torch.export reads a tied weight under one name for all its owners, so a "
            "parametrization added to one owner after capture cannot apply to that owner alone "
            "(docs/transformers.md: limits of capture='export')"
        )
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    class Shift(torch.nn.Module):
        def forward(self, w):
            return w + 1.0

    torch.manual_seed(0)
    sparse = fxsparse.sparsify(Tied(), 0.5)
    parametrize.register_parametrization(sparse.get_submodule("a"), "weight", Shift())
    x = torch.randn(3, 6)
    mask, w = sparse.masks["a.weight"], sparse.sparse_weights["a.weight"].detach()
    expected = torch.tanh(x @ torch.where(mask, w + 1.0, 0.0).T) @ torch.where(mask, w, 0.0).T
    torch.testing.assert_close(sparse(x), expected)  # `a` computes with P(w), `b` with w


def test_gradients_are_masked_once_per_backward_when_it_ends(monkeypatch):
    sparse = _sparse()
    x = torch.randn(5, 16)
    flushes = []
    original = masking.Masker.flush_gradients
    monkeypatch.setattr(masking.Masker, "flush_gradients", lambda self: (flushes.append(len(self._pending.due)), original(self))[1])
    seen_in_hook = []

    def peek(param):  # a user's hook, registered after fxsparse's: the mask has not run yet
        seen_in_hook.append(param.grad.clone())

    sparse(x)  # the prologue hooks the parameters
    weight = sparse.sparse_weights["0.weight"]
    weight.register_post_accumulate_grad_hook(peek)
    sparse(x).square().sum().backward()
    assert flushes == [2] and _inactive_grads_zero(sparse)  # one pass for both weights
    assert bool(seen_in_hook[0][~sparse.masks["0.weight"]].ne(0).any())
    sparse(x).square().sum().backward()  # accumulation: the sum is masked again
    assert flushes == [2, 2] and _inactive_grads_zero(sparse)


def test_a_backward_that_fails_midway_does_not_stop_later_ones_from_masking():
    sparse = _sparse()
    x = torch.randn(5, 16)

    def fail(grad):
        raise RuntimeError("boom")

    out = sparse(x)
    handle = out.register_hook(lambda g: g)
    inner = sparse.sparse_weights["0.weight"]
    h = inner.register_hook(fail)  # raises during the backward, after the second layer accumulated
    with pytest.raises(RuntimeError, match="boom"):
        out.square().sum().backward()
    h.remove()
    handle.remove()
    for p in sparse.parameters():
        p.grad = None
    sparse(x).square().sum().backward()
    assert _inactive_grads_zero(sparse)


def test_gradients_are_masked_under_reentrant_checkpointing():
    from torch.utils.checkpoint import checkpoint

    sparse = _sparse()
    x = torch.randn(5, 16, requires_grad=True)
    checkpoint(sparse, x, use_reentrant=True).square().sum().backward()
    assert _inactive_grads_zero(sparse)
    for p in sparse.parameters():
        p.grad = None
    checkpoint(sparse, x, use_reentrant=False).square().sum().backward()
    assert _inactive_grads_zero(sparse)


def test_the_only_mask_a_module_keeps_is_the_bool_one():
    """Memory: per sparse weight the module holds its bool mask (1 byte a weight) and nothing
    else (the passes multiply the weight's bits by it), whatever the layout of the weight
    (channels-last, transposed)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 10),
    )
    sparse = fxsparse.sparsify(net, 0.3)
    sparse.get_parameter("2.weight").data = sparse.get_parameter("2.weight").data.to(memory_format=torch.channels_last)
    linear = sparse.get_parameter("4.weight")
    linear.data = linear.data.t().contiguous().t()  # transposed strides
    sparse.arm_growth(False)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        sparse.zero_grad(set_to_none=True)
        sparse(x).sum().backward()
    assert_inactive_no_influence(sparse, x)
    for fqn, mask in sparse.masks.items():
        weight = sparse.get_parameter(fqn)
        assert bool(weight[~mask].eq(0).all()) and bool(weight.grad[~mask].eq(0).all()), fqn
    assert weight.grad is not None
    masker = sparse.masker
    held = [t for t in masker.__dict__.values() if isinstance(t, torch.Tensor)]
    held += [t for d in masker.__dict__.values() if isinstance(d, dict) for t in d.values() if isinstance(t, torch.Tensor)]
    buffers = {m.data_ptr() for m in sparse.masks.values()} | {p.data_ptr() for p in sparse.parameters()}
    own = [t for t in held if t.data_ptr() not in buffers]  # beyond references to the module's own tensors
    assert sum(t.numel() * t.element_size() for t in own) == 0  # no integer copy, no scratch
    assert all(m.dtype is torch.bool for m in sparse.masks.values())


def test_an_armed_step_masks_the_gradient_and_keeps_the_dense_one_apart():
    torch.manual_seed(0)
    sparse = fxsparse.sparsify(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)), 0.3)
    x = torch.randn(5, 16)
    sparse(x).sum().backward()  # armed: a fresh module captures
    for fqn, mask in sparse.masks.items():
        grad, dense = sparse.get_parameter(fqn).grad, sparse.masker.grads[fqn]
        assert grad.untyped_storage().data_ptr() != dense.untyped_storage().data_ptr(), fqn
        assert not bool(grad[~mask].any()) and bool(dense[~mask].ne(0).any()), fqn
        torch.testing.assert_close(grad[mask], dense[mask], rtol=0, atol=0)
