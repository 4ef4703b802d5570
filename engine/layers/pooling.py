"""Pooling (MAX with optional argmax top, AVE, STOCHASTIC) with Caffe's output-size and
divisor rules, vectorised over kernel offsets.

Each window offset reads one shifted view of a "phase" plane: the padded input split by
stride phase and flattened, so every offset is one contiguous slice over a cache-sized block
of planes (the output grid carries (k-1)/s spare columns per row, dropped at the end). AVE
pooling of small planes is instead one GEMM with the dense averaging matrix (forward and
backward).
"""

import threading

import numpy as np

from engine import backend
from engine.im2col import PhaseGrid, parallel_batch, scratch, workspace
from engine.layer import Layer, register
from engine.proto import caffe_pb2
from engine.rng import rng

_PP = caffe_pb2.PoolingParameter
_FLT_MIN = float(np.finfo(np.float32).min)  # Caffe's -FLT_MAX
# Phase-plane bytes processed per block (all kernel offsets run on a block while it is cached).
POOL_BLOCK_BYTES = 1 << 20
# AVE pooling of small planes runs as one GEMM with the dense (H*W, Ho*Wo) averaging matrix
# while H*W*Ho*Wo is at most this (CIFAR's 8x8 -> 4x4 and 16x16 -> 8x8 pools qualify).
DENSE_AVE_MAX = 1 << 14


def pooled_size(size, kernel, pad, stride, ceil_mode=True, clip=None):
    """Caffe's pooled length: ceil (or floor) of (size + 2 pad - kernel) / stride, plus one;
    with padding, a last window starting at or beyond size + pad is dropped. `clip`
    (default: pad > 0) says whether that rule applies (Caffe applies it when any pad is set)."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if (pad > 0 if clip is None else clip) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class _Plan:
    """A PhaseGrid for one pooling geometry plus the AVE divisors and argmax-index tables."""

    def __init__(self, height, width, kernel, stride, pad, out):
        (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, pad, out
        self.phase_grid = g = PhaseGrid((height, width), kernel, stride, pad, (1, 1), out)
        self.height, self.width, self.kernel = height, width, kernel
        self.stride, self.pad = stride, pad
        self.ho, self.wo, self.wq = ho, wo, g.wq
        self.plane, self.grid, self.offsets, self.phases = g.plane, g.grid, g.offsets, g.phases
        # AVE divisor: window clipped to [-pad, size + pad), padding cells counted.
        hs = np.arange(ho) * sh - ph
        ws = np.arange(wo) * sw - pw
        size_h = np.minimum(hs + kh, height + ph) - hs
        size_w = np.minimum(ws + kw, width + pw) - ws
        self.divisor = (size_h[:, None] * size_w[None, :]).astype(np.float32)
        # Input position of each (output, code), for the argmax top.
        self.code_h = np.array([-1] + [i for i in range(kh) for _ in range(kw)], np.int64)
        self.code_w = np.array([-1] + [j for _ in range(kh) for j in range(kw)], np.int64)
        self.base_h = (np.arange(ho) * sh - ph)[:, None]
        self.base_w = (np.arange(wo) * sw - pw)[None, :]

    def averaging_matrix(self):
        """A (H*W, Ho*Wo) with A[h*W + w, y*Wo + z] = 1 / divisor[y, z] where input (h, w) is in
        the window of output (y, z) (clipped to the input): AVE pooling is x (., H*W) @ A and
        its backward dy @ A^T (Caffe sums then divides; this rounds differently, ~1 ulp)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        a = np.zeros((self.height, self.width, self.ho, self.wo), np.float32)
        for y in range(self.ho):
            h0 = max(y * sh - ph, 0)
            h1 = min(y * sh - ph + kh, self.height)
            for z in range(self.wo):
                w0 = max(z * sw - pw, 0)
                w1 = min(z * sw - pw + kw, self.width)
                a[h0:h1, w0:w1, y, z] = 1.0 / self.divisor[y, z]
        return a.reshape(self.height * self.width, self.ho * self.wo)

    def split(self, x3, planes, n0, n1):
        """Input rows n0:n1 of x3 (NC, H, W) into the phase planes (NPH, NC, plane)."""
        self.phase_grid.split(x3[n0:n1], planes[:, n0:n1])

    def window(self, planes, k, shift, n0, n1):
        return planes[k, n0:n1, shift : shift + self.grid]


@register("Pooling")
class Pooling(Layer):
    """MAX / AVE / STOCHASTIC pooling over kh x kw windows (stride, pad, ceil or floor rounding).

    bottom (N, C, H, W) -> top (N, C, Ho, Wo), Ho = ceil((H + 2p - k) / s) + 1 (clipped as in
    Caffe). MAX may add a second top: the argmax as float h * W + w in the input plane. AVE
    divides by the window clipped to [-p, H + p). STOCHASTIC samples in TRAIN (probability
    proportional to the activation) and returns sum(x^2) / sum(x) in TEST.
    """

    exact_num_bottom = 1
    min_num_top = 1
    max_num_top = 2

    def layer_setup(self, bottom, top):
        pp = self.param.pooling_param
        self.method = pp.pool
        if len(top) > 1 and self.method != _PP.MAX:
            raise self.error("only MAX pooling can have a second (mask) top")
        self.global_pooling = pp.global_pooling
        has_hw = pp.HasField("kernel_h") or pp.HasField("kernel_w")
        if self.global_pooling:
            if pp.HasField("kernel_size") or has_hw:
                raise self.error("with global_pooling the kernel size cannot be specified")
        else:
            if pp.HasField("kernel_size") and has_hw:
                raise self.error("kernel is kernel_size OR kernel_h and kernel_w, not both")
            if not pp.HasField("kernel_size") and not (
                pp.HasField("kernel_h") and pp.HasField("kernel_w")
            ):
                raise self.error("kernel_size or both kernel_h and kernel_w are required")
        if (pp.HasField("pad") and (pp.HasField("pad_h") or pp.HasField("pad_w"))) or (
            not pp.HasField("pad_h") and pp.HasField("pad_w")
        ):
            raise self.error("pad is pad OR pad_h and pad_w, not both")
        if (pp.HasField("stride") and (pp.HasField("stride_h") or pp.HasField("stride_w"))) or (
            not pp.HasField("stride_h") and pp.HasField("stride_w")
        ):
            raise self.error("stride is stride OR stride_h and stride_w, not both")
        if has_hw:
            self.kernel = (int(pp.kernel_h), int(pp.kernel_w))
        else:
            self.kernel = (int(pp.kernel_size),) * 2
        if pp.HasField("pad_h"):
            self.pad = (int(pp.pad_h), int(pp.pad_w))
        else:
            self.pad = (int(pp.pad),) * 2
        if pp.HasField("stride_h"):
            self.stride = (int(pp.stride_h), int(pp.stride_w))
        else:
            self.stride = (int(pp.stride),) * 2
        if self.global_pooling:
            if any(self.pad) or any(s != 1 for s in self.stride):
                raise self.error("with global_pooling only pad = 0 and stride = 1 are allowed")
        elif any(k <= 0 for k in self.kernel):
            raise self.error(f"kernel dimensions must be positive, got {self.kernel}")
        if any(s <= 0 for s in self.stride):
            raise self.error(f"stride must be positive, got {self.stride}")
        if any(self.pad):
            if self.method not in (_PP.MAX, _PP.AVE):
                raise self.error("padding is implemented only for AVE and MAX pooling")
            if not self.global_pooling and (
                self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]
            ):
                raise self.error(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        self.ceil_mode = pp.round_mode == _PP.CEIL
        self._buf = {}
        self._plan = None
        self._key = None

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4:
            raise self.error(f"input must have 4 axes (N, C, H, W), got shape {b.shape}")
        n, c, h, w = b.shape
        kernel = (h, w) if self.global_pooling else self.kernel
        any_pad = bool(self.pad[0] or self.pad[1])
        out = tuple(
            pooled_size(size, k, p, s, self.ceil_mode, any_pad)
            for size, k, p, s in zip((h, w), kernel, self.pad, self.stride)
        )
        if any(o <= 0 for o in out):
            raise self.error(f"kernel {kernel} does not fit the input {b.shape}")
        for t in top:
            t.reshape((n, c) + out)
        key = (h, w, kernel, out)
        if key != self._key:
            self._key = key
            self._buf = {}  # plane buffers keep their fill outside the interior: start afresh
            self._plan = _Plan(h, w, kernel, self.stride, self.pad, out)
            # A window covering the whole (unpadded) plane: plain reductions.
            self._whole = out == (1, 1) and not any_pad and kernel[0] >= h and kernel[1] >= w
            self._dense = None
            small = h * w * out[0] * out[1] <= DENSE_AVE_MAX
            if self.method == _PP.AVE and not self._whole and small:
                self._dense = self._plan.averaging_matrix()
        self.nc = n * c

    # --- helpers ---------------------------------------------------------------------------
    def _dense_matrix(self, xp):
        key = ("dense", xp.__name__)
        if key not in self._buf:
            self._buf[key] = xp.asarray(self._dense)
        return self._buf[key]

    def _code_dtype(self):
        kk = self._plan.kernel[0] * self._plan.kernel[1] + 1
        return np.int8 if kk < 127 else (np.int16 if kk < 32767 else np.int32)

    def _each_block(self, fn, xp):
        """fn(n0, n1) over row blocks of the NC planes, small enough to stay in cache across
        all kernel offsets (~POOL_BLOCK_BYTES of phase planes), split between threads."""
        plan = self._plan
        block = self._block_rows()

        def run(r0, r1):
            for n0 in range(r0, r1, block):
                fn(n0, min(r1, n0 + block))

        parallel_batch(self.nc, run, self.nc * plan.plane * len(plan.phases), xp)

    def _block_planes(self, x3, n0, n1, xp, fill):
        """Rows n0:n1 of x3 split into phase planes (n_phases, n1 - n0, plane): a block-sized
        array per thread, kept by the layer so that the cells outside the input keep `fill`
        (refilling them per block costs more than the pooling's arithmetic on small planes)."""
        plan = self._plan
        shape = (len(plan.phases), self._block_rows(), plan.plane)
        key = ("planes", fill, threading.get_ident())
        planes = self._buf.get(key)
        if planes is None or planes.shape != shape or backend.get_array_module(planes) is not xp:
            planes = self._buf[key] = xp.empty(shape, dtype=np.float32)
            plan.phase_grid.fill_outside(planes, fill)
        planes = planes[:, : n1 - n0]
        plan.phase_grid.split(x3[n0:n1], planes)
        return planes

    def _block_rows(self):
        """Rows of the NC planes per block: ~POOL_BLOCK_BYTES of phase planes."""
        plan = self._plan
        return min(self.nc, max(16, POOL_BLOCK_BYTES // (4 * len(plan.phases) * plan.plane)))

    def _plane_buffer(self, xp, fill):
        plan = self._plan
        shape = (len(plan.phases), self.nc, plan.plane)
        return scratch(self._buf, ("planes", fill), shape, xp=xp, fill=fill)

    def _planes(self, x3, xp, fill):
        plan = self._plan
        planes = self._plane_buffer(xp, fill)
        parallel_batch(self.nc, lambda n0, n1: plan.split(x3, planes, n0, n1), x3.size, xp)
        return planes

    def _grid(self, name, xp, dtype=np.float32):
        return scratch(self._buf, name, (self.nc, self._plan.grid), dtype, xp=xp)

    def _to_output(self, grid, out3):
        plan = self._plan
        g = grid.reshape(self.nc, plan.ho, plan.wq)[:, :, : plan.wo]
        out3[...] = g.reshape(out3.shape)

    def _dy_grid(self, dy, xp, scale=None, n0=0, n1=None):
        """Rows n0:n1 of the top diff on the output grid (zeros in the spare columns),
        optionally divided by `scale`; returns the whole grid array."""
        plan = self._plan
        n1 = self.nc if n1 is None else n1
        g = self._grid("dgrid", xp)
        g3 = g.reshape(self.nc, plan.ho, plan.wq)[n0:n1]
        dy3 = dy.reshape(self.nc, plan.ho, plan.wo)[n0:n1]
        if scale is None:
            g3[:, :, : plan.wo] = dy3
        else:
            xp.divide(dy3, scale, out=g3[:, :, : plan.wo])
        g3[:, :, plan.wo :] = 0
        return g

    def _scatter(self, dx3, xp, body):
        """Run body(dplanes, n0, n1) to accumulate into zeroed phase planes, then merge, per
        block of rows."""
        plan = self._plan

        def run(n0, n1):
            shape = (len(plan.phases), n1 - n0, plan.plane)
            dplanes = workspace("pool_dplanes", shape, xp=xp)
            dplanes[...] = 0
            body(dplanes, n0, n1)
            plan.phase_grid.merge(dplanes, dx3[n0:n1])

        self._each_block(run, xp)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, bottom, top):
        x = bottom[0].data
        xp = backend.get_array_module(x)
        plan = self._plan
        x3 = x.reshape(self.nc, plan.height, plan.width)
        y = top[0].data
        if self._whole and self.method != _PP.STOCHASTIC:
            self._forward_whole(x3, y, top, xp)
            return
        if self.method == _PP.MAX:
            self._forward_max(x3, y, top, xp)
        elif self._dense is not None:
            a = self._dense_matrix(xp)
            xp.matmul(x3.reshape(self.nc, -1), a, out=y.reshape(self.nc, -1))
        elif self.method == _PP.AVE:
            y3 = y.reshape(self.nc, plan.ho, plan.wo)
            divisor = xp.asarray(plan.divisor)

            def run(n0, n1):
                planes = self._block_planes(x3, n0, n1, xp, 0.0)
                a = workspace("pool_acc", (n1 - n0, plan.grid), xp=xp)
                for n, (_, k, shift) in enumerate(plan.offsets):
                    v = plan.window(planes, k, shift, 0, n1 - n0)
                    if n == 0:
                        a[...] = v
                    else:
                        xp.add(a, v, out=a)
                g = a.reshape(n1 - n0, plan.ho, plan.wq)[:, :, : plan.wo]
                xp.divide(g, divisor, out=y3[n0:n1])

            self._each_block(run, xp)
        elif self.method == _PP.STOCHASTIC:
            self._forward_stochastic(x3, y, xp)
        else:
            raise self.error(f"unknown pooling method {self.method}")

    def _forward_whole(self, x3, y, top, xp):
        x2 = x3.reshape(self.nc, -1)
        if self.method == _PP.AVE:
            y.reshape(-1)[...] = x2.sum(axis=1) / np.float32(x2.shape[1])
            return
        idx = x2.argmax(axis=1)
        best = xp.take_along_axis(x2, idx[:, None], axis=1)[:, 0]
        found = best > _FLT_MIN
        code = self._grid("code", xp, np.int64)[:, 0]
        code[...] = xp.where(found, idx + 1, 0)
        y.reshape(-1)[...] = xp.where(found, best, np.float32(_FLT_MIN))
        if len(top) > 1:
            top[1].data.reshape(-1)[...] = code - 1

    def _forward_max(self, x3, y, top, xp):
        plan = self._plan
        code = self._grid("code", xp, self._code_dtype())
        ctype = code.dtype.type
        y3 = y.reshape(self.nc, plan.ho, plan.wo)

        # Masked writes (copyto/where) are slow on random masks; use plain arithmetic:
        # codes grow along the scan, so code = max(code, (v > best) * (c + 1)) keeps the
        # first strict maximum, as Caffe's `if (x > top)` scan does.
        def run(n0, n1):
            rows = n1 - n0
            planes = self._block_planes(x3, n0, n1, xp, float("-inf"))
            b = workspace("pool_best", (rows, plan.grid), xp=xp)
            m = workspace("pool_mask", (rows, plan.grid), bool, xp)
            t = workspace("pool_tcode", (rows, plan.grid), code.dtype, xp)
            # The mask as integers of the code's width (bool * int8 takes a slower cast).
            mi = m.view(code.dtype) if code.dtype.itemsize == 1 else m
            c = code[n0:n1]
            b[...] = _FLT_MIN
            c[...] = 0
            for cc, k, shift in plan.offsets:
                v = plan.window(planes, k, shift, 0, rows)
                xp.greater(v, b, out=m)
                xp.fmax(b, v, out=b)
                xp.multiply(mi, ctype(cc + 1), out=t)
                xp.maximum(c, t, out=c)
            y3[n0:n1] = b.reshape(n1 - n0, plan.ho, plan.wq)[:, :, : plan.wo]

        self._each_block(run, xp)
        if len(top) > 1:
            self._write_mask(code, top[1].data, xp)

    def _write_mask(self, code, out, xp):
        plan = self._plan
        c = code.reshape(self.nc, plan.ho, plan.wq)[:, :, : plan.wo].astype(np.int64)
        h = xp.asarray(plan.base_h) + xp.take(xp.asarray(plan.code_h), c)
        w = xp.asarray(plan.base_w) + xp.take(xp.asarray(plan.code_w), c)
        flat = xp.where(c > 0, h * plan.width + w, -1)
        out.reshape(flat.shape)[...] = flat

    def _forward_stochastic(self, x3, y, xp):
        plan = self._plan
        planes = self._planes(x3, xp, 0.0)
        total = self._grid("total", xp)
        total[...] = 0
        for _, k, shift in plan.offsets:
            total += plan.window(planes, k, shift, 0, self.nc)
        out = self._grid("best", xp)
        if self.phase == caffe_pb2.TEST:
            # sum(x^2) / sum(x) over the window (0 where the sum is not positive).
            sq = self._grid("sq", xp)
            sq[...] = 0
            for _, k, shift in plan.offsets:
                v = plan.window(planes, k, shift, 0, self.nc)
                sq += v * v
            pos = total > 0
            out[...] = xp.where(pos, sq / xp.where(pos, total, 1), 0)
        else:
            u = xp.asarray(rng().random((self.nc, plan.ho, plan.wo), dtype=np.float32))
            thres = self._grid("thres", xp)
            t3 = thres.reshape(self.nc, plan.ho, plan.wq)
            t3[...] = 0
            t3[:, :, : plan.wo] = u * total.reshape(t3.shape)[:, :, : plan.wo]
            code = self._grid("code", xp, self._code_dtype())
            code[...] = 0
            cum = self._grid("cum", xp)
            cum[...] = 0
            out[...] = 0
            for cc, k, shift in plan.offsets:
                v = plan.window(planes, k, shift, 0, self.nc)
                cum += v
                pick = (cum >= thres) & (code == 0)
                xp.copyto(code, cc + 1, where=pick)
                xp.copyto(out, v, where=pick)
        self._to_output(out, y.reshape(self.nc, plan.ho, plan.wo))

    # --- backward --------------------------------------------------------------------------
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        plan = self._plan
        dy = top[0].diff
        xp = backend.get_array_module(dy)
        dx3 = bottom[0].diff.reshape(self.nc, plan.height, plan.width)
        if self._whole and self.method != _PP.STOCHASTIC:
            dx2 = dx3.reshape(self.nc, -1)
            dy1 = dy.reshape(-1)
            if self.method == _PP.AVE:
                dx2[...] = (dy1 / np.float32(dx2.shape[1]))[:, None]
            else:
                dx2[...] = 0
                code = self._grid("code", xp, np.int64)[:, 0]
                rows = xp.nonzero(code > 0)[0]
                dx2[rows, code[rows] - 1] = dy1[rows]
            return
        if self._dense is not None:
            a = self._dense_matrix(xp)
            xp.matmul(dy.reshape(self.nc, -1), a.T, out=dx3.reshape(self.nc, -1))
            return
        if self.method == _PP.AVE:
            divisor = xp.asarray(plan.divisor)

            def body(dplanes, n0, n1):
                g = self._dy_grid(dy, xp, divisor, n0, n1)
                for _, k, shift in plan.offsets:
                    dst = plan.window(dplanes, k, shift, 0, n1 - n0)
                    xp.add(dst, g[n0:n1], out=dst)

        elif self.method == _PP.STOCHASTIC and self.phase == caffe_pb2.TEST:
            body = self._stochastic_test_body(dy, xp)
        else:  # MAX, and STOCHASTIC in TRAIN: the gradient goes to the chosen position
            # One scatter-add over the outputs in order, as Caffe's mask loop does (faster
            # than a pass per kernel offset).
            idx, dy_flat = self._chosen_index(dy, xp)
            dx_flat = dx3.reshape(-1)
            dx_flat[...] = 0
            xp.add.at(dx_flat, idx, dy_flat)
            return
        self._scatter(dx3, xp, body)

    def _chosen_index(self, dy, xp):
        """Flat bottom index of each output's chosen (argmax / sampled) input, and the top
        diff to add there (0 where a window had no candidate, Caffe's mask -1)."""
        plan = self._plan
        code = self._grid("code", xp, self._code_dtype())
        c = code.reshape(self.nc, plan.ho, plan.wq)[:, :, : plan.wo]
        itype = np.int32 if self.nc * plan.height * plan.width < 2**31 else np.int64
        key = ("origin", itype)
        origin = self._buf.get(key)
        if origin is None or origin.shape[0] != self.nc:
            # flat index of every window's (0, 0) cell: plane * H * W + h0 * W + w0
            planes = np.arange(self.nc, dtype=np.int64)[:, None, None] * plan.height * plan.width
            start = plan.base_h * plan.width + plan.base_w
            origin = self._buf[key] = xp.asarray((planes + start).astype(itype))
        offset = xp.asarray((plan.code_h * plan.width + plan.code_w).astype(itype))
        idx = xp.take(offset, c)  # code -> i * W + j
        idx += origin
        dy_flat = dy.reshape(-1)
        missing = c == 0
        if missing.any():
            idx = xp.where(missing, origin, idx)
            dy_flat = xp.where(missing.reshape(-1), 0, dy_flat)
        return idx.reshape(-1), dy_flat

    def _stochastic_test_body(self, dy, xp):
        # d/dx_q [sum x^2 / sum x] = (2 x_q - y) / sum x (0 where sum x <= 0).
        plan = self._plan
        total = self._grid("total", xp)
        y = self._grid("best", xp)
        pos = total > 0
        g = self._dy_grid(dy, xp)
        g[...] = xp.where(pos, g / xp.where(pos, total, 1), 0)
        planes = self._buf[("planes", 0.0)]

        def body(dplanes, n0, n1):
            for _, k, shift in plan.offsets:
                v = plan.window(planes, k, shift, n0, n1)
                dst = plan.window(dplanes, k, shift, 0, n1 - n0)
                dst += g[n0:n1] * (2 * v - y[n0:n1])

        return body
