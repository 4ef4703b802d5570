"""Caffe file I/O: BlobProto shapes (N-d, legacy, 0-d), pycaffe io helpers, atomic writes."""

import os
import stat

import numpy as np
import pytest

from engine import io
from engine.proto import caffe_pb2


def test_blobproto_shapes():
    assert io.blobproto_shape(caffe_pb2.BlobProto(data=[1.0])) == ()  # Caffe's 0-d blob
    legacy = caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2, data=[0.0] * 12)
    assert io.blobproto_to_array(legacy).shape == (1, 3, 2, 2)
    nd = io.array_to_blobproto(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(io.blobproto_to_array(nd), np.arange(6).reshape(2, 3))
    dbl = caffe_pb2.BlobProto(double_data=[1.5, 2.5])
    dbl.shape.dim.append(2)
    np.testing.assert_array_equal(io.blobproto_to_array(dbl), [1.5, 2.5])


def test_blobproto_size_mismatch_is_an_error():
    bad = caffe_pb2.BlobProto(data=[1.0, 2.0])
    bad.shape.dim.extend([3])
    with pytest.raises(io.CaffeFileError, match="holds 2 values but its shape"):
        io.blobproto_to_array(bad)


def test_datum_helpers_round_trip():
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    d = io.array_to_datum(u8, label=7)
    assert d.label == 7 and d.data == u8.tobytes()
    np.testing.assert_array_equal(io.datum_to_array(d), u8)
    f = np.linspace(0, 1, 6, dtype=np.float32).reshape(1, 2, 3)
    np.testing.assert_allclose(io.datum_to_array(io.array_to_datum(f)), f)
    with pytest.raises(ValueError, match="3-axis"):
        io.array_to_datum(np.zeros((2, 2)))


def test_blobprotovector_round_trip():
    arrays = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]
    back = io.blobprotovector_str_to_arraylist(io.arraylist_to_blobprotovector_str(arrays))
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model.caffemodel"
    io.atomic_write_bytes(path, b"old")

    class Boom(Exception):
        pass

    def fail_replace(src, dst):
        raise Boom()

    monkeypatch.setattr(io.os, "replace", fail_replace)
    with pytest.raises(Boom):
        io.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.caffemodel"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write_bytes(tmp_path / "snap.caffemodel", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "snap.caffemodel").stat().st_mode) == 0o644


def test_mean_file_reads_golden(tmp_path):
    arr = np.random.RandomState(0).rand(1, 3, 4, 5).astype(np.float32)
    p = tmp_path / "mean.binaryproto"
    io.write_binary(p, io.array_to_blobproto(arr))
    np.testing.assert_array_equal(io.read_mean_file(p), arr[0])
