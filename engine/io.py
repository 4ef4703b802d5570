"""Caffe's files: prototxt (text), .caffemodel / .solverstate / .binaryproto (binary),
plus pycaffe's `caffe.io` array helpers. Errors name the file and the line or what failed."""

import os
import tempfile

import numpy as np
from google.protobuf import message, text_format

from engine.preprocess import Transformer, load_image, oversample, resize_image  # noqa: F401
from engine.proto import caffe_pb2


class CaffeFileError(ValueError):
    """A Caffe file that cannot be read or written, with the file named."""


# --- reading and writing messages ---------------------------------------------------------


def read_prototxt(path, msg=None):
    """Parse a text-format file into `msg` (a NetParameter by default)."""
    msg = caffe_pb2.NetParameter() if msg is None else msg
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CaffeFileError(f"{path}: cannot read: {e.strerror}") from None
    return parse_prototxt(text, msg, source=path)


def parse_prototxt(text, msg, source="<string>"):
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = getattr(e, "GetLine", lambda: None)(), getattr(e, "GetColumn", lambda: None)()
        where = f"{source}:{line}:{col}" if line else source
        detail = str(e)
        if line and detail.startswith(f"{line}:"):
            detail = detail.split(" : ", 1)[-1]
        raise CaffeFileError(
            f"{where}: not a valid {msg.DESCRIPTOR.name} prototxt: {detail}"
        ) from None
    return msg


def read_binary(path, msg):
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CaffeFileError(f"{path}: cannot read: {e.strerror}") from None
    try:
        msg.ParseFromString(data)
    except message.DecodeError as e:
        raise CaffeFileError(
            f"{path}: not a valid binary {msg.DESCRIPTOR.name} ({len(data)} bytes): {e}"
        ) from None
    return msg


def read_net_param(path):
    """A NetParameter from a .prototxt (text) or .caffemodel (binary), by trying both."""
    path = os.fspath(path)
    if path.endswith((".prototxt", ".pbtxt", ".txt")):
        return read_prototxt(path, caffe_pb2.NetParameter())
    return read_binary(path, caffe_pb2.NetParameter())


def atomic_write_bytes(path, data):
    """Write to a temp file beside `path`, then rename: a reader never sees half a file."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_binary(path, msg):
    atomic_write_bytes(path, msg.SerializeToString())


def write_prototxt(path, msg):
    atomic_write_bytes(path, text_format.MessageToString(msg).encode("utf-8"))


# --- blobs ------------------------------------------------------------------------------------


def blobproto_shape(proto):
    """Shape of a BlobProto: `shape` if set, else the legacy num/channels/height/width."""
    if proto.HasField("shape"):
        return tuple(int(d) for d in proto.shape.dim)
    if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        return (proto.num, proto.channels, proto.height, proto.width)
    return ()  # Caffe: no shape and no legacy dims is a 0-d (scalar) blob


def blobproto_to_array(blob, return_diff=False):
    """pycaffe's caffe.io.blobproto_to_array: the data (or diff) as a float32 array."""
    shape = blobproto_shape(blob)
    if return_diff:
        values = blob.double_diff if len(blob.double_diff) else blob.diff
    else:
        values = blob.double_data if len(blob.double_data) else blob.data
    arr = np.asarray(values, dtype=np.float32)
    expected = int(np.prod(shape)) if shape else 1
    if arr.size != expected:
        raise CaffeFileError(
            f"BlobProto holds {arr.size} values but its shape {shape} needs {expected}"
        )
    return arr.reshape(shape)


def array_to_blobproto(arr, diff=None):
    """pycaffe's caffe.io.array_to_blobproto (N-d `shape`, float data)."""
    blob = caffe_pb2.BlobProto()
    arr = np.asarray(arr)
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(a) for a in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(s):
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(s)
    return [blobproto_to_array(b) for b in vec.blobs]


def read_mean_file(path):
    """A mean .binaryproto as a float32 array (C x H x W, the leading 1 dropped)."""
    arr = blobproto_to_array(read_binary(path, caffe_pb2.BlobProto()))
    return arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr


def datum_to_array(datum):
    """pycaffe's caffe.io.datum_to_array for raw (not encoded) Datums: C x H x W."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def array_to_datum(arr, label=None):
    """pycaffe's caffe.io.array_to_datum: uint8 arrays go to `data`, others to float_data."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"array_to_datum needs a 3-axis C x H x W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum
