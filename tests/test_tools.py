"""Caffe's data tools (engine/tools): convert_imageset, compute_image_mean, convert_mnist_data,
convert_cifar_data, extract_features - parity with the LMDBs and mean made by real Caffe, round
trips through our Data layer, flags and bad input."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import golden
import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import io
from engine.data import datum, lmdb_io
from engine.data.sources import DataSourceError
from engine.layer import registered_types
from engine.proto import caffe_pb2
from engine.tools import (
    FlagParser,
    compute_image_mean,
    convert_cifar_data,
    convert_imageset,
    convert_mnist_data,
    extract_features,
)

GDATA = golden.GOLDEN / "data"
ROOT = Path(__file__).resolve().parents[1]
needs_golden = pytest.mark.skipif(not GDATA.is_dir(), reason="no golden data suite")
LOG = logging.getLogger("test_tools")

CONVERT_FLAGS = {
    "lmdb_color32": ["--resize_height=32", "--resize_width=32"],
    "lmdb_gray32": ["--resize_height=32", "--resize_width=32", "--gray"],
    "lmdb_png32": [
        "-resize_height",
        "32",
        "--resize_width",
        "32",
        "--encoded",
        "--encode_type=png",
    ],
    "lmdb_encoded_orig": ["--encoded"],
}


def run_tool(name, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", f"engine.tools.{name}", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def convert(args, db):
    opts, pos = convert_imageset.flags().parse([*args, f"{GDATA}/images/", str(GDATA / "list.txt")])
    return convert_imageset.convert(pos[0], pos[1], str(db), opts, LOG)


# --- flags -------------------------------------------------------------------------------------


def test_gflags_style_parsing():
    p = FlagParser("t", "t [FLAGS] A")
    p.boolean("gray", False, "")
    p.boolean("shuffle", True, "")
    p.integer("resize_height", 0, "")
    p.string("backend", "lmdb", "")
    opts, pos = p.parse(["--gray", "-resize_height", "7", "--noshuffle", "--backend=x", "a", "b"])
    assert (opts.gray, opts.shuffle, opts.resize_height, opts.backend) == (True, False, 7, "x")
    assert pos == ["a", "b"]
    opts, _ = p.parse(["--gray=false", "--resize_height=3"])
    assert opts.gray is False and opts.resize_height == 3
    with pytest.raises(SystemExit):
        p.parse(["--unknown=1"])
    with pytest.raises(SystemExit):
        p.parse(["--resize_height=x"])


# --- convert_imageset --------------------------------------------------------------------------


@needs_golden
def test_convert_imageset_cli_matches_caffe_color32(tmp_path):
    out = run_tool(
        "convert_imageset",
        *CONVERT_FLAGS["lmdb_color32"],
        f"{GDATA}/images/",
        GDATA / "list.txt",
        tmp_path / "db",
    )
    assert out.returncode == 0, out.stderr
    assert "Processed 20 files." in out.stderr
    ours, caffe = lmdb_io.read_all(tmp_path / "db"), lmdb_io.read_all(GDATA / "lmdb_color32")
    assert ours == caffe  # same keys, byte-identical Datums


@needs_golden
@pytest.mark.parametrize("name", ["lmdb_gray32", "lmdb_encoded_orig", "lmdb_png32"])
def test_convert_imageset_matches_caffe(tmp_path, name):
    assert convert(CONVERT_FLAGS[name], tmp_path / "db") == (20, 0)
    ours, caffe = lmdb_io.read_all(tmp_path / "db"), lmdb_io.read_all(GDATA / name)
    assert [k for k, _ in ours] == [k for k, _ in caffe]
    if name != "lmdb_png32":
        assert ours == caffe
        return
    # PNG bytes depend on the encoder; the pixels and the rest of the Datum must not.
    expected = np.load(GDATA / f"expected_{name}.npz")
    for i, ((_, v), (_, cv)) in enumerate(zip(ours, caffe)):
        arr, label = datum.decode_record(v)
        assert np.array_equal(arr, expected[f"record{i:02d}"])
        assert label == datum.parse_datum(cv).label and datum.parse_datum(v).encoded


@needs_golden
def test_convert_imageset_round_trip_through_data_layer(tmp_path):
    convert(["--resize_height=20", "--resize_width=24"], tmp_path / "db")
    text = (
        f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
        f'data_param {{ source: "{tmp_path / "db"}" batch_size: 20 backend: LMDB }} }}'
    )
    net = engine.Net(text_format.Parse(text, caffe_pb2.NetParameter()), engine.TEST)
    out = net.forward()
    net.layers[0].close()
    lines = (GDATA / "list.txt").read_text().split()
    for i in range(20):
        img = engine.data.images.read_image_resized(str(GDATA / "images" / lines[2 * i]), 20, 24)
        assert np.array_equal(out["data"][i], img.transpose(2, 0, 1))
        assert out["label"][i] == int(lines[2 * i + 1])


def test_convert_imageset_shuffle_check_size_and_bad_images(tmp_path, caplog):
    from PIL import Image

    rs = np.random.RandomState(0)
    for i in range(4):
        Image.fromarray(rs.randint(0, 256, (5 + i, 6, 3)).astype(np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "list.txt").write_text("0.png 0\n1.png 1\nbroken.png 9\n2.png 2\n3.png 3\n")

    def run(*flags, db):
        opts, _ = convert_imageset.flags().parse(list(flags))
        return convert_imageset.convert(
            f"{tmp_path}/", str(tmp_path / "list.txt"), str(db), opts, LOG
        )

    with pytest.raises(DataSourceError, match=r"list.txt line 3: .*broken.png: cannot decode"):
        run(db=tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        assert run("--skip_bad", db=tmp_path / "b") == (4, 1)
    assert any(
        "broken.png" in r.getMessage() and "1 skipped" in r.getMessage() for r in caplog.records
    )
    keys = [k for k, _ in lmdb_io.read_all(tmp_path / "b")]
    assert keys == [b"00000000_0.png", b"00000001_1.png", b"00000003_2.png", b"00000004_3.png"]
    with pytest.raises(DataSourceError, match="incorrect data field size"):
        run("--skip_bad", "--check_size", db=tmp_path / "c")
    assert run("--skip_bad", "--shuffle", "--seed=3", db=tmp_path / "d") == (4, 1)
    labels = [datum.parse_datum(v).label for _, v in lmdb_io.read_all(tmp_path / "d")]
    assert sorted(labels) == [0, 1, 2, 3]
    with pytest.raises(DataSourceError, match="leveldb.*not supported"):
        run("--backend=leveldb", db=tmp_path / "e")
    with pytest.raises(DataSourceError, match="already exists"):
        run("--skip_bad", db=tmp_path / "b")


# --- compute_image_mean ------------------------------------------------------------------------


@needs_golden
def test_compute_image_mean_matches_caffe(tmp_path):
    out = run_tool("compute_image_mean", GDATA / "lmdb_color32", tmp_path / "mean.binaryproto")
    assert out.returncode == 0, out.stderr
    assert "Processed 20 files." in out.stderr and "mean_value channel [2]" in out.stderr
    expected = np.load(GDATA / "expected_mean.npz")["mean"]
    ours = io.blobproto_to_array(
        io.read_binary(tmp_path / "mean.binaryproto", caffe_pb2.BlobProto())
    )
    assert np.array_equal(ours, expected)
    assert (tmp_path / "mean.binaryproto").read_bytes() == (GDATA / "mean.binaryproto").read_bytes()


@needs_golden
def test_compute_image_mean_of_our_lmdb_equals_caffes_mean(tmp_path):
    convert(CONVERT_FLAGS["lmdb_color32"], tmp_path / "db")
    mean, count, skipped = compute_image_mean.compute_mean(str(tmp_path / "db"), LOG)
    assert (count, skipped) == (20, 0)
    assert np.array_equal(mean, np.load(GDATA / "expected_mean.npz")["mean"])
    # Encoded records are decoded first (same pixels, same mean).
    convert(CONVERT_FLAGS["lmdb_png32"], tmp_path / "png")
    mean_png, _, _ = compute_image_mean.compute_mean(str(tmp_path / "png"), LOG)
    assert np.array_equal(mean_png, mean)


def test_compute_image_mean_bad_records(tmp_path, caplog):
    ok = datum.array_to_datum(np.full((1, 2, 2), 4, np.uint8), 0).SerializeToString()
    other = datum.array_to_datum(np.full((1, 3, 2), 8, np.uint8), 0).SerializeToString()
    with lmdb_io.LMDBWriter(tmp_path / "db") as w:
        w.put("a", ok)
        w.put("b", other)
        w.put("c", ok)
    with pytest.raises(datum.DatumError, match=r"key 'b': incorrect data field size 6"):
        compute_image_mean.compute_mean(str(tmp_path / "db"), LOG)
    with caplog.at_level(logging.WARNING):
        mean, count, skipped = compute_image_mean.compute_mean(str(tmp_path / "db"), LOG, True)
    assert (count, skipped) == (2, 1) and (mean == 4).all()
    assert any("1 skipped so far" in r.getMessage() for r in caplog.records)
    out = run_tool("compute_image_mean", tmp_path / "missing")
    assert out.returncode == 1 and "missing: LMDB not found" in out.stderr


# --- convert_mnist_data / convert_cifar_data ---------------------------------------------------


def write_idx(tmp_path, imgs, labels):
    n, rows, cols = imgs.shape
    header = np.array([2051, n, rows, cols], ">u4").tobytes()
    (tmp_path / "images-idx3-ubyte").write_bytes(header + imgs.tobytes())
    (tmp_path / "labels-idx1-ubyte").write_bytes(
        np.array([2049, n], ">u4").tobytes() + labels.tobytes()
    )


@needs_golden
def test_convert_mnist_data_matches_caffe(tmp_path):
    caffe = lmdb_io.read_all(GDATA / "extract_features" / "digits20_lmdb")
    decoded = [datum.decode_record(v) for _, v in caffe]
    imgs = np.stack([a[0] for a, _ in decoded])
    labels = np.array([lab for _, lab in decoded], np.uint8)
    write_idx(tmp_path, imgs, labels)
    out = run_tool(
        "convert_mnist_data",
        tmp_path / "images-idx3-ubyte",
        tmp_path / "labels-idx1-ubyte",
        tmp_path / "db",
        "--backend=lmdb",
    )
    assert out.returncode == 0, out.stderr
    assert "Processed 20 files." in out.stderr
    assert lmdb_io.read_all(tmp_path / "db") == caffe


def test_convert_mnist_data_rejects_bad_magic(tmp_path):
    write_idx(tmp_path, np.zeros((2, 3, 3), np.uint8), np.zeros(2, np.uint8))
    (tmp_path / "labels-idx1-ubyte").write_bytes(np.array([2051, 2], ">u4").tobytes() + b"\0\0")
    with pytest.raises(DataSourceError, match="incorrect label file magic"):
        convert_mnist_data.convert(
            tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte", tmp_path / "db", LOG
        )


def test_convert_cifar_data(tmp_path):
    rs = np.random.RandomState(0)
    src = tmp_path / "cifar"
    src.mkdir()
    content = {}
    for name, n in [*((f"data_batch_{b}.bin", 3) for b in range(1, 6)), ("test_batch.bin", 4)]:
        rec = rs.randint(0, 256, (n, 3073)).astype(np.uint8)
        rec[:, 0] %= 10
        (src / name).write_bytes(rec.tobytes())
        content[name] = rec
    out = run_tool("convert_cifar_data", src, tmp_path / "out", "lmdb")
    assert out.returncode == 0, out.stderr
    train = lmdb_io.read_all(tmp_path / "out" / "cifar10_train_lmdb")
    test = lmdb_io.read_all(tmp_path / "out" / "cifar10_test_lmdb")
    assert len(train) == 15 and len(test) == 4
    assert [k for k, _ in train[:4]] == [b"00000", b"00001", b"00002", b"10000"]
    arr, label = datum.decode_record(train[3][1])
    rec = content["data_batch_2.bin"][0]
    assert label == rec[0] and np.array_equal(arr, rec[1:].reshape(3, 32, 32))
    (src / "test_batch.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataSourceError, match="not a whole number"):
        convert_cifar_data.convert(str(src), str(tmp_path / "out2"), "lmdb", LOG)


# --- extract_features --------------------------------------------------------------------------

LENET_TYPES = {
    "Data",
    "Convolution",
    "Pooling",
    "InnerProduct",
    "ReLU",
    "Accuracy",
    "SoftmaxWithLoss",
}


@needs_golden
@pytest.mark.skipif(
    not LENET_TYPES <= set(registered_types()),
    reason=f"layers not written yet: {sorted(LENET_TYPES - set(registered_types()))}",
)
def test_extract_features_matches_caffe(tmp_path):
    case = GDATA / "extract_features"
    expected = np.load(case / "expected.npz")
    with golden.chdir(case):
        counts = extract_features.extract(
            str(golden.GOLDEN / "nets" / "lenet" / "weights.caffemodel"),
            "lenet_test.prototxt",
            ["ip1", "ip2"],
            [str(tmp_path / "ip1_db"), str(tmp_path / "ip2_db")],
            2,
            "lmdb",
            LOG,
        )
    assert counts == {"ip1": 20, "ip2": 20}
    for blob in ("ip1", "ip2"):
        ours = lmdb_io.read_all(tmp_path / f"{blob}_db")
        caffe = lmdb_io.read_all(case / f"{blob}_features_lmdb")
        assert [k for k, _ in ours] == [k for k, _ in caffe]
        assert [k.decode() for k, _ in ours] == list(expected[f"keys_{blob}"])
        feats = []
        for (_, v), (_, cv) in zip(ours, caffe):
            d = datum.parse_datum(v)
            c = datum.parse_datum(cv)
            # Same Datum layout as Caffe's tool (only the float values may differ slightly).
            rebuilt = datum.features_datum(c.float_data, c.channels, c.height, c.width)
            assert rebuilt.SerializeToString() == cv
            assert [d.channels, d.height, d.width] == list(expected[f"datum_shape_{blob}"])
            feats.append(np.array(d.float_data, np.float32))
        golden.assert_close(np.stack(feats), expected[blob], 1e-4, 1e-5, blob)
