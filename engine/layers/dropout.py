"""Dropout (Caffe's dropout_layer): random zeroing with inverted scaling in TRAIN only.

The mask comes from engine.rng, so a seeded run repeats.
"""

import numpy as np

from engine.backend import get_array_module
from engine.layer import NeuronLayer, register
from engine.proto import caffe_pb2
from engine.rng import rng


@register("Dropout")
class Dropout(NeuronLayer):
    """TRAIN: y = x * m / (1 - p), m ~ Bernoulli(1 - p) per element; TEST: y = x.

    p = dropout_param.dropout_ratio. Backward uses the same mask (kept from forward, so it
    works in place): dx = dy * m / (1 - p). Any shape in, same shape out.
    """

    def layer_setup(self, bottom, top):
        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self.train = self.phase == caffe_pb2.TRAIN
        self._mask = None  # m * scale, float32, kept for backward

    def forward(self, bottom, top):
        x = bottom[0].data
        if not self.train:
            if top[0] is not bottom[0]:
                top[0].data[...] = x
            return
        xp = get_array_module(x)
        # Drawn on the host from the engine's Generator (one random stream for CPU and GPU).
        keep = rng().random(x.shape, dtype=np.float32) >= self.ratio
        mask = keep.astype(np.float32) * np.float32(self.scale)
        self._mask = xp.asarray(mask)
        top[0].data[...] = x * self._mask

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if not self.train:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = top[0].diff
            return
        if self._mask is None or self._mask.shape != top[0].shape:
            raise self.error("backward called before a TRAIN forward")
        bottom[0].diff[...] = top[0].diff * self._mask
