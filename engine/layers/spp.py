"""Spatial pyramid pooling (SPP): pooling at 1, 2, 4, ... bins per side, flattened and
concatenated, built from Pooling layers exactly as Caffe's SPPLayer does."""

import math

from engine.blob import Blob
from engine.layer import Layer, register
from engine.proto import caffe_pb2

from .pooling import Pooling


def spp_pooling_param(level, height, width, method):
    """Caffe's pooling geometry of one pyramid level: 2^level bins per side, kernel =
    ceil(size / bins), stride = kernel, pad = (kernel * bins - size + 1) // 2."""
    bins = 2**level
    pp = caffe_pb2.PoolingParameter()
    kh = math.ceil(height / bins)
    kw = math.ceil(width / bins)
    pp.kernel_h, pp.kernel_w = kh, kw
    pp.stride_h, pp.stride_w = kh, kw
    pp.pad_h = (kh * bins - height + 1) // 2
    pp.pad_w = (kw * bins - width + 1) // 2
    pp.pool = method
    return pp


@register("SPP")
class SPP(Layer):
    """Spatial pyramid pooling: level l pools into 2^l x 2^l bins (MAX, AVE or STOCHASTIC).

    bottom (N, C, H, W) -> top (N, C * sum_l bins_l) (levels in order, each flattened C-major);
    with pyramid_height 1 the top is the single pooling output (N, C, 1, 1).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        sp = self.param.spp_param
        self.height_levels = int(sp.pyramid_height)
        if self.height_levels < 1:
            raise self.error("pyramid_height must be at least 1")
        self.method = sp.pool
        self._shape = None

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4:
            raise self.error(f"input must have 4 axes (N, C, H, W), got shape {b.shape}")
        n, c, h, w = b.shape
        if h <= 0 or w <= 0:
            raise self.error(f"input dimensions cannot be zero: {b.shape}")
        if b.shape != self._shape:
            self._shape = b.shape
            self.pools = []
            self.outputs = []
            for level in range(self.height_levels):
                lp = caffe_pb2.LayerParameter(name=f"{self.name}/pool{level}", type="Pooling")
                lp.pooling_param.CopyFrom(spp_pooling_param(level, h, w, self.method))
                pool = Pooling(lp, self.phase)
                out = Blob()
                pool.setup([b], [out])
                self.pools.append(pool)
                self.outputs.append(out)
            self._scratch_bottom = Blob()
        for pool, out in zip(self.pools, self.outputs):
            pool.reshape([b], [out])
        if self.height_levels == 1:
            top[0].reshape(self.outputs[0].shape)
        else:
            top[0].reshape(n, sum(o.count // n for o in self.outputs))

    def forward(self, bottom, top):
        n = bottom[0].shape[0]
        y = top[0].data.reshape(n, -1)
        start = 0
        for pool, out in zip(self.pools, self.outputs):
            pool.forward(bottom, [out])
            size = out.count // n
            y[:, start : start + size] = out.data.reshape(n, size)
            start += size

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        b = bottom[0]
        n = b.shape[0]
        dy = top[0].diff.reshape(n, -1)
        # Each level writes its own gradient into a scratch bottom; the levels are summed
        # (Caffe's split layer), in level order.
        scratch_b = self._scratch_bottom
        scratch_b.reshape(b.shape)
        scratch_b.set_data(b.data)
        start = 0
        for level, (pool, out) in enumerate(zip(self.pools, self.outputs)):
            size = out.count // n
            out.diff[...] = dy[:, start : start + size].reshape(out.shape)
            start += size
            target = b if level == 0 else scratch_b
            pool.backward([out], [True], [target])
            if level > 0:
                b.diff[...] += scratch_b.diff
