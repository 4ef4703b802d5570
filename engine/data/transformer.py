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
        if (self.crop or self.mirror) and rng is None and (self.phase == caffe_pb2.TRAIN or self.mirror):
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
        self.output_shape(shape)

    def _mean_vector(self, c):
        if len(self.mean_values) == 1:
            return np.full((c, 1, 1), self.mean_values[0], dtype=np.float32)
        return self.mean_values.reshape(c, 1, 1)

    # --- transform -----------------------------------------------------------------------
    def transform(self, batch, out=None):
        """Transform N x C x H x W (uint8 or float32) into float32 N x C x H' x W'."""
        n, c, h, w = batch.shape
        oc, oh, ow = self.output_shape((c, h, w))
        if out is None:
            out = np.empty((n, oc, oh, ow), dtype=np.float32)
        elif out.shape != (n, oc, oh, ow) or out.dtype != np.float32:
            raise ValueError(f"transform: out is {out.shape} {out.dtype}, need {(n, oc, oh, ow)}")
        if n == 0:
            return out
        mean = self.mean
        if mean is None and len(self.mean_values):
            mean = self._mean_vector(c)
        per_item = self.crop and self.phase == caffe_pb2.TRAIN
        if per_item:
            hs = self.rng.integers(0, h - oh + 1, size=n)
            ws = self.rng.integers(0, w - ow + 1, size=n)
            full = mean is not None and mean.shape[1] > 1
            for i in range(n):
                y, x = int(hs[i]), int(ws[i])
                src = batch[i, :, y : y + oh, x : x + ow]
                if mean is None:
                    out[i] = src
                elif full:
                    np.subtract(src, mean[:, y : y + oh, x : x + ow], out=out[i])
                else:
                    np.subtract(src, mean, out=out[i])
        else:
            y, x = (h - oh) // 2, (w - ow) // 2
            src = batch[:, :, y : y + oh, x : x + ow]
            if mean is None:
                out[...] = src
            elif mean.shape[1] > 1:
                np.subtract(src, mean[None, :, y : y + oh, x : x + ow], out=out)
            else:
                np.subtract(src, mean[None], out=out)
        if self.scale != 1:
            out *= self.scale
        if self.mirror:
            flip = np.flatnonzero(self.rng.integers(0, 2, size=n))
            if len(flip):
                out[flip] = out[flip, :, :, ::-1]
        return out

    def transform_list(self, arrays, out=None):
        """Transform a list of C x H x W arrays (sizes may differ when cropping)."""
        if not arrays:
            raise ValueError("transform_list: no arrays")
        shapes = {a.shape for a in arrays}
        if len(shapes) == 1:
            return self.transform(np.stack(arrays), out)
        oshapes = {self.output_shape(s) for s in shapes}
        if len(oshapes) != 1:
            raise TransformError(
                f"{self.what}: inputs of different sizes {sorted(shapes)} in one batch "
                "(set crop_size or resize them)"
            )
        if out is None:
            out = np.empty((len(arrays),) + oshapes.pop(), dtype=np.float32)
        for i, a in enumerate(arrays):
            self.transform(a[None], out[i : i + 1])
        return out
