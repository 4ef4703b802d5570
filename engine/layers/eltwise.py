"""Eltwise (Caffe's eltwise_layer): element-wise SUM (with coefficients), PROD or MAX of
several same-shaped bottoms."""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, register
from engine.proto import caffe_pb2

_OP = caffe_pb2.EltwiseParameter


@register("Eltwise")
class Eltwise(Layer):
    """y = sum_i c_i x_i (SUM, coeff default 1) | prod_i x_i (PROD) | max_i x_i (MAX).

    bottoms: two or more of one shape; top: that shape. MAX keeps the argmax bottom index
    (ties: bottom 1 wins over bottom 0, then the earlier bottom) and routes the gradient
    there. PROD gradient: product of the other bottoms (stable_prod_grad) or y / x_i.
    """

    min_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        ep = self.param.eltwise_param
        self.op = ep.operation
        if len(ep.coeff) not in (0, len(bottom)):
            raise self.error(
                f"Eltwise takes one coefficient per bottom blob: {len(ep.coeff)} coeff(s) for "
                f"{len(bottom)} bottoms"
            )
        if self.op == _OP.PROD and len(ep.coeff):
            raise self.error("Eltwise only takes coefficients for summation (operation SUM)")
        self.coeffs = [float(c) for c in ep.coeff] or [1.0] * len(bottom)
        self.stable_prod_grad = bool(ep.stable_prod_grad)
        self.max_idx = None

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error(f"bottom[0]: {bottom[0].shape}, bottom[{i}]: {b.shape}")
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        y = top[0].data
        if self.op == _OP.PROD:
            xp.multiply(bottom[0].data, bottom[1].data, out=y)
            for b in bottom[2:]:
                y *= b.data
        elif self.op == _OP.SUM:
            terms = [
                b.data if c == 1.0 else b.data * np.float32(c) for b, c in zip(bottom, self.coeffs)
            ]
            xp.add(terms[0], terms[1], out=y)
            for t in terms[2:]:
                y += t
        elif self.op == _OP.MAX:
            a, b = bottom[0].data, bottom[1].data
            first = a > b  # Caffe: strict >, so a tie picks bottom 1
            idx = xp.where(first, 0, 1).astype(np.int32)
            xp.copyto(y, xp.where(first, a, b))
            for k, blob in enumerate(bottom[2:], 2):
                better = blob.data > y
                idx[better] = k
                xp.copyto(y, blob.data, where=better)
            self.max_idx = idx
        else:
            raise self.error(f"unknown eltwise operation {self.op}")

    def backward(self, top, propagate_down, bottom):
        xp = get_array_module(top[0].diff)
        dy = top[0].diff
        for i, (b, down) in enumerate(zip(bottom, propagate_down)):
            if not down:
                continue
            if self.op == _OP.PROD:
                if self.stable_prod_grad:
                    others = [o.data for j, o in enumerate(bottom) if j != i]
                    g = others[0].copy()
                    for o in others[1:]:
                        g *= o
                else:
                    g = top[0].data / b.data
                b.diff[...] = g * dy
            elif self.op == _OP.SUM:
                c = self.coeffs[i]
                b.diff[...] = dy if c == 1.0 else dy * np.float32(c)
            else:
                b.diff[...] = xp.where(self.max_idx == i, dy, 0)
