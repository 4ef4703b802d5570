"""Caffe's Datum record: parse, decode (raw uint8 / float_data / encoded JPEG-PNG) and build,
byte-compatible with Caffe's tools, plus a whole-batch fast path for raw uint8 records.

Decoded arrays are C x H x W in Caffe's channel order (BGR for colour images).
"""

import numpy as np
from google.protobuf import message

from engine.data import images
from engine.proto import caffe_pb2


class DatumError(ValueError):
    """A record that is not a valid Datum or does not match its shape (names source and key)."""


def record_name(source, key):
    """'<source> key <key>' for error messages (keys shown as text where they are text)."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        key = bytes(key)
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            key = key.hex()
    return f"{source} key {key!r}"


# --- parse and decode ------------------------------------------------------------------------


def parse_datum(value, what="<datum>"):
    """Serialized bytes -> caffe_pb2.Datum."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(bytes(value))
    except message.DecodeError as e:
        raise DatumError(f"{what}: not a valid Datum ({len(value)} bytes): {e}") from None
    return datum


def decode_mode(force_color=False, force_gray=False):
    """The image decode mode for encoded Datums (Caffe: native channels unless forced)."""
    if force_color and force_gray:
        raise ValueError("force_color and force_gray cannot both be set")
    if force_color:
        return images.COLOR
    if force_gray:
        return images.GRAY
    return images.UNCHANGED


def datum_to_array(datum, what="<datum>", mode=images.UNCHANGED):
    """Datum -> C x H x W array: uint8 for raw and encoded records, float32 for float_data.

    The array may be a read-only strided view (np.ascontiguousarray it before writing).
    Encoded records are decoded with `mode` (see images.py); raw ones are checked against
    their declared channels x height x width.
    """
    if datum.encoded:
        if not datum.data:
            raise DatumError(f"{what}: encoded Datum has no image bytes")
        try:
            img = images.decode_image(datum.data, mode, what=what, contiguous=False)
        except images.ImageDecodeError as e:
            raise DatumError(str(e)) from None
        # A C x H x W view of the decoded pixels (BGR through a negative channel stride).
        return images.hwc_to_chw(img, copy=False)
    c, h, w = datum.channels, datum.height, datum.width
    n = c * h * w
    if datum.data:
        if len(datum.data) != n:
            raise DatumError(
                f"{what}: Datum holds {len(datum.data)} bytes but its shape {c}x{h}x{w} needs {n}"
            )
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data) != n:
        raise DatumError(
            f"{what}: Datum holds {len(datum.float_data)} float_data values but its shape "
            f"{c}x{h}x{w} needs {n}"
        )
    if n == 0:
        raise DatumError(f"{what}: empty Datum (shape {c}x{h}x{w}, no data)")
    return np.array(datum.float_data, dtype=np.float32).reshape(c, h, w)


def decode_record(value, what="<datum>", mode=images.UNCHANGED):
    """Serialized Datum -> (C x H x W array, label)."""
    datum = parse_datum(value, what)
    return datum_to_array(datum, what, mode), datum.label


# --- whole-batch fast path for raw uint8 records ---------------------------------------------


def _read_varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _data_field_span(value):
    """(start, end) of the `data` (field 4) payload in a serialized Datum, or None."""
    pos, span = 0, None
    try:
        while pos < len(value):
            tag, pos = _read_varint(value, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _read_varint(value, pos)
            elif wire == 2:
                n, pos = _read_varint(value, pos)
                if field == 4:
                    span = (pos, pos + n)
                pos += n
            elif wire == 5:
                pos += 4
            elif wire == 1:
                pos += 8
            else:
                return None
    except IndexError:
        return None
    return span


class _RawLayout:
    """Where the pixels and the label sit in a raw Datum of one shape and field layout."""

    __slots__ = ("length", "header", "start", "end", "shape", "fixed_cols", "template", "label")

    def __init__(self, first, start, end, shape, label_len):
        self.length = len(first)
        self.header = bytes(first[:start])
        self.start, self.end, self.shape = start, end, shape
        label_cols = np.arange(end + 1, end + 1 + label_len)
        self.label = label_cols
        cols = np.setdiff1d(np.r_[0:start, end : len(first)], label_cols)
        self.fixed_cols = cols
        self.template = np.frombuffer(first, dtype=np.uint8)[cols].copy()


_last_layout = [None]  # the layout of the previous batch (one reference: thread-safe to swap)


def _raw_layout(first):
    lay = _last_layout[0]
    if lay is not None and len(first) == lay.length and first.startswith(lay.header):
        return lay
    try:
        d0 = caffe_pb2.Datum.FromString(first)
    except message.DecodeError:
        return None
    c, h, w = d0.channels, d0.height, d0.width
    n = c * h * w
    if d0.encoded or n == 0 or len(d0.data) != n or len(d0.float_data):
        return None
    span = _data_field_span(first)
    if span is None or span[1] - span[0] != n:
        return None
    start, end = span
    tail = first[end:]
    if not tail:
        label_len = 0
    else:
        if tail[0] != 0x28:  # label (field 5, varint) must follow the pixels
            return None
        k = 1
        while k < len(tail) and tail[k] >= 0x80:
            k += 1
        if k >= len(tail):
            return None
        label_len = k
        # Only an explicit `encoded: false` may follow the label; anything else: slow path.
        if tail[k + 1 :] not in (b"", b"\x38\x00"):
            return None
    lay = _RawLayout(first, start, end, (c, h, w), label_len)
    _last_layout[0] = lay
    return lay


def decode_raw_batch(values):
    """Raw uint8 Datums of one layout -> (N x C x H x W uint8, labels int64), or None.

    The first record's layout (protobuf-parsed once and cached across batches) gives where
    pixels and label sit; a few vectorised compares check that every record has the same
    bytes around its pixels (shape, fields) and a label varint of the same length, then all
    pixels are sliced out at once. Returns None when the batch is not uniform: the caller
    then parses record by record, which also produces the precise error for a bad record.
    """
    first = values[0]
    lay = _raw_layout(first)
    if lay is None or len(set(map(len, values))) != 1:
        return None
    n = len(values)
    batch = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(n, lay.length)
    if not (batch[:, lay.fixed_cols] == lay.template).all():
        return None
    k = len(lay.label)
    if k == 0:
        labels = np.zeros(n, dtype=np.int64)
    elif k == 1:
        labels = batch[:, lay.end + 1].astype(np.int64)
        if (labels >= 0x80).any():
            return None
    else:
        lab = batch[:, lay.label]
        if (lab[:, :-1] < 0x80).any() or (lab[:, -1] >= 0x80).any():
            return None
        shifts = np.arange(k, dtype=np.uint64) * np.uint64(7)
        labels = ((lab.astype(np.uint64) & np.uint64(0x7F)) << shifts).sum(axis=1, dtype=np.uint64)
        # int32 labels are sign-extended to 64 bits on the wire: keep the low 32 bits, signed.
        labels = labels.view(np.int64).astype(np.int32).astype(np.int64)
    return batch[:, lay.start : lay.end].reshape((n,) + lay.shape), labels


# --- build ---------------------------------------------------------------------------------


def array_to_datum(arr, label=None):
    """C x H x W array -> Datum (uint8 to `data`, anything else to float_data), like Caffe."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"a Datum needs a C x H x W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    datum.encoded = False
    return datum


def image_to_datum(img, label):
    """An H x W x C uint8 image (cv::Mat order) -> raw Datum as Caffe's CVMatToDatum makes it."""
    return array_to_datum(images.hwc_to_chw(img), label)


def encoded_datum(data, label):
    """Encoded image bytes -> Datum(data, label, encoded=true), as Caffe's ReadFileToDatum."""
    datum = caffe_pb2.Datum()
    datum.data = bytes(data)
    datum.label = int(label)
    datum.encoded = True
    return datum


def features_datum(features, channels, height, width):
    """extract_features' Datum: float_data of one item, legacy channels/height/width."""
    datum = caffe_pb2.Datum()
    datum.height = int(height)
    datum.width = int(width)
    datum.channels = int(channels)
    datum.float_data.extend(np.asarray(features, dtype=np.float32).ravel().tolist())
    return datum
