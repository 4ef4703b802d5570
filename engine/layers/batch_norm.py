"""BatchNorm (Caffe's batch_norm_layer): per-channel normalisation with running statistics,
no affine part (follow it with Scale)."""

import numpy as np

from engine.backend import get_array_module
from engine.layer import Layer, register
from engine.proto import caffe_pb2


@register("BatchNorm")
class BatchNorm(Layer):
    """y = (x - mean_c) / sqrt(var_c + eps) per channel c (axis 1; a 1-axis bottom is 1 channel).

    TRAIN (use_global_stats false, the TRAIN default): batch mean and biased variance over
    N and the spatial axes; then sum0 = f*sum0 + mean, sum1 = f*sum1 + var*m/(m-1) (m =
    count/C), factor = f*factor + 1, f = moving_average_fraction. Global stats (TEST
    default): mean = sum0/factor, var = sum1/factor (factor 0 -> 0). Blobs [sum0 (C),
    sum1 (C), factor (1)] are never learned. bottom and top: N x C x ...; may run in place.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    allow_in_place = True
    # The net must never update these blobs (Caffe forces lr_mult 0 on them).
    frozen_params = True

    def layer_setup(self, bottom, top):
        bp = self.param.batch_norm_param
        self.fraction = float(bp.moving_average_fraction)
        self.eps = float(bp.eps)
        if bp.HasField("use_global_stats"):
            self.use_global_stats = bool(bp.use_global_stats)
        else:
            self.use_global_stats = self.phase == caffe_pb2.TEST
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        for i, spec in enumerate(self.param.param[:3]):
            if spec.lr_mult != 0:
                raise self.error(
                    f"cannot configure batch normalization statistics as layer parameters "
                    f"(param {i} has lr_mult {spec.lr_mult}; it must be 0 or left out)"
                )
        if not self.blobs:
            self.add_blob((self.channels,))
            self.add_blob((self.channels,))
            self.add_blob((1,))
        self.param_propagate_down = [False] * 3

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes > 1 and b.shape[1] != self.channels:
            raise self.error(
                f"bottom {b.shape} has {b.shape[1]} channels, expected {self.channels}"
            )
        if b.num_axes == 0:
            raise self.error("bottom must have at least one axis")
        top[0].reshape(b.shape)
        self.num = b.shape[0]
        self.spatial = b.count // (self.num * self.channels) if b.count else 0

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        shape3 = (self.num, self.channels, self.spatial)
        x = bottom[0].data.reshape(shape3)
        if self.use_global_stats:
            factor = float(self.blobs[2].data.reshape(-1)[0])
            scale = np.float32(0.0 if factor == 0 else 1.0 / factor)
            mean = self.blobs[0].data * scale
            var = self.blobs[1].data * scale
            centred = x - mean[None, :, None]
        else:
            inv_m = np.float32(1.0 / (self.num * self.spatial))
            mean = x.sum(axis=(0, 2)) * inv_m
            centred = x - mean[None, :, None]
            var = (centred * centred).sum(axis=(0, 2)) * inv_m
            f = np.float32(self.fraction)
            m = bottom[0].count // self.channels
            correction = np.float32(m / (m - 1) if m > 1 else 1.0)
            self.blobs[2].data[...] = self.blobs[2].data * f + 1
            self.blobs[0].data[...] = mean + f * self.blobs[0].data
            self.blobs[1].data[...] = correction * var + f * self.blobs[1].data
        self.std = xp.sqrt(var + np.float32(self.eps))
        y = centred / self.std[None, :, None]
        top[0].data[...] = y.reshape(top[0].shape)
        # Kept for backward: a later in-place layer may overwrite top's data.
        self.x_norm = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        shape3 = (self.num, self.channels, self.spatial)
        dy = top[0].diff.reshape(shape3)
        std = self.std[None, :, None]
        if self.use_global_stats:
            bottom[0].diff[...] = (dy / std).reshape(bottom[0].shape)
            return
        y = self.x_norm
        inv_m = np.float32(1.0 / (self.num * self.spatial))
        dot = (dy * y).sum(axis=(0, 2))[None, :, None]
        sum_dy = dy.sum(axis=(0, 2))[None, :, None]
        dx = (dy - (y * dot + sum_dy) * inv_m) / std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)
