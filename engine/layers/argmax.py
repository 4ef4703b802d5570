"""ArgMax (Caffe's argmax_layer): indices (and optionally values) of the top_k largest
entries per item, or along one axis. Forward only."""

from engine.backend import get_array_module
from engine.layer import Layer, register


def _top_k(xp, x, k):
    """Indices of the k largest along the last axis, largest first; ties go to the larger
    index (Caffe sorts (value, index) pairs descending)."""
    dim = x.shape[-1]
    rev = x[..., ::-1]
    if k == 1:
        order = xp.argmax(rev, axis=-1)[..., None]
    else:
        order = xp.argsort(-rev, axis=-1, kind="stable")[..., :k]
    return dim - 1 - order


@register("ArgMax")
class ArgMax(Layer):
    """Without axis: over the flattened C*H*W of each item; top N x 1 x top_k (padded with
    trailing 1s to the bottom's axes, at least 3), or N x 2 x top_k with out_max_val (row 0
    indices, row 1 values). With axis: top = bottom shape with shape[axis] = top_k, holding
    indices, or the values only when out_max_val. Indices are floats. No backward.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    no_grad_bottoms = (0,)

    def layer_setup(self, bottom, top):
        p = self.param.argmax_param
        self.out_max_val = p.out_max_val
        self.top_k = p.top_k
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            raise self.error("top_k must not be less than 1")

    def reshape(self, bottom, top):
        b = bottom[0]
        if self.has_axis:
            try:
                self.axis = b.canonical_axis(self.param.argmax_param.axis)
            except IndexError as e:
                raise self.error(str(e)) from None
            if self.top_k > b.shape[self.axis]:
                raise self.error(
                    f"top_k {self.top_k} exceeds the size {b.shape[self.axis]} of axis {self.axis}"
                )
            shape = list(b.shape)
            shape[self.axis] = self.top_k
        else:
            if self.top_k > b.count_range(1):
                raise self.error(
                    f"top_k {self.top_k} exceeds the flattened item size {b.count_range(1)}"
                )
            shape = [1] * max(len(b.shape), 3)
            shape[0] = b.shape[0]
            shape[2] = self.top_k
            if self.out_max_val:
                shape[1] = 2
        top[0].reshape(shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        if self.has_axis:
            xa = xp.moveaxis(x, self.axis, -1)
            idx = _top_k(xp, xa, self.top_k)
            out = xp.take_along_axis(xa, idx, axis=-1) if self.out_max_val else idx
            top[0].data[...] = xp.moveaxis(out, -1, self.axis)
            return
        n = x.shape[0]
        flat = x.reshape(n, -1)
        idx = _top_k(xp, flat, self.top_k)
        out = top[0].data.reshape(n, -1, self.top_k)
        out[:, 0, :] = idx
        if self.out_max_val:
            out[:, 1, :] = xp.take_along_axis(flat, idx, axis=-1)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("ArgMax has no backward")
