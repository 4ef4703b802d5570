"""MVN (Caffe's mvn_layer): mean-variance normalization per channel or per item.

Caffe adds eps to the standard deviation, and its backward ignores eps (treats it as 0).
"""

import numpy as np

from engine.layer import Layer, register


@register("MVN")
class MVN(Layer):
    """y = (x - mean) / (std + eps) over each (n, c) plane, or over each item's C*H*W with
    across_channels; normalize_variance false gives y = x - mean. std is the biased one.

    N x C x ... in, same shape out. Backward (as Caffe, exact only for eps -> 0):
    dx = (dy - mean(dy) - y * mean(y * dy)) / (std + eps); mean only: dx = dy - mean(dy).
    """

    exact_num_bottom = 1
    exact_num_top = 1
    allow_in_place = True

    def layer_setup(self, bottom, top):
        p = self.param.mvn_param
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = np.float32(p.eps)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
        b = bottom[0]
        self.num = b.num if self.across_channels else b.num * b.channels
        self.dim = b.count // self.num if self.num else 0

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.num, self.dim)
        inv_dim = np.float32(1.0 / self.dim)
        centred = x - x.sum(axis=1, keepdims=True) * inv_dim
        if self.normalize_variance:
            var = (centred * centred).sum(axis=1, keepdims=True) * inv_dim
            self.std = var**0.5 + self.eps
            centred /= self.std
        top[0].data[...] = centred.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self.num, self.dim)
        inv_dim = np.float32(1.0 / self.dim)
        if self.normalize_variance:
            y = top[0].data.reshape(self.num, self.dim)
            dx = y * (y * dy).sum(axis=1, keepdims=True)
            dx += dy.sum(axis=1, keepdims=True)
            dx = dy - dx * inv_dim
            dx /= self.std
        else:
            dx = dy - dy.sum(axis=1, keepdims=True) * inv_dim
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)
