"""The products of a compact layer (:mod:`fxsparse.compact`), one class per kernel technology.

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

import functools
import importlib.util
import warnings
from typing import Any

import torch

__all__ = ["KERNELS", "CHUNK", "csr_tensor", "NumbaKernels", "TorchKernels", "kernels_for", "numba_available", "preferred"]

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
        _run("rows_sum", layer.crow, layer.col, values, saved, out_t)
        out.copy_(out_t.t())

    @staticmethod
    def input_grad(layer: Any, values: torch.Tensor, dy_t: torch.Tensor) -> torch.Tensor:
        dx_t = dy_t.new_empty(layer.cols, dy_t.shape[1])
        _run("rows_sum", layer.t_crow, layer.t_col, values.index_select(0, layer.t_perm), dy_t, dx_t)
        return dx_t.t()

    @staticmethod
    def value_grad(layer: Any, values: torch.Tensor, saved: torch.Tensor, dy_t: torch.Tensor) -> torch.Tensor:
        grad = values.new_empty(values.shape)
        _run("dots", layer.crow, layer.col, dy_t, saved, grad)
        return grad

    @staticmethod
    def dense_grad(saved: torch.Tensor, dy_t: torch.Tensor) -> torch.Tensor:
        return dy_t.mm(saved.t())


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


def _run(name: str, *tensors: torch.Tensor, block: int | None = None) -> None:
    """Runs the compiled loop ``name`` on numpy views of ``tensors`` (CPU, contiguous), with as
    many threads as torch uses, over the batch in blocks of ``block`` rows (``BLOCK``)."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _compiled()[name](*(t.detach().numpy() for t in tensors), block or BLOCK)


@functools.cache
def _compiled() -> dict[str, Any]:
    """The numba loops, compiled on first use (cached on disk by numba)."""
    import numba
    from numba import prange

    jit = numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)

    @jit
    def rows_sum(crow: Any, col: Any, values: Any, source: Any, out: Any, block: int) -> None:  # pragma: no cover - compiled
        # out[r] = sum over k in row r of values[k] * source[col[k]]   (out: rows x n)
        n = out.shape[1]
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            width = b1 - b0
            for r in prange(out.shape[0]):
                o = out[r, b0:b1]
                o[:] = 0.0
                k, end = crow[r], crow[r + 1]
                while k + 4 <= end:
                    x0, x1 = source[col[k], b0:b1], source[col[k + 1], b0:b1]
                    x2, x3 = source[col[k + 2], b0:b1], source[col[k + 3], b0:b1]
                    v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
                    for j in range(width):
                        o[j] += v0 * x0[j] + v1 * x1[j] + v2 * x2[j] + v3 * x3[j]
                    k += 4
                while k < end:
                    v0, x0 = values[k], source[col[k], b0:b1]
                    for j in range(width):
                        o[j] += v0 * x0[j]
                    k += 1

    @jit
    def dots(crow: Any, col: Any, left: Any, right: Any, out: Any, block: int) -> None:  # pragma: no cover - compiled
        # out[k] = dot(left[r], right[col[k]]) for k in row r   (left: rows x n, right: cols x n)
        n = left.shape[1]
        zero = out.dtype.type(0)
        for r in prange(left.shape[0]):
            for k in range(crow[r], crow[r + 1]):
                out[k] = zero
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            width = b1 - b0
            for r in prange(left.shape[0]):
                a = left[r, b0:b1]
                k, end = crow[r], crow[r + 1]
                while k + 4 <= end:
                    x0, x1 = right[col[k], b0:b1], right[col[k + 1], b0:b1]
                    x2, x3 = right[col[k + 2], b0:b1], right[col[k + 3], b0:b1]
                    s0 = s1 = s2 = s3 = zero
                    for j in range(width):
                        aj = a[j]
                        s0 += aj * x0[j]
                        s1 += aj * x1[j]
                        s2 += aj * x2[j]
                        s3 += aj * x3[j]
                    out[k] += s0
                    out[k + 1] += s1
                    out[k + 2] += s2
                    out[k + 3] += s3
                    k += 4
                while k < end:
                    x0 = right[col[k], b0:b1]
                    s0 = zero
                    for j in range(width):
                        s0 += a[j] * x0[j]
                    out[k] += s0
                    k += 1

    return {"rows_sum": rows_sum, "dots": dots}
