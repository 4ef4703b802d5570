"""Tile (Caffe's tile_layer): repeat a blob `tiles` times along one axis.

The copies of each block along `axis` and after it sit one after another.
"""

from engine.layer import Layer, register


@register("Tile")
class Tile(Layer):
    """y[outer, t, inner] = x[outer, inner] for t < tiles, with outer = prod(shape[:axis]),
    inner = prod(shape[axis:]) (tile_param: axis default 1, tiles > 0).

    Top shape: bottom shape with shape[axis] * tiles. Backward: dx = sum over t of dy.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.tiles = self.param.tile_param.tiles
        if self.tiles < 1:
            raise self.error(f"tile_param.tiles must be positive, got {self.tiles}")

    def reshape(self, bottom, top):
        try:
            axis = bottom[0].canonical_axis(self.param.tile_param.axis)
        except IndexError as e:
            raise self.error(str(e)) from None
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        self.outer = bottom[0].count_range(0, axis)
        self.inner = bottom[0].count_range(axis)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.outer, 1, self.inner)
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, self.inner)
            bottom[0].diff[...] = dy.sum(axis=1).reshape(bottom[0].shape)
