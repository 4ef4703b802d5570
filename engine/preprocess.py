"""pycaffe's deploy-time preprocessing (`caffe.io.Transformer`, `load_image`, `resize_image`,
`oversample`), re-exported by engine.io so pycaffe classification scripts run unchanged."""

import numpy as np
from PIL import Image


def load_image(filename, color=True):
    """An image file as float32 H x W x C in [0, 1], RGB (pycaffe's convention, not BGR):
    C is 3 when `color` (grey replicated, alpha dropped), else 1."""
    with Image.open(filename) as im:
        im = im.convert("RGB" if color else "L")
        img = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return img if color else img[:, :, None]


def _bilinear_axis(src, dst):
    """Sample positions (half-pixel centres) of `dst` outputs over `src` inputs: i0, i1, w1."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    pos = np.clip(pos, 0, src - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def resize_image(im, new_dims, interp_order=1):
    """Resize H x W x K to new_dims (height, width): bilinear (interp_order 1, the default)
    or nearest neighbour (0), without anti-aliasing. Returns float32."""
    im = np.asarray(im, dtype=np.float32)
    h, w = im.shape[:2]
    nh, nw = int(new_dims[0]), int(new_dims[1])
    if (h, w) == (nh, nw):
        return im.copy()
    if interp_order == 0:
        rows = np.minimum((np.arange(nh) * h) // nh, h - 1)
        cols = np.minimum((np.arange(nw) * w) // nw, w - 1)
        return im[rows][:, cols]
    if interp_order != 1:
        raise ValueError(f"resize_image: interp_order {interp_order} not supported (use 0 or 1)")
    y0, y1, wy = _bilinear_axis(h, nh)
    x0, x1, wx = _bilinear_axis(w, nw)
    shape_x = (1, nw) + (1,) * (im.ndim - 2)
    shape_y = (nh,) + (1,) * (im.ndim - 1)
    wx = wx.reshape(shape_x)
    rows = im[y0] * (1 - wy.reshape(shape_y)) + im[y1] * wy.reshape(shape_y)
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)


def oversample(images, crop_dims):
    """The 10 crops of each H x W x K image: four corners and the centre, then their mirrors.

    Returns float32 (10 * len(images)) x crop_h x crop_w x K, 10 consecutive crops per image.
    """
    ch, cw = int(crop_dims[0]), int(crop_dims[1])
    out = []
    for im in images:
        h, w = im.shape[:2]
        if ch > h or cw > w:
            raise ValueError(f"oversample: crop {ch}x{cw} larger than image {h}x{w}")
        cy, cx = int(h / 2.0 - ch / 2.0), int(w / 2.0 - cw / 2.0)
        origins = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (cy, cx)]
        crops = np.stack([im[y : y + ch, x : x + cw] for y, x in origins])
        out.append(np.concatenate([crops, crops[:, :, ::-1]]))
    return np.concatenate(out).astype(np.float32)


class Transformer:
    """pycaffe's caffe.io.Transformer: turns H x W x K images (as load_image gives them) into
    a net input blob's C x H x W layout, per input: resize, transpose, channel swap, raw
    scale, mean subtraction, input scale, in that order; `deprocess` undoes it."""

    def __init__(self, inputs):
        self.inputs = {name: tuple(shape) for name, shape in inputs.items()}
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def _check(self, name):
        if name not in self.inputs:
            raise KeyError(f"{name!r} is not one of the net inputs: {sorted(self.inputs)}")

    def preprocess(self, name, data):
        self._check(name)
        x = np.asarray(data, dtype=np.float32)
        size = self.inputs[name][2:]
        if x.shape[:2] != size:
            x = resize_image(x, size)
        if name in self.transpose:
            x = x.transpose(self.transpose[name])
        if name in self.channel_swap:
            x = x[list(self.channel_swap[name])]
        x = np.array(x, dtype=np.float32)  # a fresh array: the steps below work in place
        if name in self.raw_scale:
            x *= self.raw_scale[name]
        if name in self.mean:
            x -= self.mean[name]
        if name in self.input_scale:
            x *= self.input_scale[name]
        return x

    def deprocess(self, name, data):
        self._check(name)
        x = np.array(data, dtype=np.float32).squeeze()
        if name in self.input_scale:
            x /= self.input_scale[name]
        if name in self.mean:
            x += self.mean[name]
        if name in self.raw_scale:
            x /= self.raw_scale[name]
        if name in self.channel_swap:
            x = x[np.argsort(self.channel_swap[name])]
        if name in self.transpose:
            x = x.transpose(np.argsort(self.transpose[name]))
        return x

    def set_transpose(self, name, order):
        """Axis order taking the image (H x W x K) to the blob's C x H x W, e.g. (2, 0, 1)."""
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise ValueError(
                f"transpose order {tuple(order)} needs {len(self.inputs[name]) - 1} axes "
                f"for input {name!r} of shape {self.inputs[name]}"
            )
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name, order):
        """Channel order after transposing, e.g. (2, 1, 0) turns RGB into Caffe's BGR."""
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError(
                f"channel swap {tuple(order)} needs {self.inputs[name][1]} channels "
                f"for input {name!r}"
            )
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name, scale):
        """Multiplier before mean subtraction, e.g. 255 for load_image's [0, 1] pixels."""
        self._check(name)
        self.raw_scale[name] = np.float32(scale)

    def set_mean(self, name, mean):
        """Per-channel mean (K,) or an elementwise mean (C x H x W, or H x W for one channel)."""
        self._check(name)
        mean = np.asarray(mean, dtype=np.float32)
        shape = self.inputs[name]
        if mean.ndim == 1:
            if mean.shape[0] != shape[1]:
                raise ValueError(f"mean has {mean.shape[0]} channels, input {name!r} {shape[1]}")
            mean = mean[:, None, None]
        else:
            if mean.ndim == 2:
                mean = mean[None]
            if mean.shape != tuple(shape[1:]):
                raise ValueError(f"mean shape {mean.shape} does not match input {name!r} {shape}")
        self.mean[name] = mean

    def set_input_scale(self, name, scale):
        """Multiplier after mean subtraction (e.g. 0.017 for normalised nets)."""
        self._check(name)
        self.input_scale[name] = np.float32(scale)
