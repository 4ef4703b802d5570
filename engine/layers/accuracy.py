"""Accuracy (Caffe's accuracy_layer): top-k classification accuracy, optionally per class.

Forward only; a class scoring >= the true class counts as ranked above it (ties lose).
"""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, class_axis, register


@register("Accuracy")
class Accuracy(Layer):
    """acc = #{labels ranked in the top_k} / #{non-ignored labels} (0 when none).

    bottom[0]: scores, classes on accuracy_param.axis (N x C x ...); bottom[1]: labels,
    count = N * (spatial size). The true class is in the top k when fewer than k other
    classes score >= it. top[0]: 0-d; optional top[1]: per-class accuracy (C,), 0 for
    classes without labels. No backward.
    """

    exact_num_bottom = 2
    min_num_top = 1
    max_num_top = 2
    no_grad_bottoms = (0, 1)

    def layer_setup(self, bottom, top):
        ap = self.param.accuracy_param
        self.top_k = int(ap.top_k)
        self.ignore_label = int(ap.ignore_label) if ap.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        if bottom[1].count == 0 or self.top_k > bottom[0].count // bottom[1].count:
            raise self.error(
                f"top_k ({self.top_k}) must be less than or equal to the number of classes "
                f"(scores {bottom[0].shape}, labels {bottom[1].shape})"
            )
        self.axis, self.outer, self.inner, self.channels = class_axis(
            self, bottom[0], bottom[1], self.param.accuracy_param.axis
        )
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        scores = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        label = bottom[1].data.reshape(-1).astype(np.int64)
        if self.ignore_label is None:
            valid = xp.ones(label.shape, dtype=bool)
        else:
            valid = label != self.ignore_label
        lab = xp.where(valid, label, 0)
        bad = (lab < 0) | (lab >= self.channels)
        if bool(bad.any()):
            first = int(lab[bad][0])
            raise self.error(f"label {first} out of range [0, {self.channels})")
        lab2 = lab.reshape(self.outer, 1, self.inner)
        true_score = xp.take_along_axis(scores, lab2, axis=1)
        # The true class itself is one of the ">=" classes, hence the -1.
        better = (scores >= true_score).sum(axis=1).reshape(-1) - 1
        correct = (better < self.top_k) & valid
        count = int(valid.sum())
        top[0].data[...] = 0.0 if count == 0 else float(correct.sum()) / count
        if len(top) > 1:
            nums = xp.bincount(lab[valid], minlength=self.channels)
            hits = xp.bincount(lab[correct], minlength=self.channels)
            per_class = hits / xp.maximum(nums, 1)
            top[1].data[...] = xp.where(nums == 0, 0.0, per_class)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Accuracy has no backward")
