"""The compact layout: a sparse weight stored as its active values only, computed by sparse kernels.

A :class:`CompactWeight` holds one weight of a linear layer (``F.linear(x, W, b)``, ``W`` of shape
``(out, in)``), of a product by a weight (``x @ W``, held as ``W.T``) or of a 1x1 convolution
without padding or groups (``(out, in, 1, 1)``: a linear map of each strided pixel's channels) as

- ``values``: a trainable Parameter of the ``k`` active entries, in row-major order of the
  matrix computed with (a CSR matrix's value order);
- ``crow`` / ``col`` (int32): that matrix's CSR row offsets and column indices;
- ``t_crow`` / ``t_col`` (int32) and ``t_perm`` (int64): the CSR structure of its transpose, whose
  values are ``values[t_perm]`` (the input gradient's matrix, refreshed by a gather).

The inactive entries do not exist: nothing zeroes them and no gradient is masked. One custom
autograd Function, :class:`_CompactLinear`, runs the layer's kernels (:mod:`fxsparse.layouts.compact.kernels`:
numba's threaded CSR loops on the CPU, ``torch.sparse`` elsewhere; ``CompactWeight.kernel`` is
the layer's preference, chosen by timing at ``sparsify``):

- forward: ``y = x W^T + b``;
- input gradient: ``dX = dY W``;
- value gradient: ``dY^T X`` at the active positions only, or, on armed (update) steps, the dense
  ``dY^T X``, recorded by the Masker as the growth gradient (RigL's cost model: one dense weight
  gradient every ``delta_t`` steps) and read at the active positions.

The topology is changed by :meth:`CompactWeight.assign`: given the new mask (the update loop of
:mod:`fxsparse.methods` decides it on the dense view, so both layouts decide alike), the kept
connections keep their value, their gradient and every optimizer state tensor of the values'
shape; new connections start at zero (invariants 1 and 4). The number of active weights is
fixed per layer, so methods that move counts between layers refuse this layout.

Every tensor here is device-generic (``torch.sparse`` CSR runs cuSPARSE on CUDA); under autocast
the layer computes in the values' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxsparse.layouts.compact.kernels import conv_kernels_for, csr_tensor, kernels_for, numba_available, preferred, run_loop
from fxsparse.topology import growth_candidates, merged_candidates

__all__ = ["CompactWeight", "compact_linear", "dense_product", "density_rule", "matmul_add", "SPATIAL_BREAK_EVEN"]


class CompactWeight(nn.Module):
    """One sparse weight in the compact layout (see the module docstring).

    Args:
        fqn: the weight's FQN in the original model.
        weight: the dense weight (its active entries become ``values``).
        mask: its bool mask.
        transposed: the weight is the right operand of ``x @ W`` (held as ``W.T``).
        stride: the weight is a convolution's, ``(out, in, kh, kw)``, of this stride (one group):
            a 1x1 kernel without padding is a linear map of every (strided) pixel's channels; a
            kxk kernel (``padding`` given) is computed by the convolution kernels of
            :mod:`fxsparse.layouts.compact.kernels` (the matrix ``out x (in*kh*kw)``); at a stride
            ``s > 1`` as the stride-1 convolution of its input's ``s0*s1`` phases (the matrix
            ``out x (in*s0*s1*ceil(kh/s0)*ceil(kw/s1))``, :func:`phases`).
        padding: a kxk convolution's padding ``(p0, p1)``.
        kernel: the kernels preferred (``"numba"`` or ``"torch"``, :mod:`fxsparse.layouts.compact.kernels`);
            default: numba where it runs on the weight's device and dtype.
    """

    kernel = "torch"  # the kernels preferred; set per layer (a layer pickled before it had one: torch)
    conv_stride = (1, 1)  # a kxk convolution's stride
    phase_kernel: tuple[int, int] | None = None  # at a stride > 1: the kernel of the phases' convolution

    def __init__(
        self, fqn: str, weight: torch.Tensor, mask: torch.Tensor, transposed: bool = False,
        stride: tuple[int, int] | None = None, kernel: str | None = None, padding: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        conv = stride is not None and weight.dim() == 4 and not transposed
        pointwise = conv and tuple(weight.shape[2:]) == (1, 1) and padding in (None, (0, 0))
        spatial = conv and not pointwise and padding is not None
        if not (weight.dim() == 2 or pointwise or spatial) or weight.shape != mask.shape:
            raise ValueError(
                f"expected a 2-D weight (or a 1x1 convolution's with its stride, or a kxk convolution's with its stride "
                f"and padding) and a mask of its shape, got {tuple(weight.shape)} and {tuple(mask.shape)}"
            )
        self.fqn = fqn
        self.kernel = kernel or preferred(weight.device, weight.dtype)
        self.transposed = transposed
        self.stride = tuple(stride) if pointwise else None  # type: ignore[arg-type]
        self.kernel_size = tuple(weight.shape[2:]) if spatial else None
        self.padding = tuple(padding) if spatial else None  # type: ignore[arg-type]
        self.shape = tuple(weight.shape)
        self.rows, self.cols = (self.shape[1], self.shape[0]) if transposed else (self.shape[0], math.prod(self.shape[1:]))
        if spatial and tuple(stride) != (1, 1):  # type: ignore[arg-type]
            self.conv_stride = tuple(stride)  # type: ignore[arg-type]
            (s0, s1), (kh, kw) = self.conv_stride, self.kernel_size  # type: ignore[misc]
            self.phase_kernel = (-(-kh // s0), -(-kw // s1))
            self.cols = self.shape[1] * s0 * s1 * self.phase_kernel[0] * self.phase_kernel[1]
            self.register_buffer("phase_index", _phase_index(self.shape, self.conv_stride, self.phase_kernel, self.cols),
                                 persistent=False)
        count = int(mask.sum())
        device = weight.device
        self.values = nn.Parameter(torch.zeros(count, dtype=weight.dtype, device=device), requires_grad=weight.requires_grad)
        for name, size, dtype in (("crow", self.rows + 1, torch.int32), ("col", count, torch.int32),
                                  ("t_crow", self.cols + 1, torch.int32), ("t_col", count, torch.int32),
                                  ("t_perm", count, torch.int64)):
            self.register_buffer(name, torch.zeros(size, dtype=dtype, device=device), persistent=False)
        self.load(weight, mask)

    # ------------------------------------------------------------------------------ structure
    def _matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (of the weight's shape) as the matrix computed with."""
        if self.phase_kernel is not None:  # zeros at the phases' taps past the kernel
            flat = tensor.new_zeros(self.rows * self.cols)
            flat[self.phase_index] = tensor.reshape(-1)
            return flat.view(self.rows, self.cols)
        return tensor.t() if self.transposed else tensor.reshape(self.rows, self.cols)

    def full(self, matrix: torch.Tensor) -> torch.Tensor:
        """A matrix computed with (``rows x cols``) in the weight's shape."""
        if self.phase_kernel is not None:
            return matrix.reshape(-1)[self.phase_index].view(self.shape)
        return matrix.t().contiguous() if self.transposed else matrix.reshape(self.shape)

    def _structure(self, matrix_mask: torch.Tensor) -> torch.Tensor:
        """Sets the index buffers from a mask in the matrix's orientation; returns the flat
        row-major positions of the active entries (the values' order)."""
        return self._set_positions(torch.nonzero(matrix_mask.reshape(-1)).flatten())

    def _set_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Sets the index buffers from the ascending flat positions (in the matrix computed
        with) of the active entries; returns them."""
        rows, cols = positions // self.cols, positions % self.cols
        self.crow.copy_(torch.cat([rows.new_zeros(1), torch.cumsum(torch.bincount(rows, minlength=self.rows), 0)]))
        self.col.copy_(cols)
        self.t_crow.copy_(torch.cat([cols.new_zeros(1), torch.cumsum(torch.bincount(cols, minlength=self.cols), 0)]))
        if positions.device.type == "cpu" and numba_available():  # a counting sort, one pass
            run_loop("csr_transpose", self.crow, self.col, self.t_crow, self.t_col, self.t_perm)
        else:
            order = torch.argsort(cols.to(torch.int32), stable=True)  # row-major already: by column, rows kept in order
            self.t_perm.copy_(order)
            self.t_col.copy_(rows[order])
        return positions

    def positions(self) -> torch.Tensor:
        """The flat row-major positions (in the matrix computed with) of the values, in order."""
        counts = self.crow[1:] - self.crow[:-1]
        rows = torch.repeat_interleave(torch.arange(self.rows, device=self.col.device), counts.long())
        return rows * self.cols + self.col.long()

    @torch.no_grad()
    def load(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Takes the topology of ``mask`` and the values of ``weight`` at it (a checkpoint in the
        masked layout's format); the values keep their Parameter object (resized only when the
        checkpoint's count differs)."""
        matrix_mask = self._matrix(mask.to(torch.bool))
        count = int(matrix_mask.sum())
        if count != self.values.numel():
            self.values.data = self.values.new_zeros(count)
            for name in ("col", "t_col", "t_perm"):
                setattr(self, name, getattr(self, name).new_zeros(count))
        positions = self._structure(matrix_mask)
        self.values.copy_(self._matrix(weight.detach()).reshape(-1)[positions].to(self.values.dtype))

    def weight_order(self) -> torch.Tensor | None:
        """The permutation that puts the values in ascending position of the weight's own shape
        (``W`` of ``x @ W`` is held transposed), or None when that is their order already."""
        if self.phase_kernel is not None:
            where = torch.full((self.rows * self.cols,), -1, dtype=torch.long, device=self.phase_index.device)
            where[self.phase_index] = torch.arange(self.phase_index.numel(), device=where.device)
            return torch.argsort(where[self.positions()])
        return self.t_perm if self.transposed else None

    def growth_candidates(self, grad_rows: Callable[[int, int], torch.Tensor], count: int,
                          chunk_elements: int = 1 << 22) -> Any:
        """The growth candidates (:class:`fxsparse.topology.GrowthCandidates`) of the dense
        gradient, made from ``grad_rows(r0, r1)`` (rows ``r0:r1`` of the dense gradient in the
        weight's shape, flattened to 2-D) a block of rows at a time: the dense gradient never
        exists whole (:func:`fxsparse.topology.merged_candidates`)."""
        crow, col = (self.t_crow, self.t_col) if self.transposed else (self.crow, self.col)
        rows, width = (self.cols, self.rows) if self.transposed else (self.rows, self.cols)
        step = max(1, chunk_elements // max(1, width))

        def parts() -> Iterator[tuple[int, Any]]:
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                counts = (crow[r0 + 1:r1 + 1] - crow[r0:r1]).long()
                mask = torch.zeros(r1 - r0, width, dtype=torch.bool, device=col.device)
                mask[torch.repeat_interleave(torch.arange(r1 - r0, device=col.device), counts),
                     col[int(crow[r0]):int(crow[r1])].long()] = True
                yield r0 * width, growth_candidates(mask, grad_rows(r0, r1).contiguous(), count)

        return merged_candidates(parts(), count)

    # ---------------------------------------------------------------------------------- views
    def mask(self) -> torch.Tensor:
        """The bool mask, in the weight's shape (a new tensor)."""
        flat = torch.zeros(self.rows * self.cols, dtype=torch.bool, device=self.values.device)
        flat[self.positions()] = True
        return self.full(flat.view(self.rows, self.cols))

    def dense(self) -> torch.Tensor:
        """The weight as a dense tensor of its shape, zeros at inactive entries (a new tensor)."""
        flat = self.values.new_zeros(self.rows * self.cols)
        flat[self.positions()] = self.values.detach()
        return self.full(flat.view(self.rows, self.cols))

    def csr(self) -> torch.Tensor:
        return csr_tensor(self.crow, self.col, self.values, (self.rows, self.cols))

    def dense_product(self) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        """The dense op this layer computes, as ``(fn, kwargs)`` called ``fn(x, weight, bias,
        **kwargs)`` with the dense weight (:meth:`dense`): what inference export and FLOP counting
        put in the layer's place."""
        return dense_product(self.transposed, self.stride, self.padding, self.conv_stride)

    # ---------------------------------------------------------------------------------- update
    @torch.no_grad()
    def assign(self, mask: torch.Tensor, states: Iterable[torch.Tensor] = ()) -> None:
        """Moves to the topology ``mask`` (weight orientation, the same count): kept connections
        keep their value and the entries of ``states`` (the gradient, optimizer state tensors of
        the values' shape) follow them; new ones start at zero. Works on the active positions
        (a gather and a sorted search), with no dense index of slots."""
        matrix_mask = self._matrix(mask.to(torch.bool))
        if int(matrix_mask.sum()) != self.values.numel():
            raise ValueError(
                f"fxsparse: the compact layout of {self.fqn!r} holds {self.values.numel()} active weights, the new "
                f"mask {int(matrix_mask.sum())}: compact layers keep their count"
            )
        old = self.positions()
        keep = matrix_mask.reshape(-1)[old]
        self._move(keep, torch.searchsorted(self._structure(matrix_mask), old[keep]), states)

    @torch.no_grad()
    def move(self, dropped: torch.Tensor, grown: torch.Tensor, states: Iterable[torch.Tensor] = ()) -> None:
        """:meth:`assign` from the update itself: ``dropped`` and ``grown`` are flat positions in
        the weight's shape (a :class:`fxsparse.topology.TopologyUpdate`'s), as many of each; no
        dense mask is read or made (the kept positions are found by a sorted search among the
        active ones)."""
        if dropped.numel() != grown.numel():
            raise ValueError(
                f"fxsparse: the compact layout of {self.fqn!r} keeps its count, but this update drops "
                f"{dropped.numel()} and grows {grown.numel()}"
            )
        old = self.positions()
        keep = torch.ones(old.numel(), dtype=torch.bool, device=old.device)
        if dropped.numel():
            keep[torch.searchsorted(old, self._matrix_positions(dropped.to(old.device)))] = False
        kept, born = old[keep], self._matrix_positions(grown.to(old.device)).sort().values
        # merge two sorted runs: each entry's slot is its rank in its run plus the other run's entries before it
        slots = torch.arange(kept.numel(), device=old.device) + torch.searchsorted(born, kept)
        new = old.new_empty(old.numel())
        new[slots] = kept
        new[torch.arange(born.numel(), device=old.device) + torch.searchsorted(kept, born)] = born
        self._set_positions(new)
        self._move(keep, slots, states)

    def _matrix_positions(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat positions in the weight's shape as positions in the matrix computed with."""
        if self.phase_kernel is not None:
            return self.phase_index[flat]
        if self.transposed:  # W (in, out) held as W^T (out, in)
            return (flat % self.shape[1]) * self.shape[0] + flat // self.shape[1]
        return flat

    def _move(self, keep: torch.Tensor, slots: torch.Tensor, states: Iterable[torch.Tensor]) -> None:
        """The kept entries (``keep`` over the old positions) move to ``slots`` among the new ones
        with their value and state; the other slots (new connections) start at zero."""
        for tensor in (self.values, *states):
            moved = torch.zeros_like(tensor)
            moved[slots] = tensor[keep]
            tensor.copy_(moved)

    def extra_repr(self) -> str:
        kind = (", transposed" if self.transposed else f", 1x1 conv, stride {self.stride}" if self.stride
                else f", {self.kernel_size} conv, stride {self.conv_stride}, padding {self.padding}" if self.kernel_size
                else "")
        return f"{self.fqn}: {self.shape}, {self.values.numel()} active{kind}, {self.kernel} kernels"

    # the masked layout's checkpoint format (dense weight + bool mask) is written by the
    # SparseGraphModule that owns this layer, so the values are neither saved nor loaded here
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        return None

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        return None


def dense_product(transposed: bool, stride: tuple[int, int] | None, padding: tuple[int, int] | None,
                  conv_stride: tuple[int, int] = (1, 1)) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    """The dense op of a compact layer of this geometry (:meth:`CompactWeight.dense_product`):
    ``x @ W + b`` (``transposed``), a 1x1 convolution of ``stride``, a kxk convolution of
    ``padding`` and ``conv_stride``, else a linear layer."""
    if transposed:
        return matmul_add, {}
    if stride is not None:
        return F.conv2d, {"stride": tuple(stride)}
    if padding is not None:
        return F.conv2d, {"padding": tuple(padding), **({"stride": tuple(conv_stride)} if tuple(conv_stride) != (1, 1) else {})}
    return F.linear, {}


def _phase_index(shape: tuple[int, ...], stride: tuple[int, int], kernel: tuple[int, int], cols: int) -> torch.Tensor:
    """Per entry of a weight ``(out, in, kh, kw)`` in row-major order, its flat position in the
    matrix of its phases' convolution: tap ``(i, j)`` is tap ``(i // s0, j // s1)`` of phase
    ``(i % s0, j % s1)``; column ``((c * s0 + i % s0) * s1 + j % s1) * kq0 * kq1 + (i // s0) * kq1 + j // s1``."""
    (s0, s1), (kq0, kq1) = stride, kernel
    o, c, i, j = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    col = ((c * s0 + i % s0) * s1 + j % s1) * (kq0 * kq1) + (i // s0) * kq1 + j // s1
    return (o * cols + col).reshape(-1)


class _Phases:
    """A strided kxk layer as the stride-1 convolution its kernels compute: over the ``s0*s1``
    phases of its padded input (:func:`phases`), with the kernel ``layer.phase_kernel`` and no
    padding. Every other attribute (the CSR structure, ``positions``) is the layer's."""

    def __init__(self, layer: CompactWeight) -> None:
        kq0, kq1 = layer.phase_kernel  # type: ignore[misc]
        self.layer, self.kernel_size, self.padding = layer, (kq0, kq1), (0, 0)
        self.shape = (layer.rows, layer.cols // (kq0 * kq1), kq0, kq1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)


def phases(layer: CompactWeight, x: torch.Tensor) -> torch.Tensor:
    """The padded batch ``x`` ``(N, C, H, W)`` of a strided kxk layer as its phases ``(N,
    C*s0*s1, Hq, Wq)``: channel ``(c * s0 + r0) * s1 + r1`` holds rows ``r0::s0`` and columns
    ``r1::s1`` of channel ``c``, cut (or zero-extended) to ``Ho + kq0 - 1`` rows and ``Wo + kq1 - 1``
    columns, so that a stride-1 convolution by the phases' kernel gives the ``Ho x Wo`` output."""
    (s0, s1), (p0, p1), (kh, kw), (kq0, kq1) = layer.conv_stride, layer.padding, layer.kernel_size, layer.phase_kernel
    n, c, h, w = x.shape
    ho, wo = (h + 2 * p0 - kh) // s0 + 1, (w + 2 * p1 - kw) // s1 + 1
    if ho < 1 or wo < 1:  # as torch's convolution says it
        raise RuntimeError(
            f"Calculated padded input size per channel: ({h + 2 * p0} x {w + 2 * p1}). Kernel size: ({kh} x {kw}). "
            "Kernel size can't be greater than actual input size"
        )
    hq, wq = ho + kq0 - 1, wo + kq1 - 1
    padded = F.pad(x, (p1, wq * s1 - w - p1, p0, hq * s0 - h - p0))
    return padded.reshape(n, c, hq, s0, wq, s1).permute(0, 1, 3, 5, 2, 4).reshape(n, c * s0 * s1, hq, wq)


def unphase(layer: CompactWeight, grad: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """The gradient of the batch of ``x_shape`` from the gradient of its phases (:func:`phases`)."""
    (s0, s1), (p0, p1) = layer.conv_stride, layer.padding
    n, c, h, w = x_shape
    hq, wq = grad.shape[-2:]
    full = grad.reshape(n, c, s0, s1, hq, wq).permute(0, 1, 4, 2, 5, 3).reshape(n, c, hq * s0, wq * s1)
    return F.pad(full, (-p1, w + p1 - wq * s1, -p0, h + p0 - hq * s0))


def matmul_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight + bias`` (``addmm``'s product, transformers' ``Conv1D``), bias optional."""
    out = torch.matmul(x, weight)
    return out if bias is None else out + bias


class _CompactLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` for a compact ``W`` with the layer's kernels
    (:func:`fxsparse.layouts.compact.kernels.kernels_for`); records the dense growth gradient when ``masker``
    is given (an armed step)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, layer: CompactWeight, masker: Any,
        armed: bool,
    ) -> torch.Tensor:
        dtype = x.dtype
        kernels = kernels_for(layer.kernel, values)
        flat = x.reshape(-1, layer.cols).to(values.dtype)
        # the output is made in its final shape, not a view of a 2-D result: autograd forbids
        # in-place ops (an inplace activation next) on views a custom Function returns
        result = flat.new_empty(*x.shape[:-1], layer.rows)
        out = result.view(-1, layer.rows)
        with torch.autocast(x.device.type, enabled=False):  # the sparse kernels compute in the values' dtype
            saved = kernels.save(flat)
            kernels.forward(layer, values, saved, out)
            if bias is not None:
                out += bias.to(values.dtype)
        ctx.save_for_backward(saved, values)
        ctx.kernels, ctx.layer, ctx.shape, ctx.dtype = kernels, layer, x.shape, dtype
        ctx.counter, ctx.masker = masker, masker if armed else None
        ctx.has_bias = bias is not None
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        with torch.autocast(grad.device.type, enabled=False):
            return _CompactLinear._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        saved, values = ctx.saved_tensors
        layer: CompactWeight = ctx.layer
        kernels = ctx.kernels
        ctx.counter.note_backward()
        dy = grad.reshape(-1, layer.rows).to(values.dtype)
        operand = kernels.grad_operand(dy)
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0]:
            dx = kernels.input_grad(layer, values, operand).reshape(ctx.shape).to(ctx.dtype)
        if ctx.needs_input_grad[1] or ctx.masker is not None:
            reduced = ctx.masker is not None and ctx.masker.keep_candidates(layer.fqn, lambda count: layer.growth_candidates(
                lambda r0, r1: kernels.grad_rows(layer, saved, operand, r0, r1), count))
            if ctx.masker is not None and not reduced:  # an armed step: the dense weight gradient, recorded
                dense = kernels.dense_grad(saved, operand)
                ctx.masker.record(layer.fqn, layer.full(dense))
                dvalues = dense.reshape(-1).index_select(0, layer.positions())
            else:  # growth candidates made block by block (armed), or an ordinary step
                dvalues = kernels.value_grad(layer, values, saved, operand)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(0)
        return dx, dvalues, dbias, None, None, None


class _CompactConv(torch.autograd.Function):
    """``F.conv2d(x, W, bias, stride=layer.conv_stride, padding=layer.padding)`` (one group) for
    a compact kxk ``W`` with the layer's convolution kernels (at a stride > 1 on the input's
    phases, :func:`phases`); records the dense growth gradient when ``masker`` is given (an armed
    step)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, layer: CompactWeight, masker: Any,
        armed: bool,
    ) -> torch.Tensor:
        kernels = conv_kernels_for(layer.kernel, values)
        batched = x.dim() == 4
        images = (x if batched else x.unsqueeze(0)).to(values.dtype)
        problem = layer if layer.phase_kernel is None else _Phases(layer)
        with torch.autocast(x.device.type, enabled=False):
            source = (images if layer.phase_kernel is None else phases(layer, images)).contiguous()
            saved = kernels.save(problem, source)
            out = kernels.forward(problem, values, saved)
            if bias is not None:
                out += bias.to(values.dtype).view(-1, 1, 1)
        ctx.save_for_backward(saved, values)
        ctx.kernels, ctx.layer, ctx.problem, ctx.dtype = kernels, layer, problem, x.dtype
        ctx.shape, ctx.x_shape = source.shape, images.shape
        ctx.counter, ctx.masker = masker, masker if armed else None
        ctx.batched, ctx.has_bias = batched, bias is not None
        return (out if batched else out.squeeze(0)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        saved, values = ctx.saved_tensors
        layer: CompactWeight = ctx.layer
        kernels, problem = ctx.kernels, ctx.problem
        ctx.counter.note_backward()
        with torch.autocast(grad.device.type, enabled=False):
            dy = (grad if ctx.batched else grad.unsqueeze(0)).to(values.dtype).contiguous()
            operand = kernels.grad_operand(problem, dy)
            dx = dvalues = dbias = None
            if ctx.needs_input_grad[0]:
                dx = kernels.input_grad(problem, values, operand, ctx.shape)
                dx = dx if layer.phase_kernel is None else unphase(layer, dx, ctx.x_shape)
                dx = (dx if ctx.batched else dx.squeeze(0)).to(ctx.dtype)
            if ctx.needs_input_grad[1] or ctx.masker is not None:
                if ctx.masker is not None:  # an armed step: the dense weight gradient (small), recorded
                    flat = kernels.dense_grad(problem, saved, operand).reshape(layer.rows, layer.cols)
                    # candidates are made in the matrix's order, which is the weight's without phases
                    if layer.phase_kernel is not None or not ctx.masker.keep_candidates(
                            layer.fqn, lambda count: layer.growth_candidates(lambda r0, r1: flat[r0:r1], count)):
                        ctx.masker.record(layer.fqn, layer.full(flat))
                    dvalues = flat.reshape(-1).index_select(0, layer.positions())
                else:
                    dvalues = kernels.value_grad(problem, values, saved, operand)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                dbias = dy.sum((0, 2, 3))
        return dx, dvalues, dbias, None, None, None


@torch.compiler.disable
def compact_linear(x: torch.Tensor, layer: CompactWeight, masker: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` (or ``x @ W`` for a transposed layer) with the compact weight of
    ``layer``; the dense growth gradient is recorded by ``masker`` while it is armed. Under
    torch.compile it runs eagerly (a graph break)."""
    armed = masker.armed and torch.is_grad_enabled() and layer.values.requires_grad
    if layer.kernel_size is not None:
        return _CompactConv.apply(x, layer.values, bias, layer, masker, armed)
    if layer.stride is None:
        return _CompactLinear.apply(x, layer.values, bias, layer, masker, armed)
    # a 1x1 convolution: the channels of every (strided) pixel, (N, C, H, W) or (C, H, W)
    s0, s1 = layer.stride
    pixels = (x if (s0, s1) == (1, 1) else x[..., ::s0, ::s1]).movedim(-3, -1)
    return _CompactLinear.apply(pixels, layer.values, bias, layer, masker, armed).movedim(-1, -3)


# without example inputs to time on, a kxk convolution is compact at most at this density: the
# numba kernels' break-even against the dense convolution is near 0.1 (docs/compact.md)
SPATIAL_BREAK_EVEN = 0.05


def density_rule(density: float, spatial: bool = False) -> bool:
    """Without example inputs to time on: compact where the density is at most 0.2 (the
    break-even measured for a linear layer on CPU), or ``SPATIAL_BREAK_EVEN`` for a kxk
    convolution (``spatial``; docs/compact.md)."""
    return density <= (SPATIAL_BREAK_EVEN if spatial else 0.2) + 1e-12
