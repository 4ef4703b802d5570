"""CaffeOnSpark's CoSData layer: any number of typed tops, each filled from one column of a
table's rows (numbers, number arrays, raw or encoded images), each with its own transform.

Records are (key, tuple of the tops' column values, in top order). On a cluster, caffeonspark
plugs in the source (set_source_factory); alone, the layer reads the local Parquet / ORC
table at cos_data_param.source (engine.data.table). A value that does not fit its top (a
wrong length, an undecodable image, a null) is an error naming the record and the column,
or, with bad-record skipping on (ENGINE_SKIP_BAD_RECORDS), a logged skip.
"""

import logging
import math

import numpy as np

from engine.data import batches, images
from engine.data.sources import DataSourceError
from engine.data.table import TableSource
from engine.data.transformer import DataTransformer, TransformError
from engine.layer import register
from engine.layers import data_layers
from engine.proto import caffe_pb2

log = logging.getLogger("engine.data")

_C = caffe_pb2.CoSDataParameter
SCALARS = (_C.STRING, _C.INT, _C.FLOAT)
ARRAYS = (_C.INT_ARRAY, _C.FLOAT_ARRAY)
IMAGES = (_C.RAW_IMAGE, _C.ENCODED_IMAGE, _C.ENCODED_IMAGE_WITH_DIM)
# CaffeOnSpark decoded encoded images as grey for 1 channel, colour for 3, else as stored.
_DECODE_MODE = {1: images.GRAY, 3: images.COLOR}


class FieldError(ValueError):
    """A column value that does not fit its top (the message names the column)."""


class CoSTop:
    """One top of a CoSData layer: its column, type and shapes, and how a value becomes a
    C x H x W sample (before the top's transform; fewer axes are padded with ones)."""

    def __init__(self, param, phase):
        self.name = param.name
        self.type = param.type
        self.what = f"top {self.name!r} ({_C.DataType.Name(self.type)})"
        if not self.name:
            raise ValueError("a cos_data_param top has no name (the column it reads)")
        axes = int(param.sample_num_axes)
        if axes > 3:
            raise ValueError(f"{self.what}: sample_num_axes is {axes}, at most 3")
        shape = (int(param.channels), int(param.height), int(param.width))
        out = tuple(
            o or s for o, s in zip((param.out_channels, param.out_height, param.out_width), shape)
        )
        if min(shape[:axes] + out[:axes], default=1) < 1:
            raise ValueError(f"{self.what}: channels, height and width must be positive")
        # Only the first sample_num_axes dimensions count; the rest are ones.
        self.shape = shape[:axes] + (1,) * (3 - axes)
        self.out_shape = out[:axes] + (1,) * (3 - axes)
        self.axes = axes
        self.size = math.prod(self.shape)
        self.transpose = bool(param.transpose)
        if self.transpose and axes != 1:
            raise ValueError(f"{self.what}: transpose needs sample_num_axes 1, got {axes}")
        if self.type in SCALARS and self.size != 1:
            raise ValueError(
                f"{self.what}: holds one number per record, but its sample shape "
                f"{_dims(self.shape[:axes])} has {self.size} values"
            )
        if self.type in IMAGES and axes != 3:
            raise ValueError(f"{self.what}: images need sample_num_axes 3, got {axes}")
        self.transformer = None
        if param.HasField("transform_param") or self.type in IMAGES:
            self.transformer = DataTransformer(
                param.transform_param, phase, np.random.default_rng(0), self.what
            )
            try:
                got = self.transformer.output_shape(self.shape)
            except TransformError as e:
                raise ValueError(str(e)) from None
            if got != self.out_shape:
                raise ValueError(
                    f"{self.what}: its transform turns {_dims(self.shape)} into {_dims(got)}, "
                    f"but the top is declared {_dims(self.out_shape)} (out_channels, "
                    "out_height, out_width)"
                )
        elif self.out_shape != self.shape:
            raise ValueError(
                f"{self.what}: out_channels/out_height/out_width differ from channels/height/"
                "width, but there is no transform_param to change the shape"
            )

    def top_shape(self, n):
        if self.transpose:
            return (self.out_shape[0], n)
        return (n,) + self.out_shape[: self.axes]

    def sample(self, value, resize):
        """The C x H x W sample of one column value (uint8 for images, float32 otherwise)."""
        if value is None:
            raise FieldError(f"column {self.name!r} is null")
        kind = self.type
        if kind in SCALARS:
            return np.full(self.shape, _number(value, kind, self.name), np.float32)
        if kind in ARRAYS:
            return _array(value, kind, self.name, self.size).reshape(self.shape)
        if kind == _C.RAW_IMAGE:
            data = _bytes(value, self.name)
            c, h, w = self.shape
            if len(data) != c * h * w:
                raise FieldError(
                    f"column {self.name!r}: {len(data)} bytes of raw pixels, but height x "
                    f"width x channels = {h}x{w}x{c} = {c * h * w}"
                )
            return np.frombuffer(data, np.uint8).reshape(h, w, c).transpose(2, 0, 1)
        if kind == _C.ENCODED_IMAGE:
            return self._decoded(_bytes(value, self.name), None, resize)
        return self._decoded(*_image_with_dim(value, self.name), resize)

    def _decoded(self, data, stored, resize):
        c, h, w = self.shape
        try:
            img = images.decode_image(data, _DECODE_MODE.get(c, images.UNCHANGED), self.name)
        except images.ImageDecodeError as e:
            raise FieldError(f"column {self.name!r}: {e}") from None
        if img.ndim == 2:
            img = img[:, :, None]
        if stored is not None and img.shape[:2] != stored:
            raise FieldError(
                f"column {self.name!r}: the image is {img.shape[0]}x{img.shape[1]}, but its "
                f"height and width say {stored[0]}x{stored[1]}"
            )
        if img.shape[2] != c:
            raise FieldError(
                f"column {self.name!r}: the image has {img.shape[2]} channels, the top {c}"
            )
        if img.shape[:2] != (h, w):
            if not resize:
                raise FieldError(
                    f"column {self.name!r}: the image is {img.shape[0]}x{img.shape[1]}, the "
                    f"top takes {h}x{w} (resize the images, or run with -resize)"
                )
            img = images.resize_linear(img, h, w).reshape(h, w, c)
        return images.hwc_to_chw(img, copy=False)

    def fill(self, samples, rng):
        """The top's batch from a list of samples: transformed, in the top's shape."""
        n = len(samples)
        batch = np.stack(samples)
        if self.transformer is None:
            out = batch.astype(np.float32, copy=False)
        else:
            self.transformer.rng = rng
            out = self.transformer.transform(batch)
        if self.transpose:
            return np.ascontiguousarray(out.reshape(n, -1).T)
        return out.reshape(self.top_shape(n))


class CoSBatcher(batches.BadRecords):
    """The prefetch thread's produce(): batch_size records -> one array per top. Random
    transforms draw from a generator keyed on (seed, top, stream position of the batch), as
    RecordBatcher's do, so a resumed stream draws what the uninterrupted one drew."""

    def __init__(self, source, tops, batch_size, name, seed, resize):
        self.source = source
        self.tops = tops
        self.batch_size = batch_size
        self.name = name
        self.seed = seed
        self.resize = resize
        self.skip_bad = batches.skip_bad_records()

    def __call__(self, slot=None):
        position = self.source.position
        samples = [[] for _ in self.tops]
        keys = []
        bad_run = 0
        while len(keys) < self.batch_size:
            for key, values in self.source.take(self.batch_size - len(keys)):
                try:
                    row = self._row(values)
                except (TypeError, ValueError) as e:  # FieldError, and bad values' own
                    bad_run = self._bad_in_run(key, e, bad_run)
                    continue
                bad_run = 0
                keys.append(key)
                for out, sample in zip(samples, row):
                    out.append(sample)
        arrays = [
            top.fill(s, np.random.default_rng((self.seed, i, position)))
            for i, (top, s) in enumerate(zip(self.tops, samples))
        ]
        return arrays, keys

    def _row(self, values):
        if len(values) != len(self.tops):
            raise FieldError(f"{len(values)} column values for {len(self.tops)} tops")
        return [top.sample(v, self.resize) for top, v in zip(self.tops, values)]


@register("CoSData")
class CoSData(data_layers._BatchLayer):
    """CaffeOnSpark's CoSData: one top per cos_data_param.top, filled from the column named
    like it. top i: batch_size x out_channels x out_height x out_width, cut to 1 +
    sample_num_axes axes, or out_channels x batch_size with `transpose`. Images are decoded
    to channels x height x width (raw pixels interleaved height, width, channels), then go
    through the top's transform_param (crop, mirror, mean, scale) as a Data layer's would.
    """

    max_num_top = None

    def layer_setup(self, bottom, top):
        cp = self.param.cos_data_param
        what = f"layer {self.name!r}"
        if cp.batch_size <= 0:
            raise self.error("cos_data_param.batch_size must be positive")
        if len(cp.top) != len(top):
            raise self.error(
                f"{len(top)} tops but {len(cp.top)} cos_data_param.top entries: give one entry "
                "per top, in the same order"
            )
        if self.param.HasField("transform_param"):
            log.warning(
                "%s: transform_param at the layer is not used by CoSData; each "
                "cos_data_param.top has its own",
                what,
            )
        try:
            self.tops = [CoSTop(p, self.phase) for p in cp.top]
        except (ValueError, TransformError) as e:
            raise self.error(str(e)) from None
        source = self._open_source(cp)
        resize = bool(getattr(source, "resize_images", False))
        self.batch_size = int(cp.batch_size)
        batcher = CoSBatcher(
            source, self.tops, self.batch_size, what, data_layers._layer_seed(), resize
        )
        for t, spec in zip(top, self.tops):
            t.reshape(spec.top_shape(self.batch_size))
        self._start(batcher, int(self.param.data_param.prefetch), source)

    def _open_source(self, cp):
        factory = data_layers._factory["fn"]
        if factory is not None:
            source = factory(self.param, self.phase)
            if source is not None:
                return source
        if not cp.source:
            raise self.error("cos_data_param.source is not set")
        try:
            return TableSource(cp.source, [t.name for t in self.tops], cp.dataframe_format)
        except DataSourceError as e:
            raise self.error(str(e)) from None

    def _fill_tops(self, batch, top):
        arrays, _ = batch
        for t, a in zip(top, arrays):
            data_layers._copy_into(t, a)


def _dims(shape):
    return "x".join(map(str, shape))


def _number(value, kind, column):
    if kind == _C.STRING:
        if not isinstance(value, str):
            raise FieldError(f"column {column!r}: expected a string, got {type(value).__name__}")
        try:
            return float(value)
        except ValueError:
            raise FieldError(f"column {column!r}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise FieldError(f"column {column!r}: expected a number, got {type(value).__name__}")
    if kind == _C.INT and float(value) != int(value):
        raise FieldError(f"column {column!r}: {value!r} is not an integer")
    return float(value)


def _array(value, kind, column, size):
    if isinstance(value, (str, bytes, bytearray)) or not hasattr(value, "__len__"):
        raise FieldError(f"column {column!r}: expected an array, got {type(value).__name__}")
    if len(value) != size:
        raise FieldError(f"column {column!r}: {len(value)} values, the top takes {size}")
    if any(v is None for v in value):
        raise FieldError(f"column {column!r}: the array holds a null")
    arr = np.asarray(value, dtype=np.float64)
    if kind == _C.INT_ARRAY and not np.array_equal(arr, np.round(arr)):
        raise FieldError(f"column {column!r}: INT_ARRAY holds a value that is not an integer")
    return arr.astype(np.float32)


def _bytes(value, column):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):  # Spark's array<byte>: signed bytes
        return np.asarray(value, dtype=np.int16).astype(np.int8).view(np.uint8).tobytes()
    raise FieldError(f"column {column!r}: expected bytes, got {type(value).__name__}")


def _image_with_dim(value, column):
    """(image bytes, (height, width)) of an ENCODED_IMAGE_WITH_DIM struct value."""
    fields = value.asDict() if hasattr(value, "asDict") else value  # a Spark Row, or a dict
    if not isinstance(fields, dict) or not {"image", "height", "width"} <= set(fields):
        raise FieldError(
            f"column {column!r}: ENCODED_IMAGE_WITH_DIM takes a struct of image, height and "
            f"width, got {type(value).__name__}"
        )
    try:
        stored = (int(fields["height"]), int(fields["width"]))
    except (TypeError, ValueError):
        raise FieldError(f"column {column!r}: height and width must be integers") from None
    return _bytes(fields["image"], column), stored
