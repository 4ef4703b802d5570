"""Scale and Bias (Caffe's scale_layer and bias_layer): multiply or add a blob broadcast
over bottom[0] from some axis, either a learned parameter or a second bottom."""

from engine.backend import get_array_module
from engine.layer import Layer, register
from engine.proto import caffe_pb2


def _param_shape(layer, bottom0, axis_param, num_axes):
    """Shape of a learned scale/bias: bottom0.shape[axis : axis + num_axes] (-1: to the end)."""
    axis = bottom0.canonical_axis(axis_param)
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end: {num_axes}")
    if num_axes >= 0 and bottom0.num_axes < axis + num_axes:
        raise layer.error(
            f"the parameter's shape extends past bottom[0]'s shape {bottom0.shape} when applied "
            f"from axis {axis} with num_axes {num_axes}"
        )
    end = bottom0.num_axes if num_axes == -1 else axis + num_axes
    return bottom0.shape[axis:end]


def _broadcast_dims(layer, bottom0, operand, axis_param):
    """(outer, dim, inner) such that bottom0 = outer x operand.shape x inner."""
    # A scalar operand is applied from axis 0 whatever the axis says (as Caffe does).
    axis = 0 if operand.num_axes == 0 else bottom0.canonical_axis(axis_param)
    if bottom0.num_axes < axis + operand.num_axes:
        raise layer.error(
            f"operand shape {operand.shape} extends past bottom[0]'s shape {bottom0.shape} "
            f"from axis {axis}"
        )
    for i, d in enumerate(operand.shape):
        if bottom0.shape[axis + i] != d:
            raise layer.error(
                f"dimension mismatch between bottom[0] shape {bottom0.shape} (axis {axis + i}) "
                f"and operand shape {operand.shape} (axis {i})"
            )
    return (
        bottom0.count_range(0, axis),
        operand.count,
        bottom0.count_range(axis + operand.num_axes),
    )


def _reduce_to(dims, arr):
    """Sum an (outer x dim x inner) array to a (dim,) vector."""
    return arr.reshape(dims).sum(axis=(0, 2))


@register("Bias")
class Bias(Layer):
    """y = x + b, b broadcast over bottom[0] from bias_param.axis (default 1).

    b: bottom[1] (shape = a run of bottom[0]'s axes) or a learned blob of shape
    bottom[0].shape[axis : axis + num_axes] (num_axes default 1; filler default 0).
    Backward: dx = dy; db = dy summed over the broadcast axes. May run in place.
    """

    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1
    allow_in_place = True

    def layer_setup(self, bottom, top):
        bp = self.param.bias_param
        if len(bottom) == 1:
            shape = _param_shape(self, bottom[0], bp.axis, bp.num_axes)
            self.add_blob(shape, bp.filler)

    def reshape(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = _broadcast_dims(self, bottom[0], bias, self.param.bias_param.axis)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        dim = self.dims[1]
        x = bottom[0].data.reshape(self.dims)
        y = top[0].data.reshape(self.dims)
        get_array_module(x).add(x, bias.data.reshape(1, dim, 1), out=y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff
        if len(bottom) > 1:
            if propagate_down[1]:
                bottom[1].diff[...] = _reduce_to(self.dims, top[0].diff).reshape(bottom[1].shape)
        elif self.param_propagate(0):
            self.blobs[0].diff[...] += _reduce_to(self.dims, top[0].diff).reshape(
                self.blobs[0].shape
            )


@register("Scale")
class Scale(Layer):
    """y = x * s (+ b), s broadcast over bottom[0] from scale_param.axis (default 1).

    s: bottom[1] or a learned blob of shape bottom[0].shape[axis : axis + num_axes]
    (num_axes default 1; filler default 1). bias_term adds a learned b (bias_filler,
    default 0) shaped like s, applied like Bias. Blobs: [s] (one bottom), then [b].
    Backward: dx = dy * s; ds = sum(dy * x) over the broadcast axes. May run in place.
    """

    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1
    allow_in_place = True

    def layer_setup(self, bottom, top):
        sp = self.param.scale_param
        if len(bottom) == 1:
            shape = _param_shape(self, bottom[0], sp.axis, sp.num_axes)
            if sp.HasField("filler"):
                filler = sp.filler
            else:
                filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
            self.add_blob(shape, filler)
        self.bias_index = None
        if sp.bias_term:
            num_axes = bottom[1].num_axes if len(bottom) > 1 else sp.num_axes
            shape = _param_shape(self, bottom[0], sp.axis, num_axes)
            self.add_blob(shape, sp.bias_filler)
            self.bias_index = len(self.blobs) - 1
        self._x_saved = None

    def reshape(self, bottom, top):
        scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = _broadcast_dims(self, bottom[0], scale, self.param.scale_param.axis)
        if self.bias_index is not None:
            self.bias_dims = _broadcast_dims(
                self, bottom[0], self.blobs[self.bias_index], self.param.scale_param.axis
            )
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        xp = get_array_module(bottom[0].data)
        dim = self.dims[1]
        x = bottom[0].data.reshape(self.dims)
        # Backward needs x; in place, top's data overwrites it, so keep a copy.
        self._x_saved = x.copy() if top[0] is bottom[0] else None
        y = top[0].data.reshape(self.dims)
        xp.multiply(x, scale.data.reshape(1, dim, 1), out=y)
        if self.bias_index is not None:
            b = self.blobs[self.bias_index]
            yb = top[0].data.reshape(self.bias_dims)
            yb += b.data.reshape(1, self.bias_dims[1], 1)

    def backward(self, top, propagate_down, bottom):
        dim = self.dims[1]
        dy = top[0].diff.reshape(self.dims)
        if self.bias_index is not None and self.param_propagate(self.bias_index):
            b = self.blobs[self.bias_index]
            b.diff[...] += _reduce_to(self.bias_dims, top[0].diff).reshape(b.shape)
        learned = len(bottom) == 1
        scale = self.blobs[0] if learned else bottom[1]
        if (learned and self.param_propagate(0)) or (not learned and propagate_down[1]):
            x = self._x_saved if self._x_saved is not None else bottom[0].data.reshape(self.dims)
            ds = (dy * x).sum(axis=(0, 2)).reshape(scale.shape)
            if learned:
                scale.diff[...] += ds
            else:
                scale.diff[...] = ds
        if propagate_down[0]:
            prod = dy * scale.data.reshape(1, dim, 1)
            bottom[0].diff[...] = prod.reshape(bottom[0].shape)
