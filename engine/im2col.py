"""im2col / col2im over a whole NCHW batch, the output-size rule shared by convolution-like
layers, and the small threading and scratch-buffer helpers the vision layers share.

Column layout: `col[c, *k, n, *o]`, i.e. a (C * prod(kernel), N * prod(out)) matrix whose rows
follow Caffe's (c, kh, kw) order and whose columns run over the batch then the output pixels,
so one GEMM covers the whole batch. The CPU code loops only over kernel offsets (kh * kw
strided slice copies, each over the whole batch), never over pixels; large copies are split
over the batch between threads (NumPy releases the GIL while it copies).
"""

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine import backend

# Below this many elements a copy is not worth handing to threads.
_PARALLEL_MIN = 1 << 16
_pool = {"executor": None, "threads": None}


def conv_out_size(size, kernel, pad, stride, dilation=1):
    """Caffe's convolution output length: (size + 2 pad - dilated kernel) / stride + 1."""
    extent = dilation * (kernel - 1) + 1
    return (size + 2 * pad - extent) // stride + 1


def num_threads():
    """Threads used for batch-split copies: OPENBLAS/OMP_NUM_THREADS if set, else the CPUs."""
    if _pool["threads"] is None:
        n = None
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            value = os.environ.get(var, "").strip()
            if value.isdigit() and int(value) > 0:
                n = int(value)
                break
        if n is None:
            try:
                n = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - not Linux
                n = os.cpu_count() or 1
        _pool["threads"] = max(1, min(n, 16))
    return _pool["threads"]


def parallel_batch(n, fn, size, xp=np):
    """Call fn(n0, n1) over ranges covering [0, n): split between threads when `size`
    (elements touched) is large and the arrays are NumPy; otherwise one call."""
    threads = min(num_threads(), n)
    if xp is not np or threads < 2 or size < _PARALLEL_MIN:
        fn(0, n)
        return
    if _pool["executor"] is None:
        _pool["executor"] = ThreadPoolExecutor(num_threads(), thread_name_prefix="engine-batch")
    bounds = [n * t // threads for t in range(threads + 1)]
    futures = [
        _pool["executor"].submit(fn, bounds[t], bounds[t + 1])
        for t in range(1, threads)
        if bounds[t + 1] > bounds[t]
    ]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()


def scratch(cache, key, shape, dtype=np.float32, xp=np, fill=None):
    """A work array kept in dict `cache` under `key`, reallocated only when its shape, dtype
    or array module changes; a new array is filled with `fill` (None: uninitialised)."""
    shape = tuple(int(d) for d in shape)
    arr = cache.get(key)
    if (
        arr is None
        or arr.shape != shape
        or arr.dtype != np.dtype(dtype)
        or backend.get_array_module(arr) is not xp
    ):
        arr = xp.empty(shape, dtype=dtype) if fill is None else xp.full(shape, fill, dtype=dtype)
        cache[key] = arr
    return arr


def _geometry(spatial, kernel, pad, stride, dilation):
    out = tuple(
        conv_out_size(s, k, p, st, d)
        for s, k, p, st, d in zip(spatial, kernel, pad, stride, dilation)
    )
    if any(o <= 0 for o in out):
        raise ValueError(
            f"kernel {tuple(kernel)} (dilation {tuple(dilation)}) does not fit the input "
            f"{tuple(spatial)} padded by {tuple(pad)}"
        )
    padded = tuple(s + 2 * p for s, p in zip(spatial, pad))
    return out, padded


def _windows(kernel, stride, dilation, out):
    """(kernel offset tuple, slices of the padded input read for that offset), in Caffe's
    row order of the column matrix."""
    for offset in itertools.product(*(range(k) for k in kernel)):
        win = tuple(
            slice(o * d, o * d + s * (n - 1) + 1, s)
            for o, d, s, n in zip(offset, dilation, stride, out)
        )
        yield offset, win


def col_shape(x_shape, kernel, pad, stride, dilation):
    """Shape (C, *kernel, N, *out) of the columns of an (N, C, *spatial) input."""
    out, _ = _geometry(x_shape[2:], kernel, pad, stride, dilation)
    return (x_shape[1],) + tuple(kernel) + (x_shape[0],) + out


def padded_shape(x_shape, pad):
    """Shape (C, N, *padded spatial) of the work array of `im2col` / `col2im`."""
    return (x_shape[1], x_shape[0]) + tuple(s + 2 * p for s, p in zip(x_shape[2:], pad))


def im2col(x, kernel, pad, stride, dilation, out=None, work=None):
    """Columns of a batch x (N, C, *spatial): returns col (C, *kernel, N, *out_spatial).

    col[c, i, j, n, y, z] = x[n, c, y*s - p + i*d, z*s - p + j*d] (0 outside the input).
    `out`: optional destination of that shape. `work`: optional (C, N, *padded) array,
    zero-initialised once and reused (only its interior is ever written); needed when
    any pad > 0 and allocated here when not given.
    """
    xp = backend.get_array_module(x)
    kernel, pad, stride, dilation = map(tuple, (kernel, pad, stride, dilation))
    n_img = x.shape[0]
    out_sp, padded = _geometry(x.shape[2:], kernel, pad, stride, dilation)
    shape = (x.shape[1],) + kernel + (n_img,) + out_sp
    col = xp.empty(shape, dtype=x.dtype) if out is None else out.reshape(shape)
    use_pad = any(pad)
    if use_pad:
        if work is None:
            work = xp.zeros((x.shape[1], n_img) + padded, dtype=x.dtype)
        interior = tuple(slice(p, p + s) for p, s in zip(pad, x.shape[2:]))
    windows = list(_windows(kernel, stride, dilation, out_sp))
    lead = (slice(None),) * 2

    def run(n0, n1):
        if use_pad:
            src = work[:, n0:n1]
            src[lead + interior] = x[n0:n1].swapaxes(0, 1)
        else:
            src = x[n0:n1].swapaxes(0, 1)
        for offset, win in windows:
            col[(slice(None),) + offset + (slice(n0, n1),)] = src[lead + win]

    parallel_batch(n_img, run, col.size, xp)
    return col


def col2im(col, x_shape, kernel, pad, stride, dilation, out=None, work=None):
    """Sum columns back into a batch: the adjoint of `im2col`. Returns (N, C, *spatial).

    `col` may be given as any array holding (C, *kernel, N, *out_spatial) elements. `out`:
    optional destination (overwritten). `work`: optional (C, N, *padded) scratch array.
    """
    xp = backend.get_array_module(col)
    kernel, pad, stride, dilation = map(tuple, (kernel, pad, stride, dilation))
    n_img, channels = x_shape[0], x_shape[1]
    spatial = tuple(x_shape[2:])
    out_sp, padded = _geometry(spatial, kernel, pad, stride, dilation)
    col = col.reshape((channels,) + kernel + (n_img,) + out_sp)
    if out is None:
        out = xp.empty((n_img, channels) + spatial, dtype=col.dtype)
    if work is None:
        work = xp.empty((channels, n_img) + padded, dtype=col.dtype)
    interior = tuple(slice(p, p + s) for p, s in zip(pad, spatial))
    windows = list(_windows(kernel, stride, dilation, out_sp))
    lead = (slice(None),) * 2

    def run(n0, n1):
        acc = work[:, n0:n1]
        acc[...] = 0
        for offset, win in windows:
            dst = acc[lead + win]
            xp.add(dst, col[(slice(None),) + offset + (slice(n0, n1),)], out=dst)
        out[n0:n1] = acc[lead + interior].swapaxes(0, 1)

    parallel_batch(n_img, run, col.size, xp)
    return out
