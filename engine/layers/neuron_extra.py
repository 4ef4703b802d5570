"""The remaining element-wise layers of Caffe's catalog: PReLU, ELU, AbsVal, Power, Exp, Log,
BNLL, Threshold, Clip and Swish, with Caffe's formulas, special cases and in-place rules."""

import math

import numpy as np

from engine.backend import get_array_module
from engine.layer import NeuronLayer, register
from engine.proto import caffe_pb2


class _InputKeeper(NeuronLayer):
    """A neuron layer whose backward reads x: in place, forward keeps a copy of it."""

    def _keep_input(self, bottom, top):
        self._x_copy = bottom[0].data.copy() if bottom[0] is top[0] else None

    def _input(self, bottom):
        return bottom[0].data if self._x_copy is None else self._x_copy


def _sigmoid(xp, x):
    """Caffe's sigmoid layer: 0.5 * tanh(0.5 x) + 0.5 (never overflows)."""
    return xp.tanh(x * np.float32(0.5)) * np.float32(0.5) + np.float32(0.5)


@register("PReLU")
class PReLU(_InputKeeper):
    """y = max(x, 0) + a_c * min(x, 0), one learned slope a_c per channel (axis 1), or one
    0-d slope for all with channel_shared; filler default constant 0.25.

    N x C x ... in, same shape out; in place allowed (x is kept for backward).
    Backward: dx = dy * (x > 0 ? 1 : a_c), da_c += sum dy * x * (x <= 0).
    """

    def layer_setup(self, bottom, top):
        p = self.param.prelu_param
        if len(bottom[0].shape) < 2:
            raise self.error(f"bottom must have at least 2 axes, got shape {bottom[0].shape}")
        self.channel_shared = p.channel_shared
        channels = bottom[0].shape[1]
        if p.HasField("filler"):
            filler = p.filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.add_blob(() if self.channel_shared else (channels,), filler)

    def reshape(self, bottom, top):
        if len(bottom[0].shape) < 2:
            raise self.error(f"bottom must have at least 2 axes, got shape {bottom[0].shape}")
        if not self.channel_shared and bottom[0].shape[1] != self.blobs[0].count:
            raise self.error(
                f"bottom has {bottom[0].shape[1]} channels but the layer has "
                f"{self.blobs[0].count} slopes"
            )
        super().reshape(bottom, top)

    def _slope(self, ndim):
        a = self.blobs[0].data
        if self.channel_shared:
            return a
        return a.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        self._keep_input(bottom, top)
        x = bottom[0].data
        a = self._slope(x.ndim)
        top[0].data[...] = xp.maximum(x, 0) + a * xp.minimum(x, 0)

    def backward(self, top, propagate_down, bottom):
        x = self._input(bottom)
        dy = top[0].diff
        if self.param_propagate(0):
            g = dy * x * (x <= 0)
            if self.channel_shared:
                self.blobs[0].diff[...] += g.sum()
            else:
                axes = (0,) + tuple(range(2, x.ndim))
                self.blobs[0].diff[...] += g.sum(axis=axes)
        if propagate_down[0]:
            a = self._slope(x.ndim)
            bottom[0].diff[...] = dy * ((x > 0) + a * (x <= 0))


@register("ELU")
class ELU(_InputKeeper):
    """y = x for x > 0, alpha * (exp(x) - 1) otherwise (elu_param.alpha, default 1).

    Any shape in, same shape out. Backward: dx = dy * (x > 0 ? 1 : y + alpha).
    """

    def layer_setup(self, bottom, top):
        self.alpha = np.float32(self.param.elu_param.alpha)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        self._keep_input(bottom, top)
        x = bottom[0].data
        top[0].data[...] = xp.where(x > 0, x, self.alpha * (xp.exp(xp.minimum(x, 0)) - 1))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            x = self._input(bottom)
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * ((x > 0) + (y + self.alpha) * (x <= 0))


@register("AbsVal")
class AbsVal(NeuronLayer):
    """y = |x|; backward dx = sign(x) * dy (sign(0) = 0). Any shape in, same shape out.

    Not in place: Caffe refuses it, since backward needs x.
    """

    allow_in_place = False

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        xp.abs(bottom[0].data, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = get_array_module(bottom[0].data)
            bottom[0].diff[...] = xp.sign(bottom[0].data) * top[0].diff


@register("Power")
class Power(_InputKeeper):
    """y = (shift + scale * x)^power (power_param; defaults 1, 1, 0).

    Any shape in, same shape out. Backward as Caffe: dx = dy * power * scale * y / (shift +
    scale * x), special-cased for power 1 or power * scale = 0 (constant derivative) and
    power 2 (linear derivative).
    """

    def layer_setup(self, bottom, top):
        p = self.param.power_param
        self.power = np.float32(p.power)
        self.scale = np.float32(p.scale)
        self.shift = np.float32(p.shift)
        self.diff_scale = np.float32(self.power * self.scale)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        if self.diff_scale == 0:
            value = 1.0 if self.power == 0 else np.float32(self.shift**self.power)
            self._x_copy = None
            top[0].data[...] = value
            return
        self._keep_input(bottom, top)
        y = bottom[0].data
        if self.scale != 1:
            y = y * self.scale
        if self.shift != 0:
            y = y + self.shift
        if self.power != 1:
            y = xp.power(y, self.power)
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.diff_scale == 0 or self.power == 1:
            bottom[0].diff[...] = self.diff_scale * top[0].diff if self.diff_scale else 0
            return
        x = self._input(bottom)
        if self.power == 2:
            # d/dx (shift + scale x)^2 = diff_scale * shift + diff_scale * scale * x
            d = (self.diff_scale * self.scale) * x
            if self.shift != 0:
                d = d + self.diff_scale * self.shift
        elif self.shift == 0:
            d = top[0].data / x * self.power  # = power * y / x
        else:
            base = x * self.scale if self.scale != 1 else x
            d = top[0].data / (base + self.shift)
            if self.diff_scale != 1:
                d = d * self.diff_scale
        bottom[0].diff[...] = top[0].diff * d


def _log_base(layer, base):
    """log(base) for Exp/Log: base -1 means e (exactly 1)."""
    if base == -1:
        return np.float32(1)
    if not base > 0:
        raise layer.error(f"base must be strictly positive, got {base}")
    return np.float32(math.log(base))


@register("Exp")
class Exp(NeuronLayer):
    """y = base^(shift + scale * x) (exp_param; base -1 = e, scale 1, shift 0), computed as
    outer * exp(inner * x), inner = ln(base) * scale, outer = base^shift.

    Any shape in, same shape out; in place allowed. Backward: dx = dy * y * inner.
    """

    def layer_setup(self, bottom, top):
        p = self.param.exp_param
        log_base = _log_base(self, p.base)
        self.inner = np.float32(log_base * np.float32(p.scale))
        if p.shift == 0:
            self.outer = np.float32(1)
        elif p.base == -1:
            self.outer = np.float32(math.exp(np.float32(p.shift)))
        else:
            self.outer = np.float32(np.float32(p.base) ** np.float32(p.shift))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        y = xp.exp(x if self.inner == 1 else x * self.inner)
        if self.outer != 1:
            y *= self.outer
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            d = top[0].data * top[0].diff
            if self.inner != 1:
                d *= self.inner
            bottom[0].diff[...] = d


@register("Log")
class Log(_InputKeeper):
    """y = log_base(shift + scale * x) (log_param; base -1 = e, scale 1, shift 0).

    Any shape in, same shape out. Backward: dx = dy * scale / ((shift + scale x) ln(base)).
    """

    def layer_setup(self, bottom, top):
        p = self.param.log_param
        log_base = _log_base(self, p.base)
        self.base_scale = np.float32(1) if p.base == -1 else np.float32(1 / log_base)
        self.scale = np.float32(p.scale)
        self.shift = np.float32(p.shift)
        self.backward_scale = np.float32(self.scale * self.base_scale)

    def _inner(self, x):
        if self.scale != 1:
            x = x * self.scale
        if self.shift != 0:
            x = x + self.shift
        return x

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        self._keep_input(bottom, top)
        y = xp.log(self._inner(bottom[0].data))
        if self.base_scale != 1:
            y *= self.base_scale
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            d = np.float32(1) / self._inner(self._input(bottom))
            if self.backward_scale != 1:
                d *= self.backward_scale
            bottom[0].diff[...] = top[0].diff * d


@register("BNLL")
class BNLL(_InputKeeper):
    """y = log(1 + exp(x)), in the stable form max(x, 0) + log(1 + exp(-|x|)).

    Any shape in, same shape out. Backward: dx = dy * e / (1 + e), e = exp(min(x, 50)).
    """

    THRESHOLD = 50.0

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        self._keep_input(bottom, top)
        x = bottom[0].data
        top[0].data[...] = xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = get_array_module(bottom[0].data)
            e = xp.exp(xp.minimum(self._input(bottom), np.float32(self.THRESHOLD)))
            bottom[0].diff[...] = top[0].diff * e / (e + 1)


@register("Threshold")
class Threshold(NeuronLayer):
    """y = 1 if x > threshold else 0 (threshold_param.threshold, default 0).

    Any shape in, same shape out. Forward only: Caffe has no backward for it, so the bottom
    never gets a gradient (asking for one is an error).
    """

    no_grad_bottoms = (0,)

    def layer_setup(self, bottom, top):
        self.threshold = np.float32(self.param.threshold_param.threshold)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data > self.threshold


@register("Clip")
class Clip(_InputKeeper):
    """y = max(min_, min(x, max_)) (clip_param min, max; both required).

    Any shape in, same shape out. Backward: dx = dy where min_ <= x <= max_, else 0.
    """

    def layer_setup(self, bottom, top):
        p = self.param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max")
        self.lo = np.float32(p.min)
        self.hi = np.float32(p.max)
        if self.lo > self.hi:
            raise self.error(f"clip_param min {self.lo} > max {self.hi}")

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        self._keep_input(bottom, top)
        top[0].data[...] = xp.maximum(self.lo, xp.minimum(bottom[0].data, self.hi))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            x = self._input(bottom)
            bottom[0].diff[...] = top[0].diff * ((x >= self.lo) & (x <= self.hi))


@register("Swish")
class Swish(NeuronLayer):
    """y = x * sigmoid(beta * x) (swish_param.beta, default 1).

    Any shape in, same shape out; in place allowed. Backward, with s = sigmoid(beta x):
    dx = dy * (beta * y + s * (1 - beta * y)).
    """

    def layer_setup(self, bottom, top):
        self.beta = np.float32(self.param.swish_param.beta)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        self._s = _sigmoid(xp, x * self.beta)
        top[0].data[...] = x * self._s

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            by = self.beta * top[0].data
            bottom[0].diff[...] = top[0].diff * (by + self._s * (1 - by))
