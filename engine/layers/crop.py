"""Crop (Caffe's crop_layer): cut bottom[0] to the shape of bottom[1] from a given axis on.

bottom[1] only supplies the shape and gets no gradient.
"""

from engine.layer import Layer, register


@register("Crop")
class Crop(Layer):
    """y = x[..., o_a : o_a + s_a, ...] for every axis a >= crop_param.axis (default 2), s_a =
    bottom[1].shape[a]; offsets: none (all 0), one for every cropped axis, or one per axis.

    bottom[0] x, bottom[1] reference (same number of axes); top: x's leading axes + the
    reference's trailing ones. Backward: dx is dy placed in the window, zero elsewhere.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    no_grad_bottoms = (1,)

    def reshape(self, bottom, top):
        p = self.param.crop_param
        x, ref = bottom[0].shape, bottom[1].shape
        if len(x) != len(ref):
            raise self.error(f"bottoms must have the same number of axes: {x} vs {ref}")
        try:
            start = bottom[0].canonical_axis(p.axis)
        except IndexError as e:
            raise self.error(str(e)) from None
        n_crop = len(x) - start
        if len(p.offset) not in (0, 1, n_crop):
            raise self.error(
                f"crop_param.offset must have 0, 1 or {n_crop} values (axes {start}..), "
                f"got {len(p.offset)}"
            )
        slices, shape = [], []
        for a in range(len(x)):
            if a < start:
                slices.append(slice(None))
                shape.append(x[a])
                continue
            off = 0 if not p.offset else p.offset[0 if len(p.offset) == 1 else a - start]
            if x[a] - off < ref[a]:
                raise self.error(
                    f"axis {a}: offset {off} + crop size {ref[a]} exceeds bottom size {x[a]}"
                )
            slices.append(slice(off, off + ref[a]))
            shape.append(ref[a])
        self.window = tuple(slices)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.window]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[self.window] = top[0].diff
