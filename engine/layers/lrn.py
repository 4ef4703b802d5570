"""Local response normalisation (LRN) across channels or within a channel, as in Caffe.

Window sums are built from `local_size` shifted slice adds (no per-pixel loops).
"""

import numpy as np

from engine import backend
from engine.layer import Layer, register
from engine.proto import caffe_pb2

_LRN = caffe_pb2.LRNParameter


def _window_sum(a, size, axis, xp, out=None):
    """Sum of `a` over a centred window of odd `size` along `axis`, zero padded."""
    half = (size - 1) // 2
    n = a.shape[axis]
    out = xp.zeros_like(a) if out is None else out
    if out is not a:
        out[...] = a
    else:  # pragma: no cover - callers pass distinct arrays
        raise ValueError("out must not alias the input")

    def sl(lo, hi):
        idx = [slice(None)] * a.ndim
        idx[axis] = slice(lo, hi)
        return tuple(idx)

    for d in range(1, half + 1):
        if d >= n:
            break
        out[sl(0, n - d)] += a[sl(d, n)]  # neighbour d ahead
        out[sl(d, n)] += a[sl(0, n - d)]  # neighbour d behind
    return out


def _neg_pow(scale, beta, xp):
    """scale ** -beta (a fast path for Caffe's default beta 0.75)."""
    if beta == 0.75:
        r = 1.0 / xp.sqrt(scale)
        return r * xp.sqrt(r)
    return xp.power(scale, -beta)


@register("LRN")
class LRN(Layer):
    """ACROSS_CHANNELS: y = x / (k + alpha/n * sum_{n channels} x^2)^beta (zero-padded window);
    WITHIN_CHANNEL: y = x / (1 + alpha/n^2 * sum_{n x n pixels} x^2)^beta (k unused).

    bottom (N, C, H, W) -> top (N, C, H, W); n = local_size (odd).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        lp = self.param.lrn_param
        self.size = int(lp.local_size)
        if self.size % 2 != 1:
            raise self.error(f"LRN only supports odd values for local_size, got {self.size}")
        self.alpha = float(lp.alpha)
        self.beta = float(lp.beta)
        self.k = float(lp.k)
        self.region = lp.norm_region
        if self.region not in (_LRN.ACROSS_CHANNELS, _LRN.WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region}")

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (N, C, H, W), got shape {bottom[0].shape}")
        top[0].reshape(bottom[0].shape)

    def _sum(self, a, xp):
        if self.region == _LRN.ACROSS_CHANNELS:
            return _window_sum(a, self.size, 1, xp)
        return _window_sum(_window_sum(a, self.size, 2, xp), self.size, 3, xp)

    def _coeff(self):
        n = self.size if self.region == _LRN.ACROSS_CHANNELS else self.size * self.size
        return np.float32(self.alpha / n)

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = backend.get_array_module(x)
        base = self.k if self.region == _LRN.ACROSS_CHANNELS else 1.0
        scale = self._sum(x * x, xp)
        scale *= self._coeff()
        scale += np.float32(base)
        self.scale = scale
        self.inv = _neg_pow(scale, self.beta, xp)  # scale^-beta
        xp.multiply(x, self.inv, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].data
        y = top[0].data
        dy = top[0].diff
        xp = backend.get_array_module(dy)
        # dx = dy * scale^-beta - 2 alpha beta / n * x * window_sum(dy * y / scale)
        ratio = self._sum(dy * y / self.scale, xp)
        dx = bottom[0].diff
        xp.multiply(dy, self.inv, out=dx)
        dx -= np.float32(2.0 * self.beta) * self._coeff() * x * ratio
