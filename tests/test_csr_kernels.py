"""The compact layer's kernels (fxsparse/layouts/compact/kernels.py): each technology computes the dense
products at the active positions, on any CSR structure, and a layer falls back to torch's
kernels where numba cannot run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fxsparse.layouts.compact import kernels as csr_kernels
from fxsparse.layouts.compact import CompactWeight, compact_linear
from fxsparse.layouts.compact.kernels import NumbaConvKernels, NumbaKernels, TorchConvKernels, TorchKernels, kernels_for
from fxsparse.masking import Masker

pytest.importorskip("numba")


def _products(kernels, layer: CompactWeight, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    values = layer.values.detach()
    saved = kernels.save(x)
    out = x.new_empty(x.shape[0], layer.rows)
    kernels.forward(layer, values, saved, out)
    operand = kernels.grad_operand(dy)
    return [out, kernels.input_grad(layer, values, operand), kernels.value_grad(layer, values, saved, operand),
            kernels.dense_grad(saved, operand)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 23), cols=st.integers(1, 23), n=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]), dtype=st.sampled_from([torch.float32, torch.float64]),
    block=st.sampled_from([1, 3, 16, 4096]), seed=st.integers(0, 10**6),
)
def test_each_kernel_computes_the_dense_products_at_the_active_positions(rows, cols, n, density, dtype, block, seed):
    """Every row length (the four-at-a-time loop and its remainder, empty rows, a full matrix,
    an empty one) and batch blocks that split the batch anywhere."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) < density
    weight = torch.randn(rows, cols, generator=generator, dtype=dtype) * mask
    x = torch.randn(n, cols, generator=generator, dtype=dtype)
    dy = torch.randn(n, rows, generator=generator, dtype=dtype)
    layer = CompactWeight("w", weight, mask)
    want = [x @ weight.t(), dy @ weight, (dy.t() @ x)[mask], dy.t() @ x]
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    saved_block = csr_kernels.BLOCK
    csr_kernels.BLOCK = block
    try:
        for kernels in (NumbaKernels, TorchKernels):
            for got, expected in zip(_products(kernels, layer, x, dy), want):
                torch.testing.assert_close(got, expected, **tolerance)
    finally:
        csr_kernels.BLOCK = saved_block


@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_layer_with_either_kernel_trains_as_the_masked_product(kernel, transposed):
    torch.manual_seed(2)
    mask = torch.rand(33, 17) < 0.2
    weight = (torch.randn(33, 17, dtype=torch.float64) * mask).requires_grad_()
    layer = CompactWeight("w", weight.detach(), mask, transposed, kernel=kernel)
    layer.values.requires_grad_()
    x = torch.randn(5, 9, 33 if transposed else 17, dtype=torch.float64, requires_grad=True)
    out = compact_linear(x, layer, Masker())
    reference = x @ weight if transposed else torch.nn.functional.linear(x, weight)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.values], grad)
    want = torch.autograd.grad(reference, [x, weight], grad)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1][mask] if not transposed else want[1].t()[mask.t()])


def test_layers_fall_back_to_torch_where_numba_cannot_run(monkeypatch):
    values = torch.zeros(3)
    assert kernels_for("numba", values) is NumbaKernels
    assert kernels_for("torch", values) is TorchKernels
    assert kernels_for("numba", values.to(torch.bfloat16)) is TorchKernels  # autocast, bf16 layers
    assert kernels_for("numba", values.to("meta")) is TorchKernels
    monkeypatch.setattr(csr_kernels, "numba_available", lambda: False)
    assert kernels_for("numba", values) is TorchKernels
    assert CompactWeight("w", torch.ones(2, 2), torch.eye(2, dtype=torch.bool)).kernel == "torch"



@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_channels=st.integers(1, 9), in_channels=st.integers(1, 6), kernel=st.sampled_from([(1, 1), (3, 3), (5, 3), (2, 4)]),
    height=st.integers(4, 9), width=st.integers(4, 9), padding=st.sampled_from([(0, 0), (1, 1), (2, 1), (0, 2)]),
    batch=st.integers(1, 5), density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), samples=st.sampled_from([1, 4]),
    seed=st.integers(0, 10**6),
)
def test_each_convolution_kernel_computes_the_dense_convolution_and_its_gradients(
        out_channels, in_channels, kernel, height, width, padding, batch, density, samples, seed):
    assume(kernel != (1, 1) or padding != (0, 0))  # a 1x1 kernel without padding is a linear map (pointwise)
    generator = torch.Generator().manual_seed(seed)
    shape = (out_channels, in_channels, *kernel)
    mask = torch.rand(shape, generator=generator) < density
    weight = torch.randn(shape, generator=generator, dtype=torch.float64) * mask
    x = torch.randn(batch, in_channels, height, width, generator=generator, dtype=torch.float64)
    layer = CompactWeight("w", weight, mask, stride=(1, 1), padding=padding)
    if height + 2 * padding[0] < kernel[0] or width + 2 * padding[1] < kernel[1]:  # refused as torch refuses it
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            F.conv2d(x, weight, padding=padding)
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            compact_linear(x, layer, Masker())
        return
    out = F.conv2d(x, weight, padding=padding)
    dy = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    dx, dw = torch.nn.grad.conv2d_input(x.shape, weight, dy, padding=padding), torch.nn.grad.conv2d_weight(x, shape, dy, padding=padding)
    saved_samples = csr_kernels.SAMPLES
    csr_kernels.SAMPLES = samples
    try:
        for kernels in (NumbaConvKernels, TorchConvKernels):
            values = layer.values.detach()
            saved, operand = kernels.save(layer, x), kernels.grad_operand(layer, dy)
            torch.testing.assert_close(kernels.forward(layer, values, saved), out)
            torch.testing.assert_close(kernels.input_grad(layer, values, operand, x.shape), dx)
            torch.testing.assert_close(kernels.value_grad(layer, values, saved, operand), dw[mask])
            torch.testing.assert_close(kernels.dense_grad(layer, saved, operand), dw)
    finally:
        csr_kernels.SAMPLES = saved_samples


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_channels=st.integers(1, 7), in_channels=st.integers(1, 5), kernel=st.sampled_from([(3, 3), (5, 3), (2, 4), (1, 3)]),
    stride=st.sampled_from([(2, 2), (2, 1), (3, 2), (1, 3)]), height=st.integers(3, 11), width=st.integers(3, 11),
    padding=st.sampled_from([(0, 0), (1, 1), (2, 1)]), batch=st.integers(1, 3), density=st.sampled_from([0.0, 0.2, 1.0]),
    armed=st.booleans(), kernels=st.sampled_from(["numba", "torch"]), seed=st.integers(0, 10**6),
)
def test_a_strided_kxk_layer_is_the_strided_convolution_and_its_gradients(
        out_channels, in_channels, kernel, stride, height, width, padding, batch, density, armed, kernels, seed):
    # a stride > 1 runs the stride-1 kernels on the input's phases (fxsparse.layouts.compact.weight.phases)
    generator = torch.Generator().manual_seed(seed)
    shape = (out_channels, in_channels, *kernel)
    mask = torch.rand(shape, generator=generator) < density
    weight = (torch.randn(shape, generator=generator, dtype=torch.float64) * mask).requires_grad_()
    x = torch.randn(batch, in_channels, height, width, generator=generator, dtype=torch.float64, requires_grad=True)
    layer = CompactWeight("w", weight.detach(), mask, stride=stride, padding=padding, kernel=kernels)
    layer.values.requires_grad_()
    masker = Masker()
    masker.armed = armed
    if height + 2 * padding[0] < kernel[0] or width + 2 * padding[1] < kernel[1]:  # refused as torch refuses it
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            compact_linear(x, layer, masker)
        return
    out = F.conv2d(x, weight, stride=stride, padding=padding)
    dy = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    dx, dw = torch.autograd.grad(out, (x, weight), dy)
    compact = compact_linear(x, layer, masker)
    torch.testing.assert_close(compact, out)
    compact.backward(dy)
    torch.testing.assert_close(x.grad, dx)
    order = layer.weight_order()  # the values are held in the phases' order
    torch.testing.assert_close(layer.values.grad[order], dw[mask])
    torch.testing.assert_close(layer.dense(), weight.detach())
    assert torch.equal(layer.mask(), mask)
    if armed:  # the growth gradient in the weight's shape
        torch.testing.assert_close(masker.grads["w"], dw)


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_a_kxk_layer_with_either_kernel_is_the_convolution_with_bias_unbatched_and_armed(kernel):
    torch.manual_seed(3)
    mask = torch.rand(5, 4, 3, 3) < 0.3
    weight = (torch.randn(5, 4, 3, 3, dtype=torch.float64) * mask).requires_grad_()
    layer = CompactWeight("w", weight.detach(), mask, stride=(1, 1), padding=(1, 1), kernel=kernel)
    layer.values.requires_grad_()
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    masker = Masker()
    masker.armed = True
    out = compact_linear(x, layer, masker, bias)
    reference = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.values, bias], grad)
    want = torch.autograd.grad(reference, [x, weight, bias], grad)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(masker.grads["w"], want[1])  # the growth gradient, in the weight's shape
    torch.testing.assert_close(got[1], want[1][mask])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(compact_linear(x[0], layer, masker, bias), reference[0])  # (C, H, W)
    with pytest.raises(ValueError, match="kxk convolution's with its stride and padding"):
        CompactWeight("w", weight.detach(), mask, stride=(2, 2))  # a kxk kernel needs its padding


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       transposed=st.booleans(), seed=st.integers(0, 10**6))
def test_the_transposed_structure_is_the_same_from_numba_and_from_torch(rows, cols, density, transposed, seed):
    """The transpose's CSR structure (the input gradient's) by numba's counting sort equals the
    stable argsort's."""
    from fxsparse.layouts.compact import weight as weight_module

    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) < density
    w = torch.randn(rows, cols, generator=generator) * mask
    by_numba = CompactWeight("w", w, mask, transposed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weight_module, "numba_available", lambda: False)
        by_torch = CompactWeight("w", w, mask, transposed)
    for name in ("crow", "col", "t_crow", "t_col", "t_perm", "values"):
        assert torch.equal(getattr(by_numba, name), getattr(by_torch, name)), name
