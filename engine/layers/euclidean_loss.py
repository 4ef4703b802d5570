"""EuclideanLoss (Caffe's euclidean_loss_layer): half the mean squared L2 distance per item.

Unlike the other losses it back-propagates into both bottoms.
"""

import numpy as np

from engine.layer import LossLayer, register


@register("EuclideanLoss")
class EuclideanLoss(LossLayer):
    """loss = sum((a - b)^2) / (2 N), N = a.shape[0].

    bottom[0] a, bottom[1] b: same count per item (N x ...); top: 0-d loss.
    Backward: da = w (a - b) / N, db = -w (a - b) / N, w = the loss weight (top diff).
    """

    exact_num_bottom = 2
    no_grad_bottoms = ()

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count_range(1) != bottom[1].count_range(1):
            raise self.error(
                f"inputs must have the same dimension: {bottom[0].shape} vs {bottom[1].shape}"
            )

    def forward(self, bottom, top):
        self.delta = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        d = self.delta.reshape(-1)
        dot = np.float32(float(d @ d))
        top[0].data[...] = dot / np.float32(bottom[0].num) / np.float32(2)

    def backward(self, top, propagate_down, bottom):
        w = top[0].diff.reshape(())
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = np.float32(sign) * w / np.float32(bottom[i].num)
                bottom[i].diff[...] = (self.delta * alpha).reshape(bottom[i].shape)
