"""Layers that only move data: Flatten, Reshape, Concat, Slice, Split (Caffe's
flatten/reshape/concat/slice/split layers)."""

from engine.backend import get_array_module
from engine.layer import Layer, register


def _share_view(bottom, top, shape):
    """Make top's data a view of bottom's data with `shape` (Caffe's ShareData).

    Diffs stay separate (Caffe also shares them): backward copies the top diff back, so a
    caller may zero or fill one blob's diff without touching the other's.
    """
    top.reshape(shape)
    top.set_data(bottom.data.reshape(shape))


def _copy_diff_back(top, bottom):
    """bottom.diff = top.diff reshaped."""
    bottom.diff[...] = top.diff.reshape(bottom.shape)


@register("Flatten")
class Flatten(Layer):
    """Merge axes [axis, end_axis] into one: (d0, .., d_a, .., d_e, ..) -> (d0, .., prod, ..).

    flatten_param axis (default 1) and end_axis (default -1). top shares bottom's data (a
    view); backward copies the diff back. Not in place.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Flatten does not allow in-place computation")

    def reshape(self, bottom, top):
        fp = self.param.flatten_param
        shape = bottom[0].shape
        a = bottom[0].canonical_axis(fp.axis)
        e = bottom[0].canonical_axis(fp.end_axis)
        new = shape[:a] + (bottom[0].count_range(a, e + 1),) + shape[e + 1 :]
        _share_view(bottom[0], top[0], new)

    def forward(self, bottom, top):
        # bottom's array may have been replaced since reshape (views upstream): re-share.
        _share_view(bottom[0], top[0], top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            _copy_diff_back(top[0], bottom[0])


@register("Reshape")
class Reshape(Layer):
    """Replace bottom axes [axis, axis + num_axes) by reshape_param.shape.

    In shape, 0 copies the bottom dimension at that position and one -1 is inferred from the
    count. num_axes -1 means to the last axis; a negative axis counts from the end (-1:
    after the last axis). top shares bottom's data (a view); backward copies the diff back.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Reshape does not allow in-place computation")
        dims = [int(d) for d in self.param.reshape_param.shape.dim]
        self.dims = dims
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"new shape contains multiple -1 dims: {dims}")
        if any(d < -1 for d in dims):
            raise self.error(f"new shape has an invalid dimension: {dims}")
        self.inferred_axis = inferred[0] if inferred else None
        self.constant_count = 1
        for d in dims:
            if d > 0:
                self.constant_count *= d

    def reshape(self, bottom, top):
        rp = self.param.reshape_param
        b = bottom[0]
        nb = b.num_axes
        start = rp.axis if rp.axis >= 0 else nb + rp.axis + 1
        if not 0 <= start <= nb:
            raise self.error(f"axis {rp.axis} out of range for bottom shape {b.shape}")
        if rp.num_axes < -1:
            raise self.error(f"num_axes must be >= 0, or -1 for all, got {rp.num_axes}")
        end = nb if rp.num_axes == -1 else start + rp.num_axes
        if end > nb:
            raise self.error(
                f"axis {start} + num_axes {rp.num_axes} exceeds bottom shape {b.shape}"
            )
        new = list(b.shape[:start]) + list(self.dims) + list(b.shape[end:])
        explicit = self.constant_count * b.count_range(0, start) * b.count_range(end)
        for i in self.copy_axes:
            if start + i >= nb:
                raise self.error(
                    f"new shape dim {i} is 0 (copy) but bottom {b.shape} has no axis {start + i}"
                )
            new[start + i] = b.shape[start + i]
            explicit *= b.shape[start + i]
        if self.inferred_axis is not None:
            if explicit == 0 or b.count % explicit:
                raise self.error(
                    f"cannot infer the -1 dim: bottom count {b.count} is not divisible by "
                    f"{explicit} (bottom {b.shape}, shape {self.dims})"
                )
            new[start + self.inferred_axis] = b.count // explicit
        count = 1
        for d in new:
            count *= d
        if count != b.count:
            raise self.error(
                f"output count {count} ({tuple(new)}) != input count {b.count} ({b.shape})"
            )
        _share_view(b, top[0], tuple(new))

    def forward(self, bottom, top):
        _share_view(bottom[0], top[0], top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            _copy_diff_back(top[0], bottom[0])


def _legacy_axis(layer, blob, has_legacy, legacy, axis, legacy_name):
    if has_legacy:
        if not 0 <= legacy < blob.num_axes:
            raise layer.error(f"{legacy_name} {legacy} out of range for shape {blob.shape}")
        return legacy
    return blob.canonical_axis(axis)


@register("Concat")
class Concat(Layer):
    """Join bottoms along concat_param.axis (default 1; legacy concat_dim).

    bottoms: same shape except on the axis; top: the sum of their sizes on it. Backward
    slices the top diff back. One bottom: top shares its data.
    """

    min_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        cp = self.param.concat_param
        if cp.HasField("axis") and cp.HasField("concat_dim"):
            raise self.error("either axis or concat_dim should be specified; not both")

    def reshape(self, bottom, top):
        cp = self.param.concat_param
        b0 = bottom[0]
        axis = _legacy_axis(
            self, b0, cp.HasField("concat_dim"), cp.concat_dim, cp.axis, "concat_dim"
        )
        self.axis = axis
        shape = list(b0.shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != b0.num_axes:
                raise self.error(
                    f"all inputs must have the same number of axes: bottom[0] {b0.shape}, "
                    f"bottom[{i}] {b.shape}"
                )
            for j in range(b0.num_axes):
                if j != axis and b.shape[j] != b0.shape[j]:
                    raise self.error(
                        f"all inputs must have the same shape except at axis {axis}: "
                        f"bottom[0] {b0.shape}, bottom[{i}] {b.shape}"
                    )
            shape[axis] += b.shape[axis]
        if len(bottom) == 1:
            _share_view(b0, top[0], b0.shape)
        else:
            top[0].reshape(tuple(shape))

    def forward(self, bottom, top):
        if len(bottom) == 1:
            _share_view(bottom[0], top[0], bottom[0].shape)
            return
        xp_concat = get_array_module(bottom[0].data).concatenate
        xp_concat([b.data for b in bottom], axis=self.axis, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            if propagate_down[0]:
                _copy_diff_back(top[0], bottom[0])
            return
        lead = (slice(None),) * self.axis
        offset = 0
        for b, down in zip(bottom, propagate_down):
            n = b.shape[self.axis]
            if down:
                b.diff[...] = top[0].diff[lead + (slice(offset, offset + n),)]
            offset += n


@register("Slice")
class Slice(Layer):
    """Cut the bottom along slice_param.axis (default 1; legacy slice_dim) into the tops.

    slice_point: the cut positions (one fewer than tops); none: equal parts. Backward writes
    each top diff into its range of the bottom diff. One top: it shares the bottom's data.
    """

    exact_num_bottom = 1
    min_num_top = 1

    def layer_setup(self, bottom, top):
        sp = self.param.slice_param
        if sp.HasField("axis") and sp.HasField("slice_dim"):
            raise self.error("either axis or slice_dim should be specified; not both")

    def reshape(self, bottom, top):
        sp = self.param.slice_param
        b = bottom[0]
        axis = _legacy_axis(self, b, sp.HasField("slice_dim"), sp.slice_dim, sp.axis, "slice_dim")
        self.axis = axis
        size = b.shape[axis]
        points = [int(p) for p in sp.slice_point]
        if points:
            if len(points) != len(top) - 1:
                raise self.error(
                    f"{len(points)} slice_point(s) for {len(top)} tops (need {len(top) - 1})"
                )
            if len(top) > size:
                raise self.error(f"{len(top)} tops but the slice axis has size {size}")
            sizes, prev = [], 0
            for p in points:
                if p <= prev:
                    raise self.error(f"slice_point must increase and be > 0: {points}")
                sizes.append(p - prev)
                prev = p
            if size < prev:
                raise self.error(f"slice_point {prev} beyond the slice axis size {size}")
            sizes.append(size - prev)
        else:
            if size % len(top):
                raise self.error(
                    f"number of top blobs ({len(top)}) should evenly divide input slice axis "
                    f"({size})"
                )
            sizes = [size // len(top)] * len(top)
        self.sizes = sizes
        if len(top) == 1:
            _share_view(b, top[0], b.shape)
            return
        for t, n in zip(top, sizes):
            shape = list(b.shape)
            shape[axis] = n
            t.reshape(tuple(shape))

    def forward(self, bottom, top):
        if len(top) == 1:
            _share_view(bottom[0], top[0], bottom[0].shape)
            return
        lead = (slice(None),) * self.axis
        offset = 0
        for t, n in zip(top, self.sizes):
            t.data[...] = bottom[0].data[lead + (slice(offset, offset + n),)]
            offset += n

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            _copy_diff_back(top[0], bottom[0])
            return
        lead = (slice(None),) * self.axis
        offset = 0
        for t, n in zip(top, self.sizes):
            bottom[0].diff[lead + (slice(offset, offset + n),)] = t.diff
            offset += n


@register("Split")
class Split(Layer):
    """Give one bottom to several consumers: every top shares the bottom's data.

    bottom: any shape; tops: the same shape. Backward: dx = sum of the top diffs.
    The net inserts Split layers wherever a blob feeds several layers. Not in place.
    """

    exact_num_bottom = 1
    min_num_top = 1

    def reshape(self, bottom, top):
        for i, t in enumerate(top):
            if t is bottom[0]:
                raise self.error(f"Split does not allow in-place computation (top[{i}])")
            _share_view(bottom[0], t, bottom[0].shape)

    def forward(self, bottom, top):
        for t in top:
            _share_view(bottom[0], t, bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        d = bottom[0].diff
        if len(top) == 1:
            _copy_diff_back(top[0], bottom[0])
            return
        get_array_module(d).add(top[0].diff, top[1].diff, out=d)
        for t in top[2:]:
            d += t.diff
