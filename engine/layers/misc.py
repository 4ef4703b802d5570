"""Small plumbing layers: Silence (consume blobs), Parameter (a learned blob as output),
Filter (keep the items a selector marks) and BatchReindex (gather items by index)."""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, register


@register("Silence")
class Silence(Layer):
    """Consumes any number of bottoms and produces nothing (no tops).

    Backward writes zeros into the diff of every bottom asked for.
    """

    min_num_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


@register("Parameter")
class Parameter(Layer):
    """y = W: one learned blob of parameter_param.shape, output as the top (no bottoms).

    The blob starts at zero (Caffe gives it no filler; weights come from a model file).
    Backward: dW += dy.
    """

    exact_num_bottom = 0
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.add_blob(tuple(self.param.parameter_param.shape.dim))

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom, top):
        # A copy rather than Caffe's shared data: an in-place layer above must not change W.
        top[0].data[...] = self.blobs[0].data

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate(0):
            self.blobs[0].diff[...] += top[0].diff


@register("Filter")
class Filter(Layer):
    """Keeps the items n (axis 0) whose selector value is non-zero: top[k] = bottom[k][sel].

    bottoms: K blobs with the same num N, then the selector (N, or N x 1 x ...); tops: K
    blobs, (count of selected) x the bottom's other axes. Backward: selected rows get the
    top diff, the others zero; the selector never gets a gradient.
    """

    min_num_bottom = 2
    min_num_top = 1

    def __init__(self, param, phase):
        super().__init__(param, phase)
        self.no_grad_bottoms = (len(param.bottom) - 1,)
        self._first_reshape = True

    def layer_setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            raise self.error(
                f"needs one top per filtered bottom: {len(bottom) - 1} bottoms, {len(top)} tops"
            )

    def reshape(self, bottom, top):
        sel = bottom[-1]
        if any(d != 1 for d in sel.shape[1:]):
            raise self.error(
                f"selector dimensions must be singletons (1) except the first: {sel.shape}"
            )
        for i, b in enumerate(bottom[:-1]):
            if b.shape[:1] != sel.shape[:1]:
                raise self.error(
                    f"bottom {i} has num {b.shape[:1]} but the selector has {sel.shape[:1]}"
                )
        xp = get_array_module(sel.data)
        self.indices = xp.nonzero(sel.data.reshape(-1))[0]
        # Caffe sizes the tops to the full batch at set-up, before any selector data exists.
        n = sel.shape[0] if self._first_reshape else int(self.indices.size)
        self._first_reshape = False
        for t, b in zip(top, bottom):
            t.reshape((n,) + b.shape[1:])

    def forward(self, bottom, top):
        for t, b in zip(top, bottom):
            t.data[...] = b.data[self.indices]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[-1]:
            raise self.error("cannot back-propagate to the selector (last bottom)")
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                b.diff[...] = 0
                b.diff[self.indices] = t.diff


@register("BatchReindex")
class BatchReindex(Layer):
    """y[i] = x[idx[i]]: gathers items of bottom[0] (axis 0) by the 1-d index bottom[1].

    Top: len(idx) x bottom[0]'s other axes. Backward: dx[n] = sum of dy[i] over i with
    idx[i] = n (zero for items never picked); the index bottom never gets a gradient.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    no_grad_bottoms = (1,)

    def reshape(self, bottom, top):
        if len(bottom[1].shape) != 1:
            raise self.error(f"index bottom must be 1-d, got shape {bottom[1].shape}")
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])

    def forward(self, bottom, top):
        raw = bottom[1].data
        idx = raw.astype(np.int64)
        n = bottom[0].shape[0]
        bad = (idx < 0) | (idx >= n)
        if bool(bad.any()):
            raise self.error(f"index {float(raw[bad][0])} is outside the batch size {n}")
        self.idx = idx
        top[0].data[...] = bottom[0].data[idx]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to the index input (bottom 1)")
        if propagate_down[0]:
            xp = get_array_module(top[0].diff)
            dx = xp.zeros_like(bottom[0].diff)
            xp.add.at(dx, self.idx, top[0].diff)
            bottom[0].diff[...] = dx
