"""Convolution, Deconvolution and Im2col layers over Caffe's BaseConvolutionLayer shape rules.

Forward, on wide maps whose columns of one image fit in cache: each thread takes a few images
at a time, builds their columns and runs Caffe's GEMM per image straight into the top, where
that rounds exactly like one GEMM over the batch (im2col.split_gemms_exact). Otherwise, and for
the bottom gradient: im2col over the whole batch (cut into ~64 MB chunks of images) and one
GEMM per group and chunk.
The weight gradient keeps Caffe's per-image accumulation order (dW += dY_n col_n^T, image by
image): one large GEMM would sum in another float32 order, and training then drifts from
Caffe's. Stride-1 "same-size" layers with C_out <= C_in get their bottom gradient as a
convolution of the top diff with the flipped weights (no column gradient, no col2im).
Work matrices that live only within one forward or backward come from the thread's shared
workspace (one per role for the whole net); only the kept columns are the layer's own.
Stride-1 single-group 2-D convolutions where the Fourier transform needs at most half the
multiply-adds (engine.fourier) take their gradients that way; their forward too in TEST-phase
nets, and in TRAIN nets when ENGINE_FOURIER_FORWARD=all (a TRAIN forward otherwise keeps
Caffe's bits: see fourier.forward_mode).
"""

import math

import numpy as np

from engine import backend, fourier
from engine.im2col import (
    batched_matmul,
    col2im,
    col2im_nlast,
    conv_out_size,
    im2col,
    parallel_batch,
    parallel_gemms,
    scratch,
    shift_work_shape,
    split_gemms_exact,
    workspace,
)
from engine.layer import Layer, register
from engine.proto import caffe_pb2

# Convolution runs through the Fourier transform (engine.fourier) when that needs at most
# 1/FOURIER_GAIN of im2col's multiply-adds (measured, at a MAC ratio of 2.5 to 3.2:
# LeNet conv2 7.8 -> 3.4 ms, CIFAR10-quick conv2 44 -> 22 ms, conv3 19 -> 8 ms forward +
# backward); its small GEMMs run at a lower rate, so a bare saving is not enough.
# `engine: CAFFE` in convolution_param keeps Caffe's im2col order whatever the shape.
FOURIER_GAIN = 2.0
# ...and while each of its spectra (images, top maps, kernels) stays within this many elements
# (64 MB): a kernel spectrum holds 2 * Fh * (Fw // 2 + 1) values per kernel, ~100x the
# weights of a 3x3 layer (VGG-16's conv4 would need 0.5-1 GB).
FOURIER_MAX_SPECTRUM = 1 << 24
# Columns are built and used in chunks of images of at most this many elements (64 MB); the
# column gradient likewise. Measured on CIFAR10-quick (2 cores): larger chunks won over
# cache-sized ones (8 MB: +8%, 1 MB: +60% per training step) - fewer, larger GEMMs.
COL_BUDGET = 1 << 24
# Up to this many elements (128 MB) a TRAIN forward's columns of the whole batch are kept for
# the weight gradient; bigger layers (and TEST nets) rebuild them chunk by chunk in backward.
KEEP_BUDGET = 1 << 25
# Per-image weight-gradient products summed per block of this many elements (cache-sized).
WGRAD_BLOCK = 1 << 20
# Forward runs one GEMM per image (see _forward_per_image) when each image's output map has
# at least this many pixels: those products run near the full GEMM rate on one thread
# (CIFAR10-quick conv2, 32x800x256: forward 19 -> 15 ms on 2 cores, 34 -> 24 on one; its
# conv1 and LeNet's conv1 ran one GEMM per image before). Smaller ones do not (conv3,
# 64x800x64: 58 against 140 GFLOP/s for the whole-batch GEMM, forward 8 -> 8.5 ms).
FUSE_MIN_PIXELS = 256
# ...building the columns of this many elements (4 MB) at a time in each thread, so that they
# are still in cache for the GEMMs (1 image at a time lost to 4 on conv2). A layer whose
# columns of one image exceed it keeps the whole-batch GEMM: nothing stays in cache, and
# those per-image products gained nothing or lost (ResNet-50's conv1: 20 -> 28 ms).
FUSE_BUDGET = 1 << 20
# The flipped-weight bottom gradient computes every input pixel from a full window (zeros
# past the top diff's border): used while input pixels / output pixels stays below this.
FLIP_MAX_RATIO = 1.15
# Columns of the top diff for that bottom gradient are built in chunks of at most this many
# elements (8 MB: measured best on CIFAR10-quick conv2, against 4 MB and 64 MB).
FLIP_BUDGET = 1 << 21


def conv_geometry(layer, cp, num_spatial):
    """Kernel, stride, pad and dilation tuples from a ConvolutionParameter (Caffe's rules:
    one value for all spatial axes or one per axis; *_h/*_w only in 2-D)."""

    def per_axis(name, default, positive):
        h_name, w_name = f"{name}_h", f"{name}_w"
        field = "kernel_size" if name == "kernel" else name
        values = list(getattr(cp, field))
        if cp.HasField(h_name) or cp.HasField(w_name):
            if num_spatial != 2:
                raise layer.error(f"{h_name} & {w_name} can only be used for 2D convolution")
            if values:
                raise layer.error(f"either {field} or {h_name}/{w_name} may be given, not both")
            out = (getattr(cp, h_name), getattr(cp, w_name))
        elif not values:
            if default is None:
                raise layer.error(f"{field} or {h_name}/{w_name} is required")
            out = (default,) * num_spatial
        elif len(values) == 1:
            out = (values[0],) * num_spatial
        elif len(values) == num_spatial:
            out = tuple(values)
        else:
            raise layer.error(
                f"{field} must be given once or once per spatial axis "
                f"({len(values)} values for {num_spatial} spatial axes)"
            )
        if positive and any(v <= 0 for v in out):
            raise layer.error(f"{field} must be positive, got {out}")
        return tuple(int(v) for v in out)

    kernel = per_axis("kernel", None, True)
    stride = per_axis("stride", 1, True)
    pad = per_axis("pad", 0, False)
    dil = list(cp.dilation)
    if len(dil) not in (0, 1, num_spatial):
        raise layer.error(
            f"dilation must be given once or once per spatial axis ({len(dil)} values for "
            f"{num_spatial} spatial axes)"
        )
    dilation = tuple(
        int(dil[0] if len(dil) == 1 else dil[i]) if dil else 1 for i in range(num_spatial)
    )
    if any(d <= 0 for d in dilation):
        raise layer.error(f"dilation must be positive, got {dilation}")
    return kernel, stride, pad, dilation


def setup_geometry(layer, cp, bottom):
    """Set layer.axis, num_spatial, kernel, stride, pad, dilation from a ConvolutionParameter."""
    layer.axis = bottom.canonical_axis(cp.axis)
    layer.num_spatial = bottom.num_axes - layer.axis - 1
    if layer.num_spatial < 1:
        raise layer.error(f"needs at least one spatial axis after axis {layer.axis}")
    layer.kernel, layer.stride, layer.pad, layer.dilation = conv_geometry(
        layer, cp, layer.num_spatial
    )


class BaseConvolution(Layer):
    """Shared shape logic and GEMM plumbing of Convolution and Deconvolution.

    The "image" side is the one unrolled by im2col (the bottom of a Convolution, the top of a
    Deconvolution); the "map" side is the other one. Weights are (map channels,
    image channels / group, *kernel): (C_out, C_in/g, kh, kw) for Convolution and
    (C_in, C_out/g, kh, kw) for Deconvolution, as in Caffe.
    """

    min_num_bottom = 1
    min_num_top = 1
    reverse = False  # Deconvolution swaps the roles of bottom and top

    def check_blob_counts(self, bottom, top):
        super().check_blob_counts(bottom, top)
        if len(bottom) != len(top):
            raise self.error(f"needs as many tops as bottoms, got {len(bottom)} and {len(top)}")

    def layer_setup(self, bottom, top):
        cp = self.param.convolution_param
        setup_geometry(self, cp, bottom[0])
        self.channels = bottom[0].shape[self.axis]
        self.num_output = int(cp.num_output)
        self.group = int(cp.group)
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        if self.group <= 0 or self.channels % self.group:
            raise self.error(
                f"channels ({self.channels}) must be a multiple of group ({self.group})"
            )
        if self.num_output % self.group:
            raise self.error(
                f"num_output ({self.num_output}) must be a multiple of group ({self.group})"
            )
        if self.reverse:
            self.map_channels, self.img_channels = self.channels, self.num_output
        else:
            self.map_channels, self.img_channels = self.num_output, self.channels
        self.is_1x1 = all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)
        self.is_1x1 = self.is_1x1 and not any(self.pad)
        self.bias_term = bool(cp.bias_term)
        self.blobs.clear()
        wshape = (self.map_channels, self.img_channels // self.group) + self.kernel
        self.add_blob(wshape, cp.weight_filler)
        if self.bias_term:
            self.add_blob((self.num_output,), cp.bias_filler)
        self._buf = {}
        self._cols_kept = {}
        self._shape_key = None

    def reshape(self, bottom, top):
        b0 = bottom[0]
        if b0.num_axes != self.axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change (got shape {b0.shape})")
        if b0.shape[self.axis] != self.channels:
            raise self.error(
                f"input has {b0.shape[self.axis]} channels, the layer was set up for "
                f"{self.channels}"
            )
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != b0.shape:
                raise self.error(f"shape mismatch: bottom[0] {b0.shape} vs bottom[{i}] {b.shape}")
        self.num = b0.count_range(0, self.axis)
        in_sp = b0.shape[self.axis + 1 :]
        out_sp = self.output_spatial(in_sp)
        if any(o <= 0 for o in out_sp):
            raise self.error(f"output size {out_sp} is not positive for input {b0.shape}")
        for t in top:
            t.reshape(b0.shape[: self.axis] + (self.num_output,) + out_sp)
        key = (self.num, in_sp)
        if key == self._shape_key:
            return
        self._shape_key = key
        if self.reverse:
            self.img_spatial, self.map_spatial = out_sp, in_sp
        else:
            self.img_spatial, self.map_spatial = in_sp, out_sp
        self.img_dim = int(np.prod(self.img_spatial))
        self.map_dim = int(np.prod(self.map_spatial))
        self.kernel_dim = self.img_channels * int(np.prod(self.kernel))
        per_image = max(self.kernel_dim, self.map_channels) * self.map_dim
        most = max(1, COL_BUDGET // max(per_image, 1))
        pieces = -(-self.num // most)
        self.chunk = -(-self.num // pieces)  # equal chunks
        self.dgrad_nlast = not self.is_1x1 and self._batch_minor_wins(pieces)
        self.keep_cols = self.kernel_dim * self.num * self.map_dim <= KEEP_BUDGET
        self.fused = (
            not (self.is_1x1 or self.reverse)
            and self.map_dim >= FUSE_MIN_PIXELS
            and self.kernel_dim * self.map_dim <= FUSE_BUDGET
            and backend.get_array_module(b0.data) is np
            and split_gemms_exact(
                self.num_output // self.group,
                self.kernel_dim // self.group,
                self.map_dim,
                b0.data.dtype,
            )
        )
        self.fuse_group = max(1, FUSE_BUDGET // max(self.kernel_dim * self.map_dim, 1))
        # Bottom gradient as a convolution of the top diff with the flipped weights: for a
        # stride-1 "same-size" 2-D convolution that is one C_out*k*k-deep GEMM (like forward)
        # instead of a C_out-deep one writing the whole column gradient, then col2im. Measured:
        # a small win on CIFAR10-quick conv2 (C_out = C_in), none on conv3 (C_out = 2 C_in,
        # twice the columns to build), so only while C_out <= C_in.
        self.flip_dgrad = (
            not self.reverse
            and self.num_output <= self.channels
            and not self.is_1x1
            and self.group == 1
            and self.num_spatial == 2
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and all(p <= k - 1 for p, k in zip(self.pad, self.kernel))
            and self.img_dim <= FLIP_MAX_RATIO * self.map_dim
        )
        flip_image = self.num_output * int(np.prod(self.kernel)) * self.img_dim
        pieces = -(-self.num // max(1, FLIP_BUDGET // max(flip_image, 1)))
        self.flip_chunk = -(-self.num // pieces)
        self.fourier = self._fourier_plan(b0)
        train = self.phase == caffe_pb2.TRAIN
        self.fourier_forward = self.fourier is not None and fourier.forward_enabled(train)
        # Fourier gradients start from the bottom's spectrum: columns need not be kept. A TEST
        # net keeps none either (it rarely runs backward, which then rebuilds them): features
        # and test nets beside a training net would otherwise hold a batch of columns per layer.
        self.keep_cols = self.keep_cols and self.fourier is None and train
        self._buf = {}
        self._cols_kept = {}

    def _fourier_plan(self, b0):
        """An engine.fourier.Plan when this layer runs faster through the Fourier transform
        (2-D Convolution, stride and dilation 1, one group, NumPy), else None."""
        cp = self.param.convolution_param
        if (
            self.reverse
            or self.is_1x1
            or self.group != 1
            or self.num_spatial != 2
            or self.stride != (1, 1)
            or self.dilation != (1, 1)
            or cp.engine == cp.CAFFE
            or backend.get_array_module(b0.data) is not np
        ):
            return None
        plan = fourier.Plan(self.img_spatial, self.kernel, self.pad, b0.data.dtype)
        counts = (self.num * self.channels, self.num * self.num_output)
        counts += (self.channels * self.num_output,)
        if math.prod(plan.spectrum_shape(max(counts))) > FOURIER_MAX_SPECTRUM:
            return None
        direct = fourier.direct_macs(
            self.num, self.channels, self.num_output, self.kernel, self.map_spatial
        )
        if FOURIER_GAIN * plan.macs(self.num, self.channels, self.num_output) > direct:
            return None
        return plan

    def _batch_minor_wins(self, pieces):
        """Whether col2im for the bottom gradient should run on batch-minor columns.

        NumPy pays ~12 ns per row in col2im's strided adds: Caffe's column order has
        K * N * Ho rows of Wo values, batch-minor K * Ho rows of Wo * m values (stride 1) per
        chunk, at the price of transposing the top diff (~3 ns a value) and the result
        (~0.6 ns a value).
        """
        lead = int(np.prod(self.map_spatial[:-1]))
        last = self.map_spatial[-1] if self.stride[-1] > 1 else 1
        exact = 12 * self.kernel_dim * self.num * lead
        nlast = 12 * self.kernel_dim * lead * last * pieces
        nlast += self.num * (
            3 * self.map_channels * self.map_dim + self.img_channels * self.img_dim
        )
        return nlast < exact

    def output_spatial(self, in_sp):
        raise NotImplementedError

    # --- building blocks over chunks of the batch --------------------------------------------
    def _chunks(self, size=None):
        size = size or self.chunk
        return [(n0, min(self.num, n0 + size)) for n0 in range(0, self.num, size)]

    def _img_shape(self, m):
        return (m, self.img_channels) + self.img_spatial

    def _geom(self):
        return self.kernel, self.pad, self.stride, self.dilation

    def _matrix(self, role, rows, m, xp):
        """A (rows, m * map_dim) work matrix from the thread's shared workspace."""
        return workspace(role, (rows, m * self.map_dim), xp=xp)

    def _padded_spatial(self):
        return tuple(s + 2 * p for s, p in zip(self.img_spatial, self.pad))

    def _columns(self, img, slot, n0=None):
        """im2col of img (m, C_img, *img_spatial): (K, m * P). With `n0` (forward) and
        `keep_cols`, written into the slot's whole-batch matrix at images n0:n0+m (kept for
        backward); else into a chunk buffer."""
        xp = backend.get_array_module(img)
        m = img.shape[0]
        if n0 is not None and self.keep_cols:
            shape = (self.kernel_dim, self.num * self.map_dim)
            full = scratch(self._buf, ("cols", slot), shape, xp=xp)
            col = full[:, n0 * self.map_dim : (n0 + m) * self.map_dim]
        else:
            col = self._matrix("col", self.kernel_dim, m, xp)
        shift_shape = shift_work_shape(img.shape, *self._geom())
        if shift_shape is not None:  # stride 1, 2-D: the shifted-rows path
            work = workspace("shift", shift_shape, xp=xp)
        elif any(self.pad):
            shape = (self.img_channels, m) + self._padded_spatial()
            work = workspace("pad", shape, xp=xp)
        else:
            work = None
        im2col(img, *self._geom(), out=col, work=work)
        return col

    def _uncolumns(self, col, out):
        """col2im of col (K, m * P) into out (m, C_img, *img_spatial), overwriting it."""
        xp = backend.get_array_module(col)
        work = workspace("acc", (self.img_channels, out.shape[0]) + self._padded_spatial(), xp=xp)
        col2im(col, out.shape, *self._geom(), out=out, work=work)

    def _uncolumns_nlast(self, col, out):
        """col2im of batch-minor columns col (K, P * m) into out (m, C_img, *img_spatial)."""
        xp = backend.get_array_module(col)
        m = out.shape[0]
        work = workspace("nacc", (self.img_channels,) + self._padded_spatial() + (m,), xp=xp)
        shape = (self.img_channels,) + self.kernel + self.map_spatial + (m,)
        col2im_nlast(col.reshape(shape), *self._geom(), out=out, work=work)

    def _to_rows_nlast(self, maps, key):
        """maps (m, C_map, P) -> rows (C_map, P * m): batch-minor, a transposed copy."""
        xp = backend.get_array_module(maps)
        m = maps.shape[0]
        rows = self._matrix(key, self.map_channels, m, xp)
        r3 = rows.reshape(self.map_channels, self.map_dim, m)

        def run(c0, c1):  # threads split the channels: each writes whole rows
            r3[c0:c1] = maps[:, c0:c1].transpose(1, 2, 0)

        parallel_batch(self.map_channels, run, maps.size, xp)
        return rows

    def _to_rows(self, maps, key):
        """maps (m, C_map, P) -> rows (C_map, m * P), a transposed copy in a buffer."""
        xp = backend.get_array_module(maps)
        m = maps.shape[0]
        rows = self._matrix(key, self.map_channels, m, xp)
        r3 = rows.reshape(self.map_channels, m, self.map_dim)

        def run(n0, n1):
            r3[:, n0:n1] = maps[n0:n1].swapaxes(0, 1)

        parallel_batch(m, run, maps.size, xp)
        return rows

    def _from_rows(self, rows, out, bias=None):
        """rows (C_map, m * P) -> out (m, C_map, P), adding bias (C_map,) when given."""
        xp = backend.get_array_module(rows)
        m = out.shape[0]
        r3 = rows.reshape(self.map_channels, m, self.map_dim)

        def run(n0, n1):
            src = r3[:, n0:n1].swapaxes(0, 1)
            if bias is None:
                out[n0:n1] = src
            else:
                xp.add(src, bias[:, None], out=out[n0:n1])

        parallel_batch(m, run, out.size, xp)

    def _weights(self):
        """Per-group weight matrices (C_map/g, K/g) as views of blobs[0].data."""
        w = self.blobs[0].data.reshape(self.map_channels, -1)
        mg = self.map_channels // self.group
        return [w[g * mg : (g + 1) * mg] for g in range(self.group)]

    def _groups(self, a, rows_per_group):
        return [a[g * rows_per_group : (g + 1) * rows_per_group] for g in range(self.group)]

    def _map_from_col(self, col, out_rows):
        """out_rows (C_map, m*P) = W @ col, per group."""
        xp = backend.get_array_module(col)
        kg = self.kernel_dim // self.group
        mg = self.map_channels // self.group
        for w, c, o in zip(self._weights(), self._groups(col, kg), self._groups(out_rows, mg)):
            xp.matmul(w, c, out=o)

    def _col_from_map(self, rows, col):
        """col (K, m*P) = W^T @ rows, per group."""
        xp = backend.get_array_module(rows)
        kg = self.kernel_dim // self.group
        mg = self.map_channels // self.group
        for w, r, c in zip(self._weights(), self._groups(rows, mg), self._groups(col, kg)):
            xp.matmul(w.T, r, out=c)

    def _weight_grad(self, maps, cols):
        """blobs[0].diff += sum_n maps[n] @ cols[n]^T, added image by image in Caffe's order.

        maps (m, C_map, P), cols (m, K, P) (views). Each image's product is one GEMM, computed
        transposed ((K, P) @ (P, C_map): the faster orientation here, bitwise the same sums);
        the images are split between threads.
        """
        xp = backend.get_array_module(maps)
        m = maps.shape[0]
        kg = self.kernel_dim // self.group
        mg = self.map_channels // self.group
        dw = self.blobs[0].diff.reshape(self.map_channels, -1)
        # parts[0] = dW^T so far, parts[1 + i] = the product of image n0 + i: summing over the
        # first axis adds them one after the other (NumPy reduces an outer axis in order),
        # i.e. ((dW + G_0) + G_1) + ... exactly as Caffe accumulates. Blocks of images keep
        # the parts in cache.
        block = max(2, min(m, WGRAD_BLOCK // max(kg * mg, 1)))
        parts = workspace("wgrad", (block + 1, kg, mg), xp=xp)
        for g in range(self.group):
            c = cols[:, g * kg : (g + 1) * kg]
            a = maps[:, g * mg : (g + 1) * mg].swapaxes(1, 2)
            dwt = dw[g * mg : (g + 1) * mg].T
            total = parts[0]
            total[...] = dwt
            for n0 in range(0, m, block):
                n1 = min(m, n0 + block)
                p = parts[: n1 - n0 + 1]
                batched_matmul(c[n0:n1], a[n0:n1], p[1:])
                xp.add.reduce(p, axis=0, out=total)
            dwt[...] = total

    def _col_images(self, col, m):
        """(m, K, P) view of a (K, m * P) column matrix."""
        return col.reshape(self.kernel_dim, m, self.map_dim).swapaxes(0, 1)

    def _bias_grad(self, top_diff3):
        """bias.diff += per-image sums of the top diff (N, C_out, P), image by image."""
        if not (self.bias_term and self.param_propagate(1)):
            return
        xp = backend.get_array_module(top_diff3)
        ones = scratch(self._buf, "ones", (top_diff3.shape[2],), xp=xp, fill=1.0)
        n, c = top_diff3.shape[:2]
        parts = workspace("bparts", (n + 1, c), xp=xp)
        xp.matmul(top_diff3, ones, out=parts[1:])  # (N, C_out): one GEMV per image, like Caffe
        db = self.blobs[1].diff
        if c < 2:  # a contiguous reduction would sum pairwise: keep the plain order
            for i in range(1, n + 1):
                db += parts[i]
            return
        # ((db + s_0) + s_1) + ...: a reduction over the outer axis adds the rows in order.
        parts[0] = db
        xp.add.reduce(parts, axis=0, out=db)

    # 1x1, stride 1, no pad: each picture is its own column matrix.
    def _map_from_img_1x1(self, img3, out3):
        xp = backend.get_array_module(img3)
        if self.group == 1:
            xp.matmul(self._weights()[0], img3, out=out3)
            return
        cg = self.img_channels // self.group
        mg = self.map_channels // self.group
        for g, w in enumerate(self._weights()):
            out3[:, g * mg : (g + 1) * mg] = xp.matmul(w, img3[:, g * cg : (g + 1) * cg])

    def _img_from_map_1x1(self, map3, out3):
        xp = backend.get_array_module(map3)
        cg = self.img_channels // self.group
        mg = self.map_channels // self.group
        for g, w in enumerate(self._weights()):
            out3[:, g * cg : (g + 1) * cg] = xp.matmul(w.T, map3[:, g * mg : (g + 1) * mg])


@register("Convolution")
class Convolution(BaseConvolution):
    """y[n, o] = sum_c W[o, c] (*) x[n, c] + b[o] (cross-correlation, stride/pad/dilation/group).

    bottom (N, C, H, W) -> top (N, num_output, Ho, Wo), Ho = (H + 2p - (d(k-1)+1)) / s + 1.
    Weights (num_output, C/group, kh, kw), bias (num_output,). Several bottom/top pairs share
    the weights. N-d spatial shapes work the same way.
    """

    def output_spatial(self, in_sp):
        return tuple(
            conv_out_size(s, k, p, st, d)
            for s, k, p, st, d in zip(in_sp, self.kernel, self.pad, self.stride, self.dilation)
        )

    def forward(self, bottom, top):
        bias = self.blobs[1].data if self.bias_term else None
        for slot, (b, t) in enumerate(zip(bottom, top)):
            img = b.data.reshape(self._img_shape(self.num))
            out = t.data.reshape(self.num, self.num_output, self.map_dim)
            if self.is_1x1:
                self._map_from_img_1x1(img.reshape(self.num, self.channels, -1), out)
                if bias is not None:
                    out += bias[:, None]
                continue
            if self.fourier_forward:
                self._forward_fourier(slot, img, out, bias)
                continue
            if self.fused:
                self._forward_per_image(slot, img, out, bias)
                continue
            for n0, n1 in self._chunks():
                col = self._columns(img[n0:n1], slot, n0)
                xp = backend.get_array_module(col)
                rows = self._matrix("rows", self.num_output, n1 - n0, xp)
                self._map_from_col(col, rows)
                self._from_rows(rows, out[n0:n1], bias)
            # Kept columns stay valid for backward (the bottom does not change in between);
            # chunk columns live in the shared workspace and are rebuilt there.
            self._cols_kept[slot] = self.keep_cols

    def _forward_per_image(self, slot, img, out, bias):
        """out (N, C_out, P) = W @ columns, one GEMM per image and group, as Caffe runs them.

        Threads take whole images (OpenBLAS on one thread meanwhile), fuse_group at a time:
        their columns are built and used while in cache, and each product lands in the top
        without a transposed copy."""
        if self.keep_cols:  # allocated here, not by the threads at once
            shape = (self.kernel_dim, self.num * self.map_dim)
            scratch(self._buf, ("cols", slot), shape)
        weights = self._weights()
        kg = self.kernel_dim // self.group
        mg = self.num_output // self.group
        p = self.map_dim

        def run(n0, n1):
            for a in range(n0, n1, self.fuse_group):
                e = min(n1, a + self.fuse_group)
                col = self._columns(img[a:e], slot, a)
                for i in range(e - a):
                    c = col[:, i * p : (i + 1) * p]
                    for w, cg, og in zip(
                        weights, self._groups(c, kg), self._groups(out[a + i], mg)
                    ):
                        np.matmul(w, cg, out=og)
                if bias is not None:
                    out[a:e] += bias[:, None]

        if not parallel_gemms(self.num, run, out.size):
            run(0, self.num)
        self._cols_kept[slot] = self.keep_cols

    def backward(self, top, propagate_down, bottom):
        need_w = self.param_propagate(0)
        for slot, (t, b) in enumerate(zip(top, bottom)):
            dmap = t.diff.reshape(self.num, self.num_output, self.map_dim)
            self._bias_grad(dmap)
            need_x = propagate_down[slot]
            if not (need_w or need_x):
                continue
            img = b.data.reshape(self._img_shape(self.num))
            dimg = b.diff.reshape(self._img_shape(self.num))
            if self.is_1x1:
                img3 = img.reshape(self.num, self.channels, -1)
                if need_w:
                    self._weight_grad(dmap, img3)
                if need_x:
                    self._img_from_map_1x1(dmap, dimg.reshape(self.num, self.channels, -1))
                continue
            if self.fourier is not None:
                self._backward_fourier(slot, img, dmap, dimg, need_w, need_x)
                continue
            if need_x and self.flip_dgrad:
                for n0, n1 in self._chunks(self.flip_chunk):
                    self._dgrad_flipped(dmap[n0:n1], dimg[n0:n1])
                need_x = False
            for n0, n1 in reversed(self._chunks()):
                if not (need_w or need_x):
                    break
                m = n1 - n0
                xp = backend.get_array_module(img)
                if need_w:  # the columns are needed only here
                    if self._cols_kept.get(slot):
                        full = self._buf[("cols", slot)]
                        col = full[:, n0 * self.map_dim : n1 * self.map_dim]
                    else:
                        col = self._columns(img[n0:n1], slot)
                    self._weight_grad(dmap[n0:n1], self._col_images(col, m))
                if need_x:
                    dcol = self._matrix("dcol", self.kernel_dim, m, xp)
                    if self.dgrad_nlast:
                        self._col_from_map(self._to_rows_nlast(dmap[n0:n1], "drows"), dcol)
                        self._uncolumns_nlast(dcol, dimg[n0:n1])
                    else:
                        self._col_from_map(self._to_rows(dmap[n0:n1], "drows"), dcol)
                        self._uncolumns(dcol, dimg[n0:n1])

    # --- through the Fourier transform (engine.fourier) ----------------------------------------
    def _kernel_spectrum(self):
        """Spectrum of the weights as (2, F, C_out, C_in) products want them."""
        plan = self.fourier
        count = self.num_output * self.channels
        w = self.blobs[0].data.reshape((count,) + self.kernel)
        spec = workspace("fourier_kernels", plan.spectrum_shape(count), w.dtype)
        plan.spectrum("kernel", w, spec)
        return spec.reshape(2, plan.freqs, self.num_output, self.channels)

    def _image_spectrum(self, slot, img, keep):
        """Spectrum of the bottom (N*C_in images): kept per slot for the weight gradient when
        forward makes it, else (made by backward) in the shared workspace."""
        plan = self.fourier
        count = self.num * self.channels
        shape = plan.spectrum_shape(count)
        if keep:
            spec = scratch(self._buf, ("spectrum", slot), shape, img.dtype)
        else:
            spec = workspace("fourier_images", shape, img.dtype)
        plan.spectrum("image", img.reshape((count,) + self.img_spatial), spec)
        return spec.reshape(2, plan.freqs, self.num, self.channels)

    def _forward_fourier(self, slot, img, out, bias):
        """top = correlation of the bottom with the weights, frequency by frequency: Y[f] =
        X[f] @ conj(W[f])^T over (N, C_in) x (C_in, C_out); the bias is the DC term."""
        plan = self.fourier
        n, k = self.num, self.num_output
        # Kept for the weight gradient in TRAIN; a TEST net rarely runs backward (it then
        # transforms the bottom again).
        x = self._image_spectrum(slot, img, keep=self.phase == caffe_pb2.TRAIN)
        y = workspace("fourier_maps", plan.spectrum_shape(n * k), img.dtype)
        y4 = y.reshape(2, plan.freqs, n, k)
        fourier.cmatmul(x, self._kernel_spectrum().transpose(0, 1, 3, 2), y4, conj_b=True)
        if bias is not None:  # a constant b is b * Fh * Fw at frequency (0, 0), zero elsewhere
            y4[0, 0] += bias * math.prod(plan.frame)
        plan.inverse("map", y, out.reshape((n * k,) + self.map_spatial))

    def _backward_fourier(self, slot, img, dmap, dimg, need_w, need_x):
        """dX[f] = dY[f] @ W[f] and dW[f] = dY[f]^H @ X[f], back through the inverse
        transforms (the adjoints of the forward's)."""
        plan = self.fourier
        n, c, k = self.num, self.channels, self.num_output
        dy = workspace("fourier_maps", plan.spectrum_shape(n * k), dmap.dtype)
        plan.spectrum("map", dmap.reshape((n * k,) + self.map_spatial), dy)
        dy4 = dy.reshape(2, plan.freqs, n, k)
        if need_x:
            dx = workspace("fourier_images", plan.spectrum_shape(n * c), dmap.dtype)
            fourier.cmatmul(dy4, self._kernel_spectrum(), dx.reshape(2, plan.freqs, n, c))
            plan.inverse("image", dx, dimg.reshape((n * c,) + self.img_spatial))
        if need_w:
            kept = self._buf.get(("spectrum", slot))  # only a Fourier forward keeps one
            if kept is not None:
                x = kept.reshape(2, plan.freqs, n, c)
            else:
                x = self._image_spectrum(slot, img, keep=False)
            dw = workspace("fourier_kernels", plan.spectrum_shape(k * c), dmap.dtype)
            fourier.cmatmul(
                dy4.transpose(0, 1, 3, 2), x, dw.reshape(2, plan.freqs, k, c), conj_a=True
            )
            grad = workspace("fourier_wgrad", (k * c,) + self.kernel, dmap.dtype)
            plan.inverse("kernel", dw, grad)
            self.blobs[0].diff += grad.reshape(self.blobs[0].shape)

    def _dgrad_flipped(self, dmap, dimg):
        """dimg (m, C_in, H, W) = correlation of the top diff dmap (m, C_out, Ho*Wo), padded by
        k - 1 - p, with W[o, c, kh-1-i, kw-1-j] (stride 1, dilation 1, one group)."""
        xp = backend.get_array_module(dmap)
        m = dmap.shape[0]
        dy = dmap.reshape((m, self.num_output) + self.map_spatial)
        pad = tuple(k - 1 - p for k, p in zip(self.kernel, self.pad))
        geom = (self.kernel, pad, (1, 1), (1, 1))
        w = self.blobs[0].data
        wf = workspace("wflip", (self.channels, w.size // self.channels), xp=xp)
        wf.reshape((self.channels, self.num_output) + self.kernel)[...] = w[
            :, :, ::-1, ::-1
        ].swapaxes(0, 1)
        kdim = wf.shape[1]
        col = workspace("fcol", (kdim, m * self.img_dim), xp=xp)
        work = workspace("shift", shift_work_shape(dy.shape, *geom), xp=xp)
        im2col(dy, *geom, out=col, work=work)
        rows = workspace("frows", (self.channels, m * self.img_dim), xp=xp)
        xp.matmul(wf, col, out=rows)
        r3 = rows.reshape(self.channels, m, self.img_dim)
        out = dimg.reshape(m, self.channels, self.img_dim)

        def run(n0, n1):
            out[n0:n1] = r3[:, n0:n1].swapaxes(0, 1)

        parallel_batch(m, run, out.size, xp)


@register("Deconvolution")
class Deconvolution(BaseConvolution):
    """The adjoint of Convolution (transposed convolution): top = col2im(W^T x) + b.

    bottom (N, C, H, W) -> top (N, num_output, Ho, Wo), Ho = s (H - 1) + d(k-1)+1 - 2p.
    Weights (C, num_output/group, kh, kw) as in Caffe, bias (num_output,).
    """

    reverse = True

    def output_spatial(self, in_sp):
        return tuple(
            st * (s - 1) + d * (k - 1) + 1 - 2 * p
            for s, k, p, st, d in zip(in_sp, self.kernel, self.pad, self.stride, self.dilation)
        )

    def forward(self, bottom, top):
        bias = self.blobs[1].data if self.bias_term else None
        for b, t in zip(bottom, top):
            dmap = b.data.reshape(self.num, self.channels, self.map_dim)
            out = t.data.reshape(self._img_shape(self.num))
            if self.is_1x1:
                self._img_from_map_1x1(dmap, out.reshape(self.num, self.num_output, -1))
            else:
                for n0, n1 in self._chunks():
                    rows = self._to_rows(dmap[n0:n1], "drows")
                    xp = backend.get_array_module(rows)
                    col = self._matrix("col", self.kernel_dim, n1 - n0, xp)
                    self._col_from_map(rows, col)
                    self._uncolumns(col, out[n0:n1])
            if bias is not None:
                out3 = out.reshape(self.num, self.num_output, -1)
                out3 += bias[:, None]

    def backward(self, top, propagate_down, bottom):
        need_w = self.param_propagate(0)
        for slot, (t, b) in enumerate(zip(top, bottom)):
            dtop = t.diff.reshape(self._img_shape(self.num))
            self._bias_grad(dtop.reshape(self.num, self.num_output, -1))
            need_x = propagate_down[slot]
            if not (need_w or need_x):
                continue
            x = b.data.reshape(self.num, self.channels, self.map_dim)
            dx = b.diff.reshape(self.num, self.channels, self.map_dim)
            if self.is_1x1:
                dtop3 = dtop.reshape(self.num, self.num_output, -1)
                if need_w:
                    self._weight_grad(x, dtop3)
                if need_x:
                    self._map_from_img_1x1(dtop3, dx)
                continue
            for n0, n1 in self._chunks():
                m = n1 - n0
                col = self._columns(dtop[n0:n1], 0)
                if need_w:
                    self._weight_grad(x[n0:n1], self._col_images(col, m))
                if need_x:
                    rows = self._matrix("rows", self.channels, m, backend.get_array_module(col))
                    self._map_from_col(col, rows)
                    self._from_rows(rows, dx[n0:n1])


@register("Im2col")
class Im2col(Layer):
    """Unrolls each convolution window into a column, Caffe's Im2col layer.

    bottom (N, C, H, W) -> top (N, C * kh * kw, Ho, Wo); channel index c * kh * kw + i * kw + j.
    Uses convolution_param kernel/stride/pad/dilation/axis; backward is col2im.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        cp = self.param.convolution_param
        setup_geometry(self, cp, bottom[0])
        self._buf = {}

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != self.axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change (got shape {b.shape})")
        self.num = b.count_range(0, self.axis)
        self.channels = b.shape[self.axis]
        self.in_sp = b.shape[self.axis + 1 :]
        self.out_sp = tuple(
            conv_out_size(s, k, p, st, d)
            for s, k, p, st, d in zip(self.in_sp, self.kernel, self.pad, self.stride, self.dilation)
        )
        if any(o <= 0 for o in self.out_sp):
            raise self.error(f"kernel does not fit the input {b.shape}")
        self.kernel_dim = self.channels * int(np.prod(self.kernel))
        top[0].reshape(b.shape[: self.axis] + (self.kernel_dim,) + self.out_sp)

    def _geom(self):
        return self.kernel, self.pad, self.stride, self.dilation

    def forward(self, bottom, top):
        x = bottom[0].data.reshape((self.num, self.channels) + self.in_sp)
        col = im2col(x, *self._geom())
        p = int(np.prod(self.out_sp))
        out = top[0].data.reshape(self.num, self.kernel_dim, p)
        out[...] = col.reshape(self.kernel_dim, self.num, p).swapaxes(0, 1)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = backend.get_array_module(top[0].diff)
        p = int(np.prod(self.out_sp))
        dcol = xp.ascontiguousarray(
            top[0].diff.reshape(self.num, self.kernel_dim, p).swapaxes(0, 1)
        )
        shape = (self.num, self.channels) + self.in_sp
        col2im(dcol, shape, *self._geom(), out=bottom[0].diff.reshape(shape))
