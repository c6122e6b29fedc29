"""numba's compiled loops of the compact layer's CPU kernels (:mod:`fxsparse.layouts.compact.kernels` says
what each computes and how the data is laid out). Imported only when a numba kernel first runs:
numba is an optional dependency (``pip install fxsparse[kernels]``). Each loop compiles on its
first call for the array types it gets, and is cached on disk by numba."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange

__all__ = ["rows_sum", "dots", "pad", "widen", "conv_forward", "conv_input_grad", "conv_value_grad", "csr_transpose"]

jit = numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
serial = numba.njit(cache=True, nogil=True)


@serial
def csr_transpose(crow: Any, col: Any, t_crow: Any, t_col: Any, t_perm: Any) -> None:
    # a counting sort of the entries by column, rows kept in order (t_crow given): entry k of row r
    # goes to its column's next free slot, so t_col holds its row and t_perm its index k
    fill = t_crow[:-1].copy()
    for r in range(crow.shape[0] - 1):
        for k in range(crow[r], crow[r + 1]):
            c = col[k]
            d = fill[c]
            t_col[d] = r
            t_perm[d] = k
            fill[c] = d + 1


@jit
def rows_sum(crow: Any, col: Any, values: Any, source: Any, out: Any, block: int) -> None:
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
def dots(crow: Any, col: Any, left: Any, right: Any, out: Any, block: int) -> None:
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

@jit
def pad(x: Any, out: Any, p0: int, p1: int) -> None:
    # out[n, c] = x[n, c] at offset (p0, p1), zeros elsewhere (out may have more rows/columns)
    batch, channels, h, w = x.shape
    for t in prange(batch * channels):
        n, c = t // channels, t % channels
        plane = out[n, c]
        plane[:, :] = 0.0
        for i in range(h):
            plane[p0 + i, p1:p1 + w] = x[n, c, i]

@jit
def conv_forward(crow: Any, chan: Any, offs: Any, values: Any, source: Any, out: Any, kh: int, kw: int) -> None:
    # out[n, o] = crop of the wide row: sum over k in row o of values[k] * source[n, chan[k], offs[k]:offs[k] + M]
    batch, rows, ho, wo = out.shape
    wp = wo + kw - 1
    m = ho * wp
    for t in prange(batch * rows):
        n, r = t // rows, t % rows
        o = np.zeros(m, out.dtype)
        k, end = crow[r], crow[r + 1]
        while k + 4 <= end:
            x0, x1 = source[n, chan[k], offs[k]:offs[k] + m], source[n, chan[k + 1], offs[k + 1]:offs[k + 1] + m]
            x2, x3 = source[n, chan[k + 2], offs[k + 2]:offs[k + 2] + m], source[n, chan[k + 3], offs[k + 3]:offs[k + 3] + m]
            v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
            for j in range(m):
                o[j] += v0 * x0[j] + v1 * x1[j] + v2 * x2[j] + v3 * x3[j]
            k += 4
        while k < end:
            x0, v0 = source[n, chan[k], offs[k]:offs[k] + m], values[k]
            for j in range(m):
                o[j] += v0 * x0[j]
            k += 1
        for i in range(ho):
            out[n, r, i, :] = o[i * wp:i * wp + wo]

@jit
def widen(dy: Any, out: Any, front: int, wp: int) -> None:
    # out[n, o] = front zeros, dy's rows each in wp columns (zeros past wo), zeros
    batch, rows, ho, wo = dy.shape
    for t in prange(batch * rows):
        n, r = t // rows, t % rows
        plane = out[n, r]
        plane[:] = 0.0
        for i in range(ho):
            plane[front + i * wp:front + i * wp + wo] = dy[n, r, i]

@jit
def conv_input_grad(t_crow: Any, t_col: Any, t_values: Any, shifts: Any, wide: Any, out: Any, taps: int,
                    p0: int, p1: int) -> None:
    # the padded plane of input channel ic: d = sum over the transposed entries k of ic's
    # columns of t_values[k] * wide[n, o_k, shifts[k]:shifts[k] + L]; out[n, ic] = its interior
    batch, channels, h, w = out.shape
    wp = w + 2 * p1
    length = (h + 2 * p0) * wp
    for t in prange(batch * channels):
        n, ic = t // channels, t % channels
        d = np.zeros(length, out.dtype)
        k, end = t_crow[ic * taps], t_crow[(ic + 1) * taps]
        while k + 4 <= end:
            y0 = wide[n, t_col[k], shifts[k]:shifts[k] + length]
            y1 = wide[n, t_col[k + 1], shifts[k + 1]:shifts[k + 1] + length]
            y2 = wide[n, t_col[k + 2], shifts[k + 2]:shifts[k + 2] + length]
            y3 = wide[n, t_col[k + 3], shifts[k + 3]:shifts[k + 3] + length]
            v0, v1, v2, v3 = t_values[k], t_values[k + 1], t_values[k + 2], t_values[k + 3]
            for j in range(length):
                d[j] += v0 * y0[j] + v1 * y1[j] + v2 * y2[j] + v3 * y3[j]
            k += 4
        while k < end:
            y0, v0 = wide[n, t_col[k], shifts[k]:shifts[k] + length], t_values[k]
            for j in range(length):
                d[j] += v0 * y0[j]
            k += 1
        for i in range(h):
            out[n, ic, i, :] = d[(p0 + i) * wp + p1:(p0 + i) * wp + p1 + w]

@jit
def conv_value_grad(crow: Any, chan: Any, offs: Any, wide: Any, source: Any, out: Any, front: int,
                    group: int) -> None:
    # out[k] = sum over n of dot(wide[n, o, front:front + M], source[n, chan[k], offs[k]:offs[k] + M]), k in row o
    batch, rows = wide.shape[0], wide.shape[1]
    m = wide.shape[2] - 2 * front
    zero = out.dtype.type(0)
    for r in prange(rows):
        for k in range(crow[r], crow[r + 1]):
            out[k] = zero
    # a few samples at a time, every row reading them: their planes stay in cache
    for n0 in range(0, batch, group):
        for r in prange(rows):
            for n in range(n0, min(batch, n0 + group)):
                a = wide[n, r, front:front + m]
                k, end = crow[r], crow[r + 1]
                while k + 4 <= end:
                    x0, x1 = source[n, chan[k], offs[k]:offs[k] + m], source[n, chan[k + 1], offs[k + 1]:offs[k + 1] + m]
                    x2 = source[n, chan[k + 2], offs[k + 2]:offs[k + 2] + m]
                    x3 = source[n, chan[k + 3], offs[k + 3]:offs[k + 3] + m]
                    s0 = s1 = s2 = s3 = zero
                    for j in range(m):
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
                    x0 = source[n, chan[k], offs[k]:offs[k] + m]
                    s0 = zero
                    for j in range(m):
                        s0 += a[j] * x0[j]
                    out[k] += s0
                    k += 1
