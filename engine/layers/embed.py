"""Embed (Caffe's embed_layer): a lookup table from integer indices to learned vectors.

The index bottom never gets a gradient; the table and bias do. An index of -1, the padding
of CaffeOnSpark's caption tables (its LRCN input_sentence), embeds as a zero row (plus the
bias) and adds nothing to the table's gradient: Caffe checks indices only in debug builds
and reads outside its table there, rows that the caption loss then ignores.
"""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, register

PADDING = -1


@register("Embed")
class Embed(Layer):
    """y[..., :] = W[idx[...], :] + b, W: input_dim x num_output, b: num_output (bias_term).

    bottom: indices of any shape (integer-valued floats in [0, input_dim), or -1: padding);
    top: bottom shape + (num_output,). Backward: dW[k] += sum of dy rows whose index is k,
    db += sum of dy rows.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    no_grad_bottoms = (0,)

    def layer_setup(self, bottom, top):
        p = self.param.embed_param
        self.num_output = p.num_output
        self.input_dim = p.input_dim
        if self.num_output <= 0:
            raise self.error("embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise self.error("embed_param.input_dim must be positive")
        self.bias_term = p.bias_term
        self.add_blob((self.input_dim, self.num_output), p.weight_filler)
        if self.bias_term:
            self.add_blob((self.num_output,), p.bias_filler)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        raw = bottom[0].data.reshape(-1)
        idx = raw.astype(np.int64)
        bad = (idx != raw) | (idx < PADDING) | (idx >= self.input_dim)
        if bool(bad.any()):
            raise self.error(
                f"index {float(raw[bad][0])} is not an integer in [0, input_dim={self.input_dim})"
                f" (or {PADDING}: padding)"
            )
        pad = idx == PADDING
        self.pad = pad if bool(pad.any()) else None
        if self.pad is None:
            self.idx = idx
            y = xp.take(self.blobs[0].data, idx, axis=0)
        else:
            self.idx = idx[~pad]
            y = xp.take(self.blobs[0].data, xp.where(pad, 0, idx), axis=0)
            y[pad] = 0
        if self.bias_term:
            y += self.blobs[1].data
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("cannot back-propagate to the index input (bottom 0)")
        xp = get_array_module(top[0].diff)
        dy = top[0].diff.reshape(-1, self.num_output)
        if self.param_propagate(0):
            xp.add.at(self.blobs[0].diff, self.idx, dy if self.pad is None else dy[~self.pad])
        if self.bias_term and self.param_propagate(1):
            self.blobs[1].diff[...] += dy.sum(axis=0)
