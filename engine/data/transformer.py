"""Caffe's DataTransformer (transform_param) over whole batches: crop, mirror, mean, scale.

Per element, as Caffe: out = (x[h_off + h, w_off + w] - mean[same place]) * scale, written
mirrored (w -> W' - 1 - w) when the item is mirrored. Crop offsets are random in TRAIN and
centred ((H - crop) // 2) in TEST; mirroring (mirror: true) is random in both phases, as in
Caffe. Random choices come from the Generator given to the transformer.
"""

import numpy as np

from engine import io
from engine.proto import caffe_pb2


class TransformError(ValueError):
    """A transform that cannot apply to an input (names the mean file / record)."""


class DataTransformer:
    """Applies a TransformationParameter to N x C x H x W batches (uint8 or float32)."""

    def __init__(self, param, phase, rng=None, what="transform_param"):
        self.param = param
        self.phase = phase
        self.rng = rng
        self.what = what
        self.scale = np.float32(param.scale)
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        if param.force_color and param.force_gray:
            raise TransformError(f"{what}: force_color and force_gray cannot both be set")
        if param.HasField("mean_file") and len(param.mean_value):
            raise TransformError(f"{what}: specify either mean_file or mean_value, not both")
        self.mean = None
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        if self.mean_file is not None:
            try:
                mean = io.read_mean_file(self.mean_file)
            except io.CaffeFileError as e:
                raise TransformError(f"{what}: mean_file: {e}") from None
            if mean.ndim != 3:
                raise TransformError(
                    f"{what}: mean_file {self.mean_file} has shape {mean.shape}, "
                    "expected 1 x C x H x W"
                )
            self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32)
        self._mean_cache = {}
        # Whether transforms draw random numbers (random crops in TRAIN, mirrors).
        self.random = bool(self.mirror or (self.crop and phase == caffe_pb2.TRAIN))
        if self.random and rng is None:
            raise TransformError(f"{what}: random crop/mirror needs a random generator")

    # --- shapes --------------------------------------------------------------------------
    def output_shape(self, shape):
        """Transformed C x H x W of an input C x H x W (Caffe's InferBlobShape)."""
        c, h, w = shape
        if self.crop:
            if h < self.crop or w < self.crop:
                raise TransformError(
                    f"{self.what}: crop_size {self.crop} is larger than the input {h}x{w}"
                )
            return (c, self.crop, self.crop)
        return (c, h, w)

    def check(self, shape, what):
        """Raise TransformError naming `what` when the mean does not fit an input shape."""
        c, h, w = shape
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise TransformError(
                f"{what}: mean_file {self.mean_file} has shape "
                f"{'x'.join(map(str, self.mean.shape))} but the input is {c}x{h}x{w}"
            )
        nv = len(self.mean_values)
        if nv > 1 and nv != c:
            raise TransformError(
                f"{what}: {nv} mean_value entries for an input of {c} channels "
                "(give one value or one per channel)"
            )
        if self.crop and (h < self.crop or w < self.crop):
            raise TransformError(f"{what}: crop_size {self.crop} is larger than the input {h}x{w}")

    def _mean_vector(self, c):
        if len(self.mean_values) == 1:
            return np.full((c, 1, 1), self.mean_values[0], dtype=np.float32)
        return self.mean_values.reshape(c, 1, 1)

    def _mean_for(self, c):
        """The mean to subtract from a c-channel input (mean_file, mean_value or None)."""
        if self.mean is not None:
            return self.mean
        if not len(self.mean_values):
            return None
        cached = self._mean_cache.get(c)
        if cached is None:
            cached = self._mean_cache[c] = self._mean_vector(c)
        return cached

    # --- transform -----------------------------------------------------------------------
    def _draws(self, n, h, w, oh, ow):
        """Per-item crop offsets (random in TRAIN, else centred) and mirror flags."""
        if self.crop and self.phase == caffe_pb2.TRAIN:
            ys = self.rng.integers(0, h - oh + 1, size=n)
            xs = self.rng.integers(0, w - ow + 1, size=n)
        else:
            ys = np.full(n, (h - oh) // 2)
            xs = np.full(n, (w - ow) // 2)
        flips = self.rng.integers(0, 2, size=n).astype(bool) if self.mirror else np.zeros(n, bool)
        return ys, xs, flips

    def _item(self, src, mean, y, x, flip, out):
        """One C x H x W item into out (C x H' x W'): crop, subtract, scale, mirror."""
        oh, ow = out.shape[1:]
        src = src[:, y : y + oh, x : x + ow]
        if mean is not None and mean.shape[1] > 1:
            mean = mean[:, y : y + oh, x : x + ow]
        if flip:
            # Caffe takes the mean at the source pixel, then writes the result mirrored.
            src = src[:, :, ::-1]
            if mean is not None and mean.shape[1] > 1:
                mean = mean[:, :, ::-1]
        _subtract_scale(src, mean, self.scale, out)

    def transform(self, batch, out=None):
        """Transform N x C x H x W (uint8 or float32) into float32 N x C x H' x W'."""
        n, c, h, w = batch.shape
        oc, oh, ow = self.output_shape((c, h, w))
        out = self._out(out, (n, oc, oh, ow))
        if n == 0:
            return out
        mean = self._mean_for(c)
        if self.mirror or (self.crop and self.phase == caffe_pb2.TRAIN):
            ys, xs, flips = self._draws(n, h, w, oh, ow)
            for i in range(n):
                self._item(batch[i], mean, int(ys[i]), int(xs[i]), flips[i], out[i])
            return out
        # Same window for every item: whole-batch NumPy operations.
        y, x = (h - oh) // 2, (w - ow) // 2
        src = batch[:, :, y : y + oh, x : x + ow]
        if mean is not None:
            mean = mean[None, :, y : y + oh, x : x + ow] if mean.shape[1] > 1 else mean[None]
        _subtract_scale(src, mean, self.scale, out)
        return out

    def transform_list(self, arrays, out=None):
        """Transform a list of C x H x W arrays (views welcome; sizes may differ with a crop)."""
        if not arrays:
            raise ValueError("transform_list: no arrays")
        oshapes = {self.output_shape(a.shape) for a in arrays}
        if len(oshapes) != 1:
            shapes = sorted({a.shape for a in arrays})
            raise TransformError(
                f"{self.what}: inputs of different sizes {shapes} in one batch "
                "(set crop_size or resize them)"
            )
        oshape = oshapes.pop()
        out = self._out(out, (len(arrays),) + oshape)
        for i, a in enumerate(arrays):
            c, h, w = a.shape
            ys, xs, flips = self._draws(1, h, w, oshape[1], oshape[2])
            self._item(a, self._mean_for(c), int(ys[0]), int(xs[0]), flips[0], out[i])
        return out

    @staticmethod
    def _out(out, shape):
        if out is None:
            return np.empty(shape, dtype=np.float32)
        if out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"transform: out is {out.shape} {out.dtype}, need {shape} float32")
        return out


def _subtract_scale(src, mean, scale, out):
    """out = (src - mean) * scale (mean may be None), computed in place in float32 `out`."""
    if mean is not None:
        np.subtract(src, mean, out=out)
        if scale != 1:
            out *= scale
    elif scale != 1:
        np.multiply(src, scale, out=out)
    else:
        out[...] = src
