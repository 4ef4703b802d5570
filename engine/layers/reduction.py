"""Reduction (Caffe's reduction_layer): SUM, ASUM, SUMSQ or MEAN over all axes from `axis`
on, times `coeff`."""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, register
from engine.proto import caffe_pb2

_OP = caffe_pb2.ReductionParameter


@register("Reduction")
class Reduction(Layer):
    """y[i] = coeff * op(x[i, :]) with x viewed as num x dim, num = prod(shape[:axis]);
    op: SUM sum, ASUM sum |x|, SUMSQ sum x^2, MEAN sum / dim (axis default 0, coeff 1).

    Top shape: bottom shape[:axis] (0-d for axis 0). Backward: dx = coeff * dy[i] times
    1 (SUM, MEAN with coeff / dim), sign(x) (ASUM), 2x (SUMSQ).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.op = self.param.reduction_param.operation
        if self.op not in (_OP.SUM, _OP.ASUM, _OP.SUMSQ, _OP.MEAN):
            raise self.error(f"unknown reduction operation {self.op}")

    def reshape(self, bottom, top):
        try:
            axis = bottom[0].canonical_axis(self.param.reduction_param.axis)
        except IndexError as e:
            raise self.error(str(e)) from None
        top[0].reshape(bottom[0].shape[:axis])
        self.num = bottom[0].count_range(0, axis)
        self.dim = bottom[0].count_range(axis)
        self.coeff = np.float32(self.param.reduction_param.coeff)
        if self.op == _OP.MEAN and self.dim:
            self.coeff = np.float32(self.coeff / np.float32(self.dim))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == _OP.ASUM:
            y = xp.abs(x).sum(axis=1)
        elif self.op == _OP.SUMSQ:
            y = (x * x).sum(axis=1)
        else:
            y = x.sum(axis=1)
        if self.coeff != 1:
            y *= self.coeff
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = get_array_module(bottom[0].data)
        g = top[0].diff.reshape(self.num, 1) * self.coeff
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == _OP.ASUM:
            dx = xp.sign(x) * g
        elif self.op == _OP.SUMSQ:
            dx = x * (g * 2)
        else:
            dx = xp.broadcast_to(g, x.shape)
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)
