"""im2col / col2im over a whole NCHW batch, the output-size rule shared by convolution-like
layers, the "phase grid" window layout, and the threading / scratch helpers of vision layers.

Exact layout: `col[c, *k, n, *o]`, i.e. a (C * prod(kernel), N * prod(out)) matrix whose rows
follow Caffe's (c, kh, kw) order and whose columns run over the batch then the output pixels,
so one GEMM covers the whole batch (or a chunk of it). The CPU code loops only over kernel
offsets (kh * kw strided slice copies, each over the whole batch), never over pixels; large
copies are split over the batch between threads (NumPy releases the GIL while it copies).
Stride-1 2-D im2col instead copies through kw column-shifted copies of the input, so every
copy moves rows of Ho * Wo values (see `_im2col_shifted`).

Batch-minor layout (`col2im_nlast`): `col[c, *k, *o, n]`, the same matrix with its columns
permuted so the batch is innermost; window adds then run over rows of Wo * N values instead
of Wo, which pays when Wo is small (NumPy has a fixed cost per row it touches).

Phase-grid layout (2-D, `PhaseGrid`, used by pooling): the padded input is split by stride
phase into flat planes, so the window of every kernel offset is ONE contiguous slice per plane;
the output grid has Wq = Wo + (kw-1)*d // s columns per row, the last Wq - Wo of them spare.

`batched_matmul` runs a stack of small GEMMs side by side on the threads (OpenBLAS set to one
thread meanwhile, through its C API when NumPy's BLAS is OpenBLAS).
"""

import ctypes
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine import backend

# Below this many elements a copy is not worth handing to threads.
_PARALLEL_MIN = 1 << 16
_PREFIX = "engine-batch"
_pool = {"executor": None, "threads": None}
_workspace = threading.local()
_inside = threading.local()  # .depth > 0 while this thread runs a piece of parallel_batch


def _forget_pool():
    # A forked child has none of the parent's threads: start a new pool on first use.
    _pool["executor"] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


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
    if (
        xp is not np
        or threads < 2
        or size < _PARALLEL_MIN
        or getattr(_inside, "depth", 0)  # no nesting: a piece runs its inner work inline
    ):
        fn(0, n)
        return
    if _pool["executor"] is None:
        _pool["executor"] = ThreadPoolExecutor(num_threads(), thread_name_prefix=_PREFIX)
    bounds = [n * t // threads for t in range(threads + 1)]
    futures = [
        _pool["executor"].submit(_piece, fn, bounds[t], bounds[t + 1])
        for t in range(1, threads)
        if bounds[t + 1] > bounds[t]
    ]
    _piece(fn, bounds[0], bounds[1])
    for f in futures:
        f.result()


def _piece(fn, n0, n1):
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        fn(n0, n1)
    finally:
        _inside.depth -= 1


def _blas_thread_control():
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy loaded, or None (another
    BLAS, or not Linux): found once in the process's mapped libraries."""
    if "blas" not in _pool:
        _pool["blas"] = None
        names = (
            "scipy_openblas_{}_num_threads64_",
            "scipy_openblas_{}_num_threads",
            "openblas_{}_num_threads64_",
            "openblas_{}_num_threads",
        )
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
        except OSError:
            paths = set()
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in names:
                setter = getattr(lib, name.format("set"), None)
                getter = getattr(lib, name.format("get"), None)
                if setter is not None and getter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    getter.argtypes, getter.restype = [], ctypes.c_int
                    _pool["blas"] = (setter, getter)
                    return _pool["blas"]
    return _pool["blas"]


def parallel_gemms(n, fn, size, xp=np):
    """parallel_batch(n, fn, size) with OpenBLAS single-threaded meanwhile, for work made of
    small GEMMs (they run better side by side than each one split in two). Returns False,
    having done nothing, where that cannot apply (one thread, not NumPy, no OpenBLAS
    control): the caller then runs its plain path."""
    control = _blas_thread_control() if xp is np else None
    if control is None or num_threads() < 2 or n < 2:
        return False
    set_threads, get_threads = control
    before = get_threads()
    set_threads(1)
    try:
        parallel_batch(n, fn, size)
    finally:
        set_threads(before)
    return True


def split_gemms_exact(rows, depth, cols, dtype=np.float32):
    """Whether GEMMs (rows, depth) @ (depth, cols) run side by side as `parallel_gemms` runs
    them give, bit for bit, the columns of one wide GEMM with the BLAS's own threading.

    OpenBLAS cuts the depth into blocks differently on one thread than on several for some
    depths (LeNet's conv2, depth 500, rounds differently), so a product that must keep Caffe's
    rounding is split only where this holds. Checked once per shape on random numbers: where
    the blocking differs, nearly every value differs. Widths above 512 columns are checked at
    512 (the blocking follows the depth and the threading, not the width).
    """
    key = ("exact", rows, depth, min(cols, 512), np.dtype(dtype).str, num_threads())
    if key not in _pool:
        pieces, width = 4, key[3]
        rs = np.random.RandomState(0)
        a = rs.standard_normal((rows, depth)).astype(dtype)
        b = rs.standard_normal((depth, pieces * width)).astype(dtype)
        whole = a @ b
        split = np.empty_like(whole)

        def run(i0, i1):
            for i in range(i0, i1):
                part = slice(i * width, (i + 1) * width)
                np.matmul(a, b[:, part], out=split[:, part])

        if not parallel_gemms(pieces, run, _PARALLEL_MIN):
            run(0, pieces)
        _pool[key] = bool(np.array_equal(whole, split))
    return _pool[key]


def batched_matmul(a, b, out):
    """out[i] = a[i] @ b[i] for stacks of matrices: one GEMM per item, the items split
    between threads (parallel_gemms)."""
    xp = backend.get_array_module(a)

    def run(i0, i1):
        np.matmul(a[i0:i1], b[i0:i1], out=out[i0:i1])

    if not parallel_gemms(a.shape[0], run, _PARALLEL_MIN, xp):
        xp.matmul(a, b, out=out)
    return out


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


def workspace(role, shape, dtype=np.float32, xp=np):
    """A work array shared by every layer that runs in this thread, one per `role`: valid
    until the next request for the same role, so a layer takes it, fills it and is done with
    it within one forward or backward. A net then holds one such array per role (the size of
    its largest request) instead of one per layer; per-layer `scratch` stays for arrays that
    must outlive the call (kept columns, zero-bordered work arrays)."""
    pools = getattr(_workspace, "pools", None)
    if pools is None:
        pools = _workspace.pools = {}
    shape = tuple(int(d) for d in shape)
    count = math.prod(shape)
    key = (role, np.dtype(dtype).str, xp.__name__)
    flat = pools.get(key)
    if flat is None or flat.size < count:
        flat = pools[key] = xp.empty(max(count, 1), dtype=dtype)
    return flat[:count].reshape(shape)


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


def shift_work_shape(x_shape, kernel, pad, stride, dilation):
    """Shape (kw, C, N, H + 2 ph, Wo) of the work array of the stride-1 2-D im2col path, or
    None when that path does not apply (not 2-D, or a stride > 1)."""
    if len(x_shape) != 4 or tuple(stride) != (1, 1):
        return None
    out, padded = _geometry(x_shape[2:], kernel, pad, stride, dilation)
    return (kernel[1], x_shape[1], x_shape[0], padded[0], out[1])


def fill_border(arr, start, size, fill=0):
    """Set the cells of arr (..., *padded) outside the interior [p, p + s) of each of the
    trailing axes to `fill`: a work array may hold another layer's values there."""
    lead = arr.ndim - len(start)
    for axis, (p, s) in enumerate(zip(start, size)):
        index = [slice(None)] * arr.ndim
        if p > 0:
            index[lead + axis] = slice(0, p)
            arr[tuple(index)] = fill
        if p + s < arr.shape[lead + axis]:
            index[lead + axis] = slice(p + s, None)
            arr[tuple(index)] = fill


def _im2col_shifted(x, kernel, pad, dilation, out_sp, col, work, xp):
    """Stride-1 2-D im2col in two copies with long rows. work[j] (C, N, Hp, Wo) holds the
    input shifted by kernel column j (zero rows/columns where the window leaves the input);
    the rows of column j are then whole (Ho * Wo) blocks of it:
    col[:, i, j, n] = work[j, :, n, i*dh:][:Ho].
    NumPy pays a fixed cost per copied row: this copies kw*C*N*H rows of Wo values and
    kh*kw*C*N rows of Ho*Wo values instead of kh*kw*C*N*Ho rows of Wo."""
    (kh, kw), (ph, pw), (dh, dw) = kernel, pad, dilation
    height, width = x.shape[2:]
    ho, wo = out_sp

    def run(n0, n1):
        src = x[n0:n1].swapaxes(0, 1)  # (C, m, H, W)
        for j in range(kw):
            s = j * dw - pw  # work[j][..., z] = x[..., z + s]
            lo, hi = max(0, -s), min(wo, width - s)
            shifted = work[j, :, n0:n1]
            if hi > lo:
                shifted[:, :, ph : ph + height, lo:hi] = src[:, :, :, lo + s : hi + s]
                fill_border(shifted, (ph, lo), (height, hi - lo))
            else:
                shifted[...] = 0
            for i in range(kh):
                col[:, i, j, n0:n1] = shifted[:, :, i * dh : i * dh + ho]

    parallel_batch(x.shape[0], run, col.size, xp)
    return col


def im2col(x, kernel, pad, stride, dilation, out=None, work=None):
    """Columns of a batch x (N, C, *spatial): returns col (C, *kernel, N, *out_spatial).

    col[c, i, j, n, y, z] = x[n, c, y*s - p + i*d, z*s - p + j*d] (0 outside the input).
    `out`: optional destination of that shape. `work`: optional work array of any contents
    (cells outside the input are zeroed here): of shape `shift_work_shape(...)` for the
    stride-1 2-D path (taken when `work` is None or has that shape), else (C, N, *padded)
    (needed when any pad > 0; allocated here when not given).
    """
    xp = backend.get_array_module(x)
    kernel, pad, stride, dilation = map(tuple, (kernel, pad, stride, dilation))
    n_img = x.shape[0]
    out_sp, padded = _geometry(x.shape[2:], kernel, pad, stride, dilation)
    shape = (x.shape[1],) + kernel + (n_img,) + out_sp
    if out is None:
        col = xp.empty(shape, dtype=x.dtype)
    else:
        col = out.view()
        col.shape = shape  # raises rather than silently writing into a reshaped copy
    shift_shape = shift_work_shape(x.shape, kernel, pad, stride, dilation)
    if shift_shape is not None and (work is None or work.shape == shift_shape):
        if work is None:
            work = xp.empty(shift_shape, dtype=x.dtype)
        return _im2col_shifted(x, kernel, pad, dilation, out_sp, col, work, xp)
    use_pad = any(pad)
    if use_pad:
        if work is None:
            work = xp.empty((x.shape[1], n_img) + padded, dtype=x.dtype)
        interior = tuple(slice(p, p + s) for p, s in zip(pad, x.shape[2:]))
    windows = list(_windows(kernel, stride, dilation, out_sp))
    lead = (slice(None),) * 2

    def run(n0, n1):
        if use_pad:
            src = work[:, n0:n1]
            src[lead + interior] = x[n0:n1].swapaxes(0, 1)
            fill_border(src, pad, x.shape[2:])
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


class PhaseGrid:
    """Phase-plane layout of one 2-D window geometry (see the module docstring).

    Input (..., H, W) is split into `planes` (n_phases, ..., plane) by `split`; the values read
    by kernel offset `code` = i * kw + j for all outputs are `window(planes, k, shift)` for the
    `(code, k, shift)` entries of `offsets`: an (..., Ho * Wq) slice whose column y * Wq + z
    is output (y, z) for z < Wo. Plane cells outside the input keep whatever the planes array
    was filled with (0 for convolution, -inf for max pooling).
    """

    def __init__(self, size, kernel, stride, pad, dilation, out):
        (height, width), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = (
            size,
            kernel,
            stride,
            pad,
            dilation,
            out,
        )
        self.size, self.out = (height, width), (ho, wo)
        qh, qw = ((kh - 1) * dh) // sh, ((kw - 1) * dw) // sw
        self.hq, self.wq = ho + qh, wo + qw
        self.plane = self.hq * self.wq + qw
        self.grid = ho * self.wq
        used = sorted({((i * dh) % sh, (j * dw) % sw) for i in range(kh) for j in range(kw)})
        index = {ab: k for k, ab in enumerate(used)}
        # (code, phase index, flat shift) per kernel offset, in Caffe's row-major order.
        self.offsets = [
            (
                i * kw + j,
                index[((i * dh) % sh, (j * dw) % sw)],
                ((i * dh) // sh) * self.wq + (j * dw) // sw,
            )
            for i in range(kh)
            for j in range(kw)
        ]
        self.phases = []  # per used phase: (plane rows, plane cols, input rows, input cols)
        rows_seen = np.zeros(height, bool)
        cols_seen = np.zeros(width, bool)
        for a, b in used:
            ry = _phase_span(a, sh, ph, height, self.hq)
            rz = _phase_span(b, sw, pw, width, self.wq)
            if ry is None or rz is None:
                self.phases.append(None)
                continue
            (y0, y1, h0), (z0, z1, w0) = ry, rz
            rows = slice(h0, h0 + sh * (y1 - y0 - 1) + 1, sh)
            cols = slice(w0, w0 + sw * (z1 - z0 - 1) + 1, sw)
            rows_seen[rows] = True
            cols_seen[cols] = True
            self.phases.append((slice(y0, y1), slice(z0, z1), rows, cols))
        self.covers = bool(rows_seen.all() and cols_seen.all() and len(used) == sh * sw)

    @property
    def num_phases(self):
        return len(self.phases)

    def _plane_grid(self, plane_arr):
        return plane_arr[..., : self.hq * self.wq].reshape(
            plane_arr.shape[:-1] + (self.hq, self.wq)
        )

    def split(self, x, planes):
        """Write x (..., H, W) into the interiors of planes (n_phases, ..., plane)."""
        for k, ph in enumerate(self.phases):
            if ph is not None:
                py, pz, rows, cols = ph
                self._plane_grid(planes[k])[..., py, pz] = x[..., rows, cols]

    def fill_outside(self, planes, fill):
        """Set every cell of planes (n_phases, ..., plane) that `split` does not write to
        `fill`: a shared work array may hold another layer's values there."""
        for k, ph in enumerate(self.phases):
            if ph is None:
                planes[k] = fill
                continue
            py, pz = ph[:2]
            interior = (py.stop - py.start, pz.stop - pz.start)
            fill_border(self._plane_grid(planes[k]), (py.start, pz.start), interior, fill)
            planes[k, ..., self.hq * self.wq :] = fill

    def merge(self, planes, out):
        """out (..., H, W) = the planes' interiors (the inverse of split); input cells that no
        window reads are set to 0."""
        if not self.covers:
            out[...] = 0
        for k, ph in enumerate(self.phases):
            if ph is not None:
                py, pz, rows, cols = ph
                out[..., rows, cols] = self._plane_grid(planes[k])[..., py, pz]

    def window(self, planes, k, shift):
        return planes[k, ..., shift : shift + self.grid]

    def crop(self, grid_arr):
        """View (..., Ho, Wo) of an (..., Ho * Wq) output-grid array."""
        g = grid_arr.reshape(grid_arr.shape[:-1] + (self.out[0], self.wq))
        return g[..., : self.out[1]]


def _phase_span(phase, stride, pad, size, limit):
    """Plane index range [y0, y1) holding input cells of one phase, and its first input index."""
    y0 = max(0, -((phase - pad) // stride))  # ceil((pad - phase) / stride)
    y1 = min(limit, (size - 1 + pad - phase) // stride + 1)
    if y1 <= y0:
        return None
    return y0, y1, y0 * stride + phase - pad


def _nlast(x):
    """(N, C, *S) -> view (C, *S, N)."""
    return x.transpose(tuple(range(1, x.ndim)) + (0,))


def col2im_nlast(col, kernel, pad, stride, dilation, out, work):
    """`col2im` of batch-minor columns col (C, *kernel, *out_spatial, N): out (N, C, *spatial).

    A stride-1 window add then runs over rows of Wo * N values. `work`: (C, *padded, N)
    scratch. Threads split the channels.
    """
    xp = backend.get_array_module(col)
    kernel, pad, stride, dilation = map(tuple, (kernel, pad, stride, dilation))
    spatial = tuple(out.shape[2:])
    out_sp, _ = _geometry(spatial, kernel, pad, stride, dilation)
    interior = tuple(slice(p, p + s) for p, s in zip(pad, spatial))
    windows = list(_windows(kernel, stride, dilation, out_sp))
    dst = _nlast(out)

    def run(c0, c1):
        w = work[c0:c1]
        w[...] = 0
        for offset, win in windows:
            acc = w[(slice(None),) + win]
            xp.add(acc, col[(slice(c0, c1),) + offset], out=acc)
        dst[c0:c1] = w[(slice(None),) + interior]

    parallel_batch(out.shape[1], run, col.size, xp)
    return out
