"""The products of a compact layer (:mod:`fxsparse.layouts.compact`), one class per kernel technology.

A compact layer holds a CSR matrix ``W`` (``rows x cols``: ``crow``, ``col``, ``values``, and the
structure of its transpose) and computes, for a batch ``X`` (``n x cols``) and the output's
gradient ``dY`` (``n x rows``):

- forward: ``Y = X W^T``;
- input gradient: ``dX = dY W``;
- value gradient: ``(dY^T X)`` at the active positions only: ``nnz * n`` multiply-adds, against
  ``rows * cols * n`` for the dense weight gradient.

Two kernels compute them:

- :class:`NumbaKernels` (CPU, float32/float64, when numba is installed: ``pip install
  fxsparse[kernels]``): the batch is held transposed (``X^T``, ``cols x n``), so that every active
  weight reads one contiguous row of it; the forward and the input gradient are, per output row,
  a sum of ``values[k] * X^T[col[k]]`` (four active weights per pass over the row, so a loaded
  output element takes four multiply-adds), the value gradient per active weight one dot product
  of two contiguous rows (four at a time sharing the loaded ``dY^T`` row); threads split the rows.
  No chunks, no allocation per chunk, no copy but the two transposes. Why numba: it is a wheel on
  every platform PyTorch supports (no compiler at install or at run time, unlike a C++ extension),
  its ``prange`` threads the loops and LLVM vectorizes the inner ones; compiled functions are
  cached on disk after the first call (a few seconds).
- :class:`TorchKernels` (any device and dtype; the fallback): ``torch.sparse.mm`` on CSR tensors
  (on the CPU ``CHUNK`` batch rows at a time, which keeps the dense operand in cache) and
  ``torch.sparse.sampled_addmm`` for the value gradient (about the cost of the dense gradient on
  the CPU: docs/compact.md).

:func:`kernels_for` gives the kernels a layer's preference (``CompactWeight.kernel``) can run with
on the tensors it gets: numba on the CPU in float32/float64 when it is installed, torch otherwise
(a layer moved to CUDA, or autocast to bf16, runs the torch kernels). The layout timing at
``sparsify`` chooses the preference per layer (:mod:`fxsparse.layouts`).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch

__all__ = ["KERNELS", "CHUNK", "csr_tensor", "NumbaConvKernels", "TorchConvKernels", "conv_kernels_for", "conv_geometry", "NumbaKernels", "TorchKernels", "kernels_for", "numba_available", "preferred", "run_loop"]

KERNELS = ("numba", "torch")

# On the CPU a torch sparse product streams the dense operand once per active weight: taken CHUNK
# rows of the batch at a time, that operand stays in cache (measured: 4096x4096 at density 0.1,
# batch 256, 2 threads: 21 ms in one product, 9 ms in chunks of 32, dense 27 ms; docs/compact.md)
CHUNK = 32
# the numba kernels take the batch in blocks of this many rows (measured: one block for any batch
# up to here is fastest, the per-weight loop overhead outweighing what a cache-sized block saves)
BLOCK = 4096


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor of these parts, its invariants unchecked (fxsparse builds them)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we measured
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class TorchKernels:
    """``torch.sparse`` products; the saved input is the batch ``X`` itself (``n x cols``), the
    gradient operand ``dY`` itself.

    Every kernel class has the same static methods: ``save(X)`` (what the forward keeps of the
    batch), ``grad_operand(dY)`` (the output gradient as both gradients read it), ``forward``,
    ``input_grad``, ``value_grad`` and ``dense_grad`` (``dY^T X``, the growth gradient of an
    update step)."""

    name = "torch"

    @staticmethod
    def save(flat: torch.Tensor) -> torch.Tensor:
        return flat

    @staticmethod
    def grad_operand(dy: torch.Tensor) -> torch.Tensor:
        return dy

    @staticmethod
    def forward(layer: Any, values: torch.Tensor, saved: torch.Tensor, out: torch.Tensor) -> None:
        _times_transpose(csr_tensor(layer.crow, layer.col, values, (layer.rows, layer.cols)), saved, layer.rows, out)

    @staticmethod
    def input_grad(layer: Any, values: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        w_t = csr_tensor(layer.t_crow, layer.t_col, values.index_select(0, layer.t_perm), (layer.cols, layer.rows))
        return _times_transpose(w_t, dy, layer.cols)

    @staticmethod
    def value_grad(layer: Any, values: torch.Tensor, saved: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        pattern = csr_tensor(layer.crow, layer.col, values.detach(), (layer.rows, layer.cols))
        return torch.sparse.sampled_addmm(pattern, dy.t().contiguous(), saved, beta=0.0).values()

    @staticmethod
    def dense_grad(saved: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        return dy.t().mm(saved)

    @staticmethod
    def grad_rows(layer: Any, saved: torch.Tensor, dy: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the dense weight gradient in the weight's own orientation."""
        if layer.transposed:  # W of x @ W: (X^T dY) rows are the matrix's columns
            return saved[:, r0:r1].t().mm(dy)
        return dy[:, r0:r1].t().mm(saved)


def _times_transpose(
    matrix: torch.Tensor, rows: torch.Tensor, out_features: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rows @ matrix.T`` for a CSR ``matrix`` and a dense 2-D ``rows``, as ``matrix @ rows.T``
    (written into ``out``, a 2-D ``[n, out_features]`` tensor, where given)."""
    n = rows.shape[0]
    if rows.device.type != "cpu" or n <= CHUNK:
        product = torch.sparse.mm(matrix, rows.t()).t()
        return product if out is None else out.copy_(product)
    if out is None:
        out = rows.new_empty(n, out_features)
    for start in range(0, n, CHUNK):
        block = rows[start:start + CHUNK]
        out[start:start + block.shape[0]] = torch.sparse.mm(matrix, block.t().contiguous()).t()
    return out


class NumbaKernels:
    """numba's threaded CPU loops over the CSR structure; the saved input is ``X^T``
    (``cols x n``, contiguous)."""

    name = "numba"

    @staticmethod
    def save(flat: torch.Tensor) -> torch.Tensor:
        return flat.t().contiguous()

    @staticmethod
    def grad_operand(dy: torch.Tensor) -> torch.Tensor:
        return dy.t().contiguous()  # dY^T, read by both gradients

    @staticmethod
    def forward(layer: Any, values: torch.Tensor, saved: torch.Tensor, out: torch.Tensor) -> None:
        out_t = saved.new_empty(layer.rows, saved.shape[1])
        run_loop("rows_sum", layer.crow, layer.col, values, saved, out_t, BLOCK)
        out.copy_(out_t.t())

    @staticmethod
    def input_grad(layer: Any, values: torch.Tensor, dy_t: torch.Tensor) -> torch.Tensor:
        dx_t = dy_t.new_empty(layer.cols, dy_t.shape[1])
        run_loop("rows_sum", layer.t_crow, layer.t_col, values.index_select(0, layer.t_perm), dy_t, dx_t, BLOCK)
        return dx_t.t()

    @staticmethod
    def value_grad(layer: Any, values: torch.Tensor, saved: torch.Tensor, dy_t: torch.Tensor) -> torch.Tensor:
        grad = values.new_empty(values.shape)
        run_loop("dots", layer.crow, layer.col, dy_t, saved, grad, BLOCK)
        return grad

    @staticmethod
    def dense_grad(saved: torch.Tensor, dy_t: torch.Tensor) -> torch.Tensor:
        return dy_t.mm(saved.t())

    @staticmethod
    def grad_rows(layer: Any, saved: torch.Tensor, dy_t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the dense weight gradient in the weight's own orientation."""
        if layer.transposed:
            return saved[r0:r1].mm(dy_t.t())
        return dy_t[r0:r1].mm(saved.t())


# --- kxk convolutions (stride 1, one group) --------------------------------------------------------
#
# A kxk kernel of shape (O, C, kh, kw) is the CSR matrix O x (C*kh*kw); column c is input channel
# c // (kh*kw) at kernel offset (c % (kh*kw)) // kw, c % kw. The numba kernels pad the input once
# (zeros, plus one spare row), and compute every output plane in "wide" rows of the padded width
# Wp: output pixel (i, j) sits at i*Wp + j, and input pixel (i + di, j + dj) at the same place
# plus di*Wp + dj. So each active weight is one multiply-add over a contiguous run of Ho*Wp
# elements (a long vector even for an 8x8 plane); the Wp - Wo columns past each row's end are
# computed and cropped (and are zero in the output gradient, so the value gradient is exact).
# A stride s > 1 is the stride-1 convolution of the input's s0*s1 phases by a ceil(k/s) kernel
# (fxsparse.layouts.compact.weight.phases): these kernels see that problem, not the layer.


# the convolution's value gradient reads this many samples' planes at a time, by every output
# channel: their input planes stay in cache (4 x 32 channels x 34x35 floats ~ 600 KB)
SAMPLES = 4


def conv_geometry(layer: Any, x_shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """``(H, W, Hp, Wp, Ho, Wo)`` of a stride-1 convolution of ``layer`` on an input of ``x_shape``."""
    (kh, kw), (p0, p1) = layer.kernel_size, layer.padding
    h, w = x_shape[-2:]
    hp, wp = h + 2 * p0, w + 2 * p1
    if hp < kh or wp < kw:  # as torch's convolution says it
        raise RuntimeError(
            f"Calculated padded input size per channel: ({hp} x {wp}). Kernel size: ({kh} x {kw}). Kernel size can't be "
            "greater than actual input size"
        )
    return h, w, hp, wp, hp - kh + 1, wp - kw + 1


class TorchConvKernels:
    """A kxk convolution with torch's dense convolution on the dense weight (the fallback: correct
    on every device and dtype, no faster than the masked layout)."""

    name = "torch"

    @staticmethod
    def save(layer: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def grad_operand(layer: Any, dy: torch.Tensor) -> torch.Tensor:
        return dy

    @staticmethod
    def _weight(layer: Any, values: torch.Tensor) -> torch.Tensor:
        flat = values.new_zeros(layer.rows * layer.cols)
        flat[layer.positions()] = values
        return flat.view(layer.shape)

    @staticmethod
    def forward(layer: Any, values: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(saved, TorchConvKernels._weight(layer, values), padding=layer.padding)

    @staticmethod
    def input_grad(layer: Any, values: torch.Tensor, dy: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        weight = TorchConvKernels._weight(layer, values)
        return torch.nn.grad.conv2d_input(x_shape, weight, dy, padding=layer.padding)

    @staticmethod
    def value_grad(layer: Any, values: torch.Tensor, saved: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        dense = TorchConvKernels.dense_grad(layer, saved, dy)
        return dense.reshape(-1).index_select(0, layer.positions())

    @staticmethod
    def dense_grad(layer: Any, saved: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(saved, layer.shape, dy, padding=layer.padding)


class NumbaConvKernels:
    """A kxk convolution by numba's loops over the CSR structure on wide rows (see above). The
    saved input is the padded batch ``(N, C, Hp + 1, Wp)``; the gradient operand is the output
    gradient in wide rows, zero past each row's ``Wo`` and with ``F = (kh - 1) * Wp + kw - 1``
    zeros before and after each plane (``(N, O, 2F + Ho * Wp)``), so that the input gradient is,
    like the forward, a sum of shifted contiguous rows into one padded input plane."""

    name = "numba"

    @staticmethod
    def save(layer: Any, x: torch.Tensor) -> torch.Tensor:
        _, _, hp, wp, _, _ = conv_geometry(layer, x.shape)
        padded = x.new_empty(x.shape[0], x.shape[1], hp + 1, wp)
        run_loop("pad", x, padded, *layer.padding)
        return padded

    @staticmethod
    def _taps(layer: Any, wp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per active weight: its input channel, and its tap's offset in a padded input plane."""
        kh, kw = layer.kernel_size
        col = layer.col.long()
        tap = col % (kh * kw)
        return (col // (kh * kw)).to(torch.int32), (tap // kw * wp + tap % kw).to(torch.int32)

    @staticmethod
    def _front(layer: Any, wp: int) -> int:
        kh, kw = layer.kernel_size
        return (kh - 1) * wp + kw - 1

    @staticmethod
    def grad_operand(layer: Any, dy: torch.Tensor) -> torch.Tensor:
        n, o, ho, wo = dy.shape
        wp = wo + layer.kernel_size[1] - 1
        front = NumbaConvKernels._front(layer, wp)
        wide = dy.new_empty(n, o, 2 * front + ho * wp)
        run_loop("widen", dy, wide, front, wp)
        return wide

    @staticmethod
    def forward(layer: Any, values: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        n, _, hp1, wp = saved.shape
        kh, kw = layer.kernel_size
        out = saved.new_empty(n, layer.rows, hp1 - kh, wp - kw + 1)
        chan, offs = NumbaConvKernels._taps(layer, wp)
        run_loop("conv_forward", layer.crow, chan, offs, values, saved.view(n, saved.shape[1], -1), out, kh, kw)
        return out

    @staticmethod
    def input_grad(layer: Any, values: torch.Tensor, wide: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        _, _, _, wp, _, _ = conv_geometry(layer, x_shape)
        kh, kw = layer.kernel_size
        # each transposed entry's shift into the operand: F minus its tap's offset in the plane
        counts = (layer.t_crow[1:] - layer.t_crow[:-1]).long()
        taps = torch.repeat_interleave(torch.arange(layer.cols) % (kh * kw), counts)
        shifts = (NumbaConvKernels._front(layer, wp) - taps // kw * wp - taps % kw).to(torch.int32)
        grad = wide.new_empty(x_shape)
        run_loop("conv_input_grad", layer.t_crow, layer.t_col, values.index_select(0, layer.t_perm), shifts,
                  wide, grad, kh * kw, *layer.padding)
        return grad

    @staticmethod
    def value_grad(layer: Any, values: torch.Tensor, saved: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        n, _, _, wp = saved.shape
        grad = values.new_empty(values.shape)
        chan, offs = NumbaConvKernels._taps(layer, wp)
        run_loop("conv_value_grad", layer.crow, chan, offs, wide, saved.view(n, saved.shape[1], -1), grad,
                  NumbaConvKernels._front(layer, wp), SAMPLES)
        return grad

    @staticmethod
    def dense_grad(layer: Any, saved: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        n, _, hp1, wp = saved.shape
        kh, kw = layer.kernel_size
        front, ho = NumbaConvKernels._front(layer, wp), hp1 - kh
        dy = wide[..., front:front + ho * wp].reshape(n, layer.rows, ho, wp)[..., :wp - kw + 1]
        return torch.nn.grad.conv2d_weight(saved[:, :, :-1], layer.shape, dy)


def conv_kernels_for(preference: str, values: torch.Tensor) -> type[NumbaConvKernels] | type[TorchConvKernels]:
    """The kxk-convolution kernels a layer preferring ``preference`` runs with on ``values``."""
    return NumbaConvKernels if preference == "numba" and _numba_runs(values) else TorchConvKernels


def numba_available() -> bool:
    """Whether numba is installed (``pip install fxsparse[kernels]``); it is imported only when a
    numba kernel first runs."""
    return importlib.util.find_spec("numba") is not None


def _numba_runs(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64) and numba_available()


def preferred(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel a new compact layer prefers on ``device`` in ``dtype`` before any timing."""
    probe = torch.empty(0, device=device, dtype=dtype)
    return "numba" if _numba_runs(probe) else "torch"


def kernels_for(preference: str, values: torch.Tensor) -> type[NumbaKernels] | type[TorchKernels]:
    """The kernels a layer preferring ``preference`` runs with on ``values``' device and dtype."""
    return NumbaKernels if preference == "numba" and _numba_runs(values) else TorchKernels


def run_loop(name: str, *args: Any) -> None:
    """Runs the compiled loop ``name`` of :mod:`fxsparse.layouts.compact.loops` (imported on first use) on
    numpy views of the tensors among ``args`` (CPU, contiguous), with as many threads as torch
    uses."""
    import numba

    from fxsparse.layouts.compact import loops as numba_loops

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    getattr(numba_loops, name)(*(a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in args))
