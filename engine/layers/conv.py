"""Convolution, Deconvolution and Im2col layers over Caffe's BaseConvolutionLayer shape rules.

Whole-batch im2col plus one GEMM per group (Caffe runs one small GEMM per image).
"""

import numpy as np

from engine import backend
from engine.im2col import (
    PhaseGrid,
    col2im,
    col2im_grid,
    conv_out_size,
    im2col,
    im2col_grid,
    parallel_batch,
    scratch,
)
from engine.layer import Layer, register

# Largest column buffer (elements) built at once; bigger batches are cut into chunks of
# images and, when cut, backward recomputes the columns instead of keeping them.
COL_BUDGET = 1 << 25
# Column layout: "auto" picks the phase grid when its spare columns per output row are at
# most GRID_MAX_SPARE of the row (see _grid_layout); "exact" / "grid" force one.
LAYOUT = "auto"
GRID_MAX_SPARE = 0.3


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
        self.axis = bottom[0].canonical_axis(cp.axis)
        self.num_spatial = bottom[0].num_axes - self.axis - 1
        if self.num_spatial < 1:
            raise self.error(f"needs at least one spatial axis after axis {self.axis}")
        self.kernel, self.stride, self.pad, self.dilation = conv_geometry(
            self, cp, self.num_spatial
        )
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
        self.blobs = []
        wshape = (self.map_channels, self.img_channels // self.group) + self.kernel
        self.add_blob(wshape, cp.weight_filler)
        if self.bias_term:
            self.add_blob((self.num_output,), cp.bias_filler)
        self._buf = {}
        self._col_ready = {}

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
        if self.reverse:
            img_sp, map_sp = out_sp, in_sp
        else:
            img_sp, map_sp = in_sp, out_sp
        key = (self.num, img_sp, map_sp)
        if key == getattr(self, "_shape_key", None):
            return
        self._shape_key = key
        self.img_spatial, self.map_spatial = img_sp, map_sp
        self.img_dim = int(np.prod(img_sp))
        self.map_dim = int(np.prod(map_sp))
        self.kernel_dim = self.img_channels * int(np.prod(self.kernel))
        self.grid = None
        if not self.is_1x1 and self._grid_layout():
            self.grid = PhaseGrid(img_sp, self.kernel, self.stride, self.pad, self.dilation, map_sp)
        # Columns per image: the output pixels, or the phase grid's (with spare columns).
        self.col_dim = self.grid.grid if self.grid is not None else self.map_dim
        per_image = max(self.kernel_dim, self.map_channels) * self.col_dim
        self.chunk = max(1, min(self.num, COL_BUDGET // max(per_image, 1)))
        self._buf = {}
        self._col_ready = {}

    def _grid_layout(self):
        """Whether to use the phase-grid column layout (2-D only): its copies are contiguous,
        the exact layout's GEMMs have no spare columns."""
        if self.num_spatial != 2 or LAYOUT == "exact":
            return False
        if LAYOUT == "grid":
            return True
        wo = self.map_spatial[1]
        spare = ((self.kernel[1] - 1) * self.dilation[1]) // self.stride[1]
        return spare <= GRID_MAX_SPARE * wo

    def output_spatial(self, in_sp):
        raise NotImplementedError

    # --- building blocks, whole batch (or chunks of it) -------------------------------------
    def _chunks(self):
        return [(n0, min(self.num, n0 + self.chunk)) for n0 in range(0, self.num, self.chunk)]

    def _img_shape(self, m):
        return (m, self.img_channels) + self.img_spatial

    def _geom(self):
        return self.kernel, self.pad, self.stride, self.dilation

    def _matrix(self, name, rows, m, xp):
        """A (rows, m * col_dim) work matrix kept between calls."""
        return scratch(self._buf, (name, m), (rows, m * self.col_dim), xp=xp)

    def _columns(self, img, slot):
        """im2col of img (m, C_img, *img_spatial) into the slot's buffer, as (K, m * cols)."""
        xp = backend.get_array_module(img)
        m = img.shape[0]
        col = self._matrix(("col", slot), self.kernel_dim, m, xp)
        if self.grid is not None:
            g = self.grid
            planes = scratch(
                self._buf,
                ("planes", m),
                (g.num_phases, self.img_channels, m, g.plane),
                xp=xp,
                fill=0,
            )
            im2col_grid(img, g, self.kernel, col.reshape(self._col5(m)), planes)
            return col
        work = None
        if any(self.pad):
            pshape = (self.img_channels, m) + tuple(
                s + 2 * p for s, p in zip(self.img_spatial, self.pad)
            )
            work = scratch(self._buf, ("pad", m), pshape, xp=xp, fill=0)
        im2col(img, *self._geom(), out=col, work=work)
        return col

    def _col5(self, m):
        return (self.img_channels,) + self.kernel + (m, self.col_dim)

    def _uncolumns(self, col, out):
        """col2im of col (K, m * cols) into out (m, C_img, *img_spatial), overwriting it."""
        xp = backend.get_array_module(col)
        m = out.shape[0]
        if self.grid is not None:
            g = self.grid
            planes = scratch(
                self._buf, ("dplanes", m), (g.num_phases, self.img_channels, m, g.plane), xp=xp
            )
            col2im_grid(col.reshape(self._col5(m)), g, self.kernel, out, planes)
            return
        pshape = (self.img_channels, m) + tuple(
            s + 2 * p for s, p in zip(self.img_spatial, self.pad)
        )
        work = scratch(self._buf, ("acc", m), pshape, xp=xp)
        col2im(col, out.shape, *self._geom(), out=out, work=work)

    def _rows_view(self, rows, m):
        """(C_map, m, *map_spatial) view of a rows matrix: the exact columns, or the grid's
        columns with its spare ones cropped."""
        if self.grid is not None:
            return self.grid.crop(rows.reshape(self.map_channels, m, self.col_dim))
        return rows.reshape((self.map_channels, m) + self.map_spatial)

    def _to_rows(self, maps, key):
        """maps (m, C_map, P) -> rows (C_map, m * cols), a transposed copy (spare grid
        columns zeroed) in a buffer."""
        xp = backend.get_array_module(maps)
        m = maps.shape[0]
        rows = self._matrix(key, self.map_channels, m, xp)
        view = self._rows_view(rows, m)
        src = maps.reshape((m, self.map_channels) + self.map_spatial)
        if self.grid is not None:
            rows.reshape(self.map_channels, m, self.map_spatial[0], self.grid.wq)[
                ..., self.map_spatial[1] :
            ] = 0

        def run(n0, n1):
            view[:, n0:n1] = src[n0:n1].swapaxes(0, 1)

        parallel_batch(m, run, maps.size, xp)
        return rows

    def _from_rows(self, rows, out, bias=None):
        """rows (C_map, m * cols) -> out (m, C_map, P), adding bias (C_map,) when given."""
        xp = backend.get_array_module(rows)
        m = out.shape[0]
        view = self._rows_view(rows, m)
        dst = out.reshape((m, self.map_channels) + self.map_spatial)
        b = None if bias is None else bias.reshape((-1,) + (1,) * self.num_spatial)

        def run(n0, n1):
            src = view[:, n0:n1].swapaxes(0, 1)
            if b is None:
                dst[n0:n1] = src
            else:
                xp.add(src, b, out=dst[n0:n1])

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

    def _weight_grad(self, rows, col):
        """blobs[0].diff += rows @ col^T, per group."""
        kg = self.kernel_dim // self.group
        mg = self.map_channels // self.group
        dw = self.blobs[0].diff.reshape(self.map_channels, -1)
        for d, r, c in zip(self._groups(dw, mg), self._groups(rows, mg), self._groups(col, kg)):
            d += r @ c.T

    # 1x1, stride 1, no pad: the image itself is the column matrix of each picture.
    def _map_from_img_1x1(self, img3, out3):
        xp = backend.get_array_module(img3)
        cg = self.img_channels // self.group
        mg = self.map_channels // self.group
        for g, w in enumerate(self._weights()):
            res = xp.matmul(w, img3[:, g * cg : (g + 1) * cg])
            out3[:, g * mg : (g + 1) * mg] = res

    def _img_from_map_1x1(self, map3, out3):
        xp = backend.get_array_module(map3)
        cg = self.img_channels // self.group
        mg = self.map_channels // self.group
        for g, w in enumerate(self._weights()):
            out3[:, g * cg : (g + 1) * cg] = xp.matmul(w.T, map3[:, g * mg : (g + 1) * mg])

    def _weight_grad_1x1(self, map3, img3):
        xp = backend.get_array_module(map3)
        cg = self.img_channels // self.group
        mg = self.map_channels // self.group
        dw = self.blobs[0].diff.reshape(self.map_channels, -1)
        for g in range(self.group):
            a = map3[:, g * mg : (g + 1) * mg]
            b = img3[:, g * cg : (g + 1) * cg]
            dw[g * mg : (g + 1) * mg] += xp.matmul(a, b.swapaxes(1, 2)).sum(axis=0)

    def _bias_grad(self, top_diff3):
        if self.bias_term and self.param_propagate(1):
            self.blobs[1].diff[...] += top_diff3.sum(axis=(0, 2))


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
            chunks = self._chunks()
            for n0, n1 in chunks:
                col = self._columns(img[n0:n1], slot)
                rows = self._matrix("rows", self.num_output, n1 - n0, backend.get_array_module(col))
                self._map_from_col(col, rows)
                self._from_rows(rows, out[n0:n1], bias)
            # With one chunk the columns stay valid for backward (the bottom is unchanged).
            self._col_ready[slot] = len(chunks) == 1

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
                    self._weight_grad_1x1(dmap, img3)
                if need_x:
                    self._img_from_map_1x1(dmap, dimg.reshape(self.num, self.channels, -1))
                continue
            chunks = self._chunks()
            for n0, n1 in chunks:
                rows = self._to_rows(dmap[n0:n1], "drows")
                if self._col_ready.get(slot) and len(chunks) == 1:
                    col = self._buf[(("col", slot), n1 - n0)]
                else:
                    col = self._columns(img[n0:n1], slot)
                if need_w:
                    self._weight_grad(rows, col)
                if need_x:
                    self._col_ready[slot] = False
                    self._col_from_map(rows, col)
                    self._uncolumns(col, dimg[n0:n1])


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
                    col = self._matrix(("col", 0), self.kernel_dim, n1 - n0, xp)
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
                    self._weight_grad_1x1(x, dtop3)
                if need_x:
                    self._map_from_img_1x1(dtop3, dx)
                continue
            for n0, n1 in self._chunks():
                col = self._columns(dtop[n0:n1], 0)
                if need_w:
                    self._weight_grad(self._to_rows(x[n0:n1], "drows"), col)
                if need_x:
                    rows = self._matrix(
                        "rows", self.channels, n1 - n0, backend.get_array_module(col)
                    )
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
        self.axis = bottom[0].canonical_axis(cp.axis)
        self.num_spatial = bottom[0].num_axes - self.axis - 1
        if self.num_spatial < 1:
            raise self.error(f"needs at least one spatial axis after axis {self.axis}")
        self.kernel, self.stride, self.pad, self.dilation = conv_geometry(
            self, cp, self.num_spatial
        )
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
