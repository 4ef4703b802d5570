"""Softmax and SoftmaxWithLoss (Caffe's softmax_layer and softmax_loss_layer).

Both work along one axis of an N-d blob; the loss takes integer class labels.
"""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, LossLayer, class_axis, normalizer, register

FLT_MIN = float(np.finfo(np.float32).tiny)


def _softmax(x, axis, out):
    """Numerically stable softmax of `x` along `axis`, written into `out` (may be `x`)."""
    xp = get_array_module(x)
    m = x.max(axis=axis, keepdims=True)
    xp.subtract(x, m, out=out)
    xp.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


@register("Softmax")
class Softmax(Layer):
    """y = exp(x - max) / sum(exp(x - max)) along softmax_param.axis (default 1).

    bottom: any shape; top: same shape. Backward: dx = (dy - sum(dy * y, axis)) * y.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    allow_in_place = True

    def reshape(self, bottom, top):
        self.axis = bottom[0].canonical_axis(self.param.softmax_param.axis)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        _softmax(bottom[0].data, self.axis, top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y = top[0].data
        dy = top[0].diff
        dot = (dy * y).sum(axis=self.axis, keepdims=True)
        bottom[0].diff[...] = (dy - dot) * y


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(LossLayer):
    """loss = -sum_valid log(max(softmax(x)[label], FLT_MIN)) / normalizer.

    bottom[0]: scores, classes on softmax_param.axis (N x C x ...); bottom[1]: labels with
    count = N * (spatial size). Labels equal to loss_param.ignore_label are skipped.
    normalizer: loss_param.normalization (VALID default; legacy normalize: false = BATCH_SIZE).
    top: the 0-d loss. Backward: dx = (softmax(x) - onehot(label)) * loss_weight / normalizer.
    """

    exact_num_bottom = 2
    min_num_top = 1
    max_num_top = 2
    exact_num_top = None

    def layer_setup(self, bottom, top):
        if len(top) > 1:
            # In BVLC Caffe this set-up fails either way: LossLayer adds one loss_weight for
            # two tops, and giving two makes the internal Softmax (a copy of this layer's
            # parameters, one top) fail the same loss_weight count check.
            raise self.error(
                "SoftmaxWithLoss with a second (probability) top cannot be set up in Caffe "
                "(loss_weight count check); use a separate Softmax layer for the probabilities"
            )
        lp = self.param.loss_param
        self.ignore_label = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        self.prob = None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.axis, self.outer, self.inner, self.channels = class_axis(
            self, bottom[0], bottom[1], self.param.softmax_param.axis
        )

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        if self.prob is None or self.prob.shape != x.shape:
            self.prob = xp.empty(x.shape, dtype=np.float32)
        _softmax(x, 1, self.prob)
        label = bottom[1].data.reshape(self.outer, self.inner).astype(np.int64)
        if self.ignore_label is None:
            valid = None
            lab = label
        else:
            valid = label != self.ignore_label
            lab = xp.where(valid, label, 0)
        self._check_labels(xp, lab)
        p = xp.take_along_axis(self.prob, lab[:, None, :], axis=1)[:, 0, :]
        logp = xp.log(xp.maximum(p, np.float32(FLT_MIN)))
        if valid is None:
            loss = -float(logp.sum(dtype=np.float64))
            count = self.outer * self.inner
        else:
            loss = -float((logp * valid).sum(dtype=np.float64))
            count = int(valid.sum())
        self.label, self.valid = lab, valid
        self.norm = normalizer(self.param.loss_param, count, self.outer, self.inner)
        top[0].data[...] = loss / self.norm

    def _check_labels(self, xp, lab):
        bad = (lab < 0) | (lab >= self.channels)
        if bool(bad.any()):
            first = int(xp.asarray(lab)[bad][0])
            raise self.error(f"label {first} out of range [0, {self.channels})")

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot back-propagate to the label input")
        if not propagate_down[0]:
            return
        xp = get_array_module(self.prob)
        grad = self.prob.copy()
        o = xp.arange(self.outer)[:, None]
        i = xp.arange(self.inner)[None, :]
        grad[o, self.label, i] -= 1
        if self.valid is not None:
            grad *= self.valid[:, None, :]
        scale = top[0].diff.reshape(()) / np.float32(self.norm)
        grad *= scale
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)
