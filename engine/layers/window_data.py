"""WindowData: R-CNN fine-tuning batches of foreground / background windows cut from images
listed in a window file, warped to crop_size x crop_size with context padding (Caffe's layer).

Window file (whitespace-separated, as Caffe reads it with >>), repeated per image:
  # image_index / image_path / channels / height / width / num_windows /
  num_windows lines of `class_index overlap x1 y1 x2 y2` (pixel corners, inclusive).
"""

import logging
import math

import numpy as np

from engine import io
from engine.data import images
from engine.data.batches import Batch
from engine.data.sources import DataSourceError
from engine.layer import register
from engine.layers.data_layers import _BatchLayer, _layer_rng, _transform_param

log = logging.getLogger("engine.data")

CROP_MODES = ("warp", "square")
CORNERS = ("x1", "y1", "x2", "y2")


class WindowFile:
    """The parsed window file: image paths and the foreground / background window tables.

    fg / bg: int64 rows (image, label, x1, y1, x2, y2); fg_lines / bg_lines: their line numbers.
    Foreground: overlap >= fg_threshold (label must be > 0); background: overlap < bg_threshold
    (label forced to 0); windows in between are dropped, as in Caffe.
    """

    def __init__(self, text, source, fg_threshold=0.5, bg_threshold=0.5, root_folder=""):
        self.source = source
        tokens = _Tokens(text, source)
        if tokens.done():
            raise DataSourceError(f"{source}: window file is empty (no '# image_index' block)")
        fg_t, bg_t = np.float32(fg_threshold), np.float32(bg_threshold)
        self.paths = []
        fg, bg, fg_lines, bg_lines = [], [], [], []
        while not tokens.done():
            tag, line = tokens.take("'#'", str)
            if tag != "#":
                raise DataSourceError(f"{source}:{line}: expected '#' starting an image block")
            tokens.take("an image index", _int)
            path, _ = tokens.take("an image path", str)
            channels, cline = tokens.take("channels", _int)
            if channels != 3:
                raise DataSourceError(
                    f"{source}:{cline}: {channels} channels for {path}; WindowData reads images "
                    "in colour (3 channels)"
                )
            tokens.take("height", _int)
            tokens.take("width", _int)
            count, nline = tokens.take("the number of windows", _int)
            if count < 0:
                raise DataSourceError(f"{source}:{nline}: negative number of windows {count}")
            image = len(self.paths)
            self.paths.append(root_folder + path)
            for _ in range(count):
                label, wline = tokens.take("a class index", _int)
                overlap = np.float32(tokens.take("an overlap", float)[0])
                x1, y1, x2, y2 = (tokens.take(f"window {c}", _int)[0] for c in CORNERS)
                if x2 < x1 or y2 < y1:
                    raise DataSourceError(
                        f"{source}:{wline}: empty window ({x1}, {y1}, {x2}, {y2}): "
                        "need x1 <= x2 and y1 <= y2"
                    )
                if overlap >= fg_t:
                    if label <= 0:
                        raise DataSourceError(
                            f"{source}:{wline}: foreground window (overlap {overlap}) has class "
                            f"{label}; foreground classes must be > 0"
                        )
                    fg.append((image, label, x1, y1, x2, y2))
                    fg_lines.append(wline)
                elif overlap < bg_t:
                    bg.append((image, 0, x1, y1, x2, y2))
                    bg_lines.append(wline)
        self.fg = np.array(fg, dtype=np.int64).reshape(-1, 6)
        self.bg = np.array(bg, dtype=np.int64).reshape(-1, 6)
        self.fg_lines, self.bg_lines = fg_lines, bg_lines

    @classmethod
    def read(cls, path, fg_threshold=0.5, bg_threshold=0.5, root_folder=""):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DataSourceError(f"{path}: cannot read window file: {e.strerror}") from None
        return cls(text, path, fg_threshold, bg_threshold, root_folder)


def _int(token):
    if not token.lstrip("+-").isdigit():
        raise ValueError(token)
    return int(token)


class _Tokens:
    """Whitespace-separated tokens with their line numbers (errors say file:line)."""

    def __init__(self, text, source):
        self.source = source
        self.items = [(t, n) for n, ln in enumerate(text.splitlines(), 1) for t in ln.split()]
        self.pos = 0

    def done(self):
        return self.pos >= len(self.items)

    def take(self, what, convert):
        if self.done():
            last = self.items[-1][1] if self.items else 1
            raise DataSourceError(f"{self.source}:{last}: file ends where {what} was expected")
        token, line = self.items[self.pos]
        self.pos += 1
        try:
            return convert(token), line
        except ValueError:
            raise DataSourceError(f"{self.source}:{line}: expected {what}, got {token!r}") from None


def _round(value):
    """C's round() of a float32: halves away from zero."""
    v = float(value)
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def window_geometry(box, img_h, img_w, crop, context_pad=0, square=False, mirror=False):
    """Caffe's crop arithmetic (float32) for one window (x1, y1, x2, y2 inclusive).

    Returns ((x1, y1, x2, y2) of the image region to take, (out_h, out_w) to resize it to,
    pad_h, pad_w): the resized region lands at rows pad_h.., cols pad_w.. of the crop x crop
    output. Raises ValueError when the region leaves the image.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    out_h = out_w = crop
    pad_h = pad_w = 0
    if context_pad > 0 or square:
        f32 = np.float32
        context_scale = f32(crop) / f32(crop - 2 * context_pad)
        half_h, half_w = f32((y2 - y1 + 1) / 2.0), f32((x2 - x1 + 1) / 2.0)
        cx, cy = f32(x1) + half_w, f32(y1) + half_h
        if square:
            half_h = half_w = max(half_h, half_w)
        x1, x2 = _round(cx - half_w * context_scale), _round(cx + half_w * context_scale)
        y1, y2 = _round(cy - half_h * context_scale), _round(cy + half_h * context_scale)
        full_h, full_w = y2 - y1 + 1, x2 - x1 + 1
        px1, py1 = max(0, -x1), max(0, -y1)
        px2, py2 = max(0, x2 - img_w + 1), max(0, y2 - img_h + 1)
        x1, x2, y1, y2 = x1 + px1, x2 - px2, y1 + py1, y2 - py2
        scale_x, scale_y = f32(crop) / f32(full_w), f32(crop) / f32(full_h)
        out_w, out_h = _round(f32(x2 - x1 + 1) * scale_x), _round(f32(y2 - y1 + 1) * scale_y)
        pad_h = _round(f32(py1) * scale_y)
        # Mirrored, the padding swaps sides with the image.
        pad_w = _round(f32(px2 if mirror else px1) * scale_x)
        out_h, out_w = min(out_h, crop - pad_h), min(out_w, crop - pad_w)
    if x1 < 0 or y1 < 0 or x2 >= img_w or y2 >= img_h or x2 < x1 or y2 < y1:
        raise ValueError(f"region ({x1}, {y1}, {x2}, {y2}) is outside the {img_h}x{img_w} image")
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"region warps to an empty {out_h}x{out_w} patch")
    return (x1, y1, x2, y2), (out_h, out_w), pad_h, pad_w


def warp_window(img, box, crop, context_pad=0, square=False, mirror=False):
    """The window of an H x W x 3 uint8 image warped as Caffe does: (patch, pad_h, pad_w).

    patch: out_h x out_w x 3 uint8 (resize_linear of the clipped region, flipped if mirror).
    """
    (x1, y1, x2, y2), (oh, ow), pad_h, pad_w = window_geometry(
        box, img.shape[0], img.shape[1], crop, context_pad, square, mirror
    )
    patch = images.resize_linear(img[y1 : y2 + 1, x1 : x2 + 1], oh, ow)
    return (patch[:, ::-1] if mirror else patch), pad_h, pad_w


class _ImageStore:
    """Decoded images by index: read on each use, or all kept in memory (cache_images)."""

    def __init__(self, paths, cache):
        self.paths = paths
        self.cache = [images.read_image(p) for p in paths] if cache else None

    def get(self, index):
        if self.cache is not None:
            return self.cache[index]
        return images.read_image(self.paths[index])

    def close(self):
        self.cache = None


class _WindowBatcher:
    """produce(slot) for the Prefetcher: one batch of batch_size - num_fg background windows
    then num_fg foreground ones, each drawn uniformly with replacement."""

    skipped = 0

    def __init__(self, windows, store, rng, batch_size, num_fg, crop, **options):
        self.windows, self.store, self.rng = windows, store, rng
        self.batch_size, self.num_fg, self.crop = batch_size, num_fg, crop
        self.context_pad = options["context_pad"]
        self.square = options["square"]
        self.mirror = options["mirror"]
        self.mean = options["mean"]  # None, 3 x 1 x 1 (mean_value) or 3 x crop x crop (file)
        self.scale = np.float32(options["scale"])

    def __call__(self, slot):
        n, crop = self.batch_size, self.crop
        if slot is None:
            slot = Batch(np.empty((n, 3, crop, crop), np.float32), np.empty(n, np.float32), [])
        slot.data.fill(0)
        wf, rng = self.windows, self.rng
        n_bg = n - self.num_fg
        picks = [(wf.bg, wf.bg_lines, int(i)) for i in rng.integers(0, len(wf.bg), n_bg)]
        picks += [(wf.fg, wf.fg_lines, int(i)) for i in rng.integers(0, len(wf.fg), self.num_fg)]
        flips = rng.integers(0, 2, n).astype(bool) if self.mirror else np.zeros(n, bool)
        loaded = {}
        slot.keys = []
        for item, ((table, lines, i), flip) in enumerate(zip(picks, flips)):
            image, label = int(table[i, 0]), table[i, 1]
            where = f"{wf.source}:{lines[i]}"
            if image not in loaded:
                try:
                    loaded[image] = self.store.get(image)
                except images.ImageDecodeError as e:
                    raise DataSourceError(f"{where}: {e}") from None
            try:
                patch, ph, pw = warp_window(
                    loaded[image], table[i, 2:], crop, self.context_pad, self.square, flip
                )
            except ValueError as e:
                raise DataSourceError(f"{where}: window {table[i, 2:].tolist()}: {e}") from None
            h, w = patch.shape[:2]
            region = slot.data[item, :, ph : ph + h, pw : pw + w]
            chw = patch.transpose(2, 0, 1)
            if self.mean is None:
                region[...] = chw
            else:
                mean = (
                    self.mean if self.mean.shape[1] == 1 else self.mean[:, ph : ph + h, pw : pw + w]
                )
                np.subtract(chw, mean, out=region)
            if self.scale != 1:
                region *= self.scale
            slot.label[item] = label
            slot.keys.append(where)
        return slot


@register("WindowData")
class WindowData(_BatchLayer):
    """R-CNN windows: top[0] batch_size x 3 x crop_size x crop_size, top[1] batch_size labels.

    Each batch: batch_size - int(batch_size * fg_fraction) background windows (label 0), then
    the foreground ones (their class). A window grown by context_pad (square first in "square"
    mode) is clipped to the image, warped bilinearly into its share of the crop (the rest stays
    0), maybe mirrored, and written as (pixel - mean) * scale. As in Caffe, crop_size, mirror
    and the mean come from transform_param, the scale from window_data_param.
    """

    exact_num_top = 2

    def layer_setup(self, bottom, top):
        wp = self.param.window_data_param
        tp = _transform_param(self.param, wp)
        if tp.scale != 1 and tp.scale != wp.scale:
            # Caffe's WindowData multiplies by window_data_param.scale alone; follow it.
            log.warning(
                "layer %r (WindowData): transform_param.scale %g is ignored, as in Caffe; "
                "set window_data_param.scale",
                self.name,
                tp.scale,
            )
        if wp.batch_size <= 0:
            raise self.error("window_data_param.batch_size must be positive")
        crop, pad = int(tp.crop_size), int(wp.context_pad)
        if crop <= 0:
            raise self.error("transform_param.crop_size must be positive for WindowData")
        if crop - 2 * pad <= 0:
            raise self.error(f"context_pad {pad} leaves nothing of crop_size {crop}")
        if wp.crop_mode not in CROP_MODES:
            raise self.error(f"crop_mode {wp.crop_mode!r} is not one of {CROP_MODES}")
        num_fg = int(np.float32(wp.batch_size) * np.float32(wp.fg_fraction))
        if not 0 <= num_fg <= wp.batch_size:
            raise self.error(f"fg_fraction {wp.fg_fraction} must lie in [0, 1]")
        try:
            mean = _mean(tp, crop)
            windows = WindowFile.read(wp.source, wp.fg_threshold, wp.bg_threshold, wp.root_folder)
            needs = (
                (windows.fg, "foreground", num_fg),
                (windows.bg, "background", wp.batch_size - num_fg),
            )
            for table, what, needed in needs:
                if needed and not len(table):
                    raise DataSourceError(
                        f"{wp.source}: no {what} windows, but each batch takes {needed}"
                    )
            store = _ImageStore(windows.paths, wp.cache_images)
        except (DataSourceError, images.ImageDecodeError, io.CaffeFileError, ValueError) as e:
            raise self.error(str(e)) from None
        self.windows = windows
        batcher = _WindowBatcher(
            windows,
            store,
            _layer_rng(),
            int(wp.batch_size),
            num_fg,
            crop,
            context_pad=pad,
            square=wp.crop_mode == "square",
            mirror=tp.mirror,
            mean=mean,
            scale=wp.scale,
        )
        top[0].reshape((wp.batch_size, 3, crop, crop))
        top[1].reshape((wp.batch_size,))
        self._start(batcher, int(self.param.data_param.prefetch), store)


def _mean(tp, crop):
    """The mean as Caffe's WindowData uses it: 3 x 1 x 1 (mean_value) or the mean file's
    centre crop_size x crop_size (offset (width - crop) // 2 on both axes, as Caffe)."""
    if tp.HasField("mean_file") and len(tp.mean_value):
        raise ValueError("specify either transform_param.mean_file or mean_value, not both")
    if len(tp.mean_value):
        values = np.asarray(tp.mean_value, dtype=np.float32)
        if len(values) not in (1, 3):
            raise ValueError(f"{len(values)} mean_value entries: give 1 or 3 (one per channel)")
        return np.ascontiguousarray(np.broadcast_to(values.reshape(-1, 1, 1), (3, 1, 1)))
    if not tp.HasField("mean_file"):
        return None
    mean = io.read_mean_file(tp.mean_file)
    off = (mean.shape[-1] - crop) // 2
    if mean.ndim != 3 or mean.shape[0] != 3 or off < 0 or mean.shape[1] < off + crop:
        raise ValueError(
            f"mean_file {tp.mean_file} has shape {mean.shape}: need 3 x H x W with H, W >= "
            f"crop_size {crop}"
        )
    return np.ascontiguousarray(mean[:, off : off + crop, off : off + crop], dtype=np.float32)
