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

    Encoded records are decoded with `mode` (see images.py); raw ones are checked against
    their declared channels x height x width.
    """
    if datum.encoded:
        if not datum.data:
            raise DatumError(f"{what}: encoded Datum has no image bytes")
        try:
            img = images.decode_image(datum.data, mode, what=what)
        except images.ImageDecodeError as e:
            raise DatumError(str(e)) from None
        return images.hwc_to_chw(img)
    c, h, w = datum.channels, datum.height, datum.width
    n = c * h * w
    if datum.data:
        if len(datum.data) != n:
            raise DatumError(
                f"{what}: Datum holds {len(datum.data)} bytes but its shape {c}x{h}x{w} "
                f"needs {n}"
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


def decode_raw_batch(values):
    """Raw uint8 Datums of one layout -> (N x C x H x W uint8, labels int64), or None.

    Parses the first record with protobuf, then checks with a few vectorised compares that
    every record has the same bytes around its pixels (same shape and fields) and a label
    varint of the same length; only then slices all pixels out at once. Returns None when the
    batch is not uniform (the caller falls back to parsing record by record, which also
    produces the precise error for a bad record).
    """
    first = values[0]
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
    length = len(first)
    if any(len(v) != length for v in values):
        return None
    batch = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), length)
    if not (batch[:, :start] == batch[0, :start]).all():
        return None
    tail = batch[:, end:]
    labels = _uniform_labels(first[end:], tail)
    if labels is None:
        return None
    return batch[:, start:end].reshape(len(values), c, h, w), labels


def _uniform_labels(first_tail, tail):
    """Labels from the bytes after the pixels when every record has the same field layout."""
    if len(first_tail) == 0:
        return np.zeros(tail.shape[0], dtype=np.int64)
    if first_tail[0] != 0x28:  # label, varint
        return None
    k = 1
    while k < len(first_tail) and first_tail[k] >= 0x80:
        k += 1
    if k >= len(first_tail):
        return None
    k += 1  # label bytes are tail[1:k]
    if (tail[:, 0] != 0x28).any():
        return None
    lab = tail[:, 1:k].astype(np.int64)
    if k > 2 and (lab[:, :-1] < 0x80).any():
        return None
    if (lab[:, -1] >= 0x80).any():
        return None
    rest = first_tail[k:]
    # Only an explicit `encoded: false` may follow the label; anything else: slow path.
    if rest and (rest != b"\x38\x00" or not (tail[:, k:] == tail[0, k:]).all()):
        return None
    shifts = np.arange(lab.shape[1], dtype=np.uint64) * np.uint64(7)
    labels = ((lab.astype(np.uint64) & np.uint64(0x7F)) << shifts).sum(axis=1, dtype=np.uint64)
    # int32 labels are sign-extended to 64 bits on the wire: keep the low 32 bits, signed.
    return labels.view(np.int64).astype(np.int32).astype(np.int64)


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
