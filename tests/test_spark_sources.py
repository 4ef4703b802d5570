"""Data sources without a cluster: choosing the source from the data layer, LMDB key ranges,
DataFrame rows -> Datums, Arrow spill files, ImageData rewriting, and the inference loop
(full batches + a partial last batch, one row per record)."""

import collections
import io
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from caffeonspark import Config, DataSource, SourceError, export
from caffeonspark.api import run_inference
from caffeonspark.config import TEST, TRAIN
from caffeonspark.sources import as_data_layer, open_spec, rewrite_net
from caffeonspark.sources.dataframe import (
    HWC,
    OPTIONAL_COLUMNS,
    ArrowRecordSource,
    DataFrameSource,
    RowConverter,
    looks_encoded,
    write_arrow,
)
from caffeonspark.sources.lmdb import LMDBLocalizer
from caffeonspark.sources.sequence import decode_key
from engine.data import LMDBWriter, array_to_datum
from engine.data.datum import datum_to_array, encoded_datum
from engine.net import Net
from engine.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]


def write_lmdb(path, n, offset=0):
    d = np.load(REPO / "data" / "digits.npz")
    images, labels = d["test_images"][offset : offset + n], d["test_labels"][offset : offset + n]
    with LMDBWriter(str(path)) as db:
        for i, (img, lab) in enumerate(zip(images, labels)):
            db.put(f"{i:08d}", array_to_datum(img[None], int(lab)).SerializeToString())
    return str(path), images, labels


@pytest.fixture
def lenet(tmp_path):
    """A LeNet solver over a 23-record LMDB (TEST batch 10: batches of 10, 10 and 3)."""
    lmdb, images, labels = write_lmdb(tmp_path / "lmdb", 23)
    net = caffe_pb2.NetParameter()
    text_format.Parse((REPO / "conf/lenet/lenet_train_test.prototxt").read_text(), net)
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.source = lmdb
            lp.data_param.batch_size = 10
    (tmp_path / "net.prototxt").write_text(text_format.MessageToString(net))
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" base_lr: 0.01 lr_policy: "fixed" random_seed: 3'
    )
    conf = Config(conf=str(tmp_path / "solver.prototxt"))
    weights = Net(conf.net_param(TEST), phase=TEST).to_proto()  # random filler weights
    return {"conf": conf, "lmdb": lmdb, "images": images, "labels": labels, "weights": weights}


def test_get_picks_lmdb_and_checks_it(lenet):
    source = DataSource.get(lenet["conf"], is_train=True)
    assert source.kind == "lmdb" and source.batch_size == 10 and source.count() == 23
    assert "layer 'mnist' (Data, TRAIN)" in source.name


def test_lmdb_shards_cover_every_record_once(lenet):
    source = DataSource.get(lenet["conf"], is_train=False)
    ranges = source._ranges(3)
    sizes = [n for _, n in ranges]
    assert sizes == [8, 8, 7] and sum(sizes) == 23
    seen = []
    for i in range(3):
        spec = LMDBLocalizer(source.uri, source.name, 3, ranges)(iter([i]), "/tmp", i, 3)
        src = open_spec(spec)
        keys = [k for k, _ in src.take(len(src))]
        assert src.take(1)[0][0] == keys[0]  # wraps to the start of its own range
        seen += keys
        src.close()
    assert [k.decode() for k in seen] == [f"{i:08d}" for i in range(23)]
    # Without driver-side ranges the task computes the same split.
    spec = LMDBLocalizer(source.uri, source.name, 3, None)(iter([2]), "/tmp", 2, 3)
    assert len(open_spec(spec)) == 7


def test_too_many_shards_is_a_clear_error(lenet):
    source = DataSource.get(lenet["conf"], is_train=False)
    with pytest.raises(SourceError, match="23 records cannot fill 30 shards"):
        source._ranges(30)


def test_missing_lmdb_and_non_lmdb_fail(tmp_path, lenet):
    sp = lenet["conf"].solver_param
    for lp in sp.net_param.layer:
        if lp.type == "Data":
            lp.data_param.source = str(tmp_path)  # a folder without data.mdb
    with pytest.raises(SourceError, match="is not an LMDB"):
        DataSource.get(lenet["conf"], is_train=True)


def test_table_source_needs_spark(tmp_path, lenet):
    for lp in lenet["conf"].solver_param.net_param.layer:
        if lp.type == "Data":
            lp.data_param.source = str(tmp_path / "x.parquet")
    with pytest.raises(SourceError, match="needs a SparkSession"):
        DataSource.get(lenet["conf"], is_train=True)


def test_imagedata_becomes_a_data_layer():
    lp = text_format.Parse(
        'name: "img" type: "ImageData" top: "data" top: "label" '
        'image_data_param { source: "l.txt" batch_size: 7 scale: 0.5 crop_size: 3 mirror: true } '
        "transform_param { scale: 0.25 }",
        caffe_pb2.LayerParameter(),
    )
    out = as_data_layer(lp)
    assert out.type == "Data" and out.data_param.batch_size == 7
    assert not out.HasField("image_data_param")
    assert out.transform_param.scale == 0.25  # transform_param wins over the legacy field
    assert out.transform_param.crop_size == 3 and out.transform_param.mirror


def test_rewrite_net_touches_only_the_phase_asked(lenet):
    net = lenet["conf"].solver_param.net_param
    out = rewrite_net(net, "mnist", TRAIN, batch_size=3, prefetch=0)
    train = [lp for lp in out.layer if lp.type == "Data" and lp.include[0].phase == TRAIN][0]
    test = [lp for lp in out.layer if lp.type == "Data" and lp.include[0].phase == TEST][0]
    assert train.data_param.batch_size == 3 and train.data_param.prefetch == 0
    assert test.data_param.batch_size == 10
    with pytest.raises(SourceError, match="no data layer 'nope'"):
        rewrite_net(net, "nope", TRAIN)


# --- DataFrame rows -> Datums, Arrow spill --------------------------------------------------


def png(img):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_row_converter_accepts_images_raw_pixels_and_datums():
    img = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    cols = ["data", "label", "SampleID", "channels", "height", "width"]
    conv = RowConverter(cols, "src", None)
    key, value = conv({"data": png(img), "label": 3, "SampleID": "a"}, 0)
    d = caffe_pb2.Datum.FromString(value)
    assert key == b"a" and d.encoded and d.label == 3
    _, value = conv({"data": img.tobytes(), "label": 1, "channels": 1, "height": 3, "width": 4}, 5)
    d = caffe_pb2.Datum.FromString(value)
    assert (d.channels, d.height, d.width, d.label) == (1, 3, 4, 1) and d.data == img.tobytes()
    datum = array_to_datum(img[None], 9).SerializeToString()
    key, value = conv({"data": datum, "label": 2}, 7)
    assert key == b"7" and caffe_pb2.Datum.FromString(value).label == 2
    with pytest.raises(SourceError, match="neither an encoded image nor a serialized Datum"):
        conv({"data": b"\x00" * 12, "label": 0}, 1)
    with pytest.raises(SourceError, match="12 bytes of data but .* 2x3x4 = 24"):
        conv({"data": img.tobytes(), "label": 0, "channels": 2, "height": 3, "width": 4}, 1)
    with pytest.raises(SourceError, match="row 4: label 1.5 is not an integer"):
        conv({"data": png(img), "label": 1.5}, 4)


def test_row_converter_resize():
    img = np.full((6, 8), 100, dtype=np.uint8)
    conv = RowConverter(["data", "label"], "src", (3, 4))
    _, value = conv({"data": png(img), "label": 1}, 0)
    d = caffe_pb2.Datum.FromString(value)
    assert not d.encoded and (d.channels, d.height, d.width) == (1, 3, 4)


class _Frame:
    """Enough of a DataFrame for DataFrameSource's set-up (its column types)."""

    dtypes = [("data", "binary"), ("label", "string")]

    def select(self, *columns):
        raise AssertionError("the resize target should not need the first row")


def test_resize_goes_to_a_caffeonspark_layers_height_and_width():
    layer = text_format.Parse(
        'name: "d" type: "Data" source_class: "com.yahoo.ml.caffe.ImageDataFrame" '
        "memory_data_param { batch_size: 2 channels: 3 height: 5 width: 7 }",
        caffe_pb2.LayerParameter(),
    )
    conf = type("Conf", (), {"resize": True})()
    source = DataFrameSource(conf, layer, TRAIN, _Frame())
    assert source._converter().resize_to == (5, 7)  # CaffeOnSpark's target, not the first image
    conf.resize = False
    assert source._converter().resize_to is None


def test_looks_encoded():
    assert looks_encoded(b"\x89PNG\r\n\x1a\n....") and looks_encoded(b"\xff\xd8\xff\xe0")
    assert not looks_encoded(b"\x08\x01\x10\x1c")


def test_arrow_spill_round_trip_and_wrap(tmp_path):
    records = [(f"k{i}".encode(), bytes([i % 256]) * 3) for i in range(1100)]
    path = str(tmp_path / "r.arrow")
    assert write_arrow(path, iter(records)) == 1100
    src = ArrowRecordSource(path, "spill")
    assert len(src) == 1100
    assert src.take(1100) == records
    assert src.take(2) == records[:2]  # wraps to the first record
    src.close()
    shuffled = str(tmp_path / "s.arrow")
    write_arrow(shuffled, iter(records), shuffle_seed=4)
    got = ArrowRecordSource(shuffled, "s").take(1100)
    assert sorted(got) == sorted(records) and got != records


# --- inference: every record once, partial last batch ---------------------------------------


def test_run_inference_features_cover_every_record(lenet):
    conf = lenet["conf"]
    layer = conf.data_layer(TEST)
    net = rewrite_net(conf.net_param(TEST), layer.name, TEST)
    spec = {"kind": "lmdb", "path": lenet["lmdb"], "name": "t", "shard": 0, "num": 1}
    rows = list(
        run_inference(
            net.SerializeToString(),
            layer.name,
            lenet["weights"].SerializeToString(),
            open_spec(spec),
            "features",
            ["ip2", "label"],
        )
    )
    assert [r[0] for r in rows] == [f"{i:08d}" for i in range(23)]
    assert [r[2] for r in rows] == [[float(x)] for x in lenet["labels"]]
    ref = Net(conf.net_param(TEST), phase=TEST)
    ref.copy_from(lenet["weights"])
    x = lenet["images"].astype(np.float32)[:, None] * np.float32(0.00390625)
    ref.blobs["data"].reshape(x.shape)
    ref.blobs["data"].data[...] = x
    ref.forward_from_to(ref.layer_index("conv1"), ref.layer_index("ip2"))
    np.testing.assert_allclose([r[1] for r in rows], ref.blobs["ip2"].data, rtol=1e-5, atol=1e-5)


def test_features_of_sequence_major_blobs_are_one_row_per_record(tmp_path):
    """-features on an LSTM-style net: T x N blobs (a transposed CoSData top, and Embed's
    output from it) give record i's values in time order, and -test sums them per record;
    when T equals the batch, which axis holds the records is ambiguous, and -features says
    so instead of guessing."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_cos_data import cos_net

    from caffeonspark.api import _accumulate, _feature_rows

    T = 4
    words = [[1 + (i + t) % 8 for t in range(T)] for i in range(6)]
    pq.write_table(pa.table({"input": words}), tmp_path / "s.parquet")
    tops = f'top {{ name: "input" type: INT_ARRAY channels: {T} sample_num_axes: 1 ' + (
        "transpose: true }"
    )
    embed = """layer { name: "embed" type: "Embed" bottom: "input" top: "emb"
        embed_param { input_dim: 10 num_output: 3 bias_term: false
          weight_filler { type: "uniform" min: -1 max: 1 } } }"""
    net = Net(cos_net(tmp_path / "s.parquet", tops, ["input"], 3, embed), phase=TEST)
    net.forward()
    rows = list(_feature_rows(net, [b"a", b"b", b"c"], ["input", "emb"]))
    assert [r[0] for r in rows] == ["a", "b", "c"]
    for i, (_, seq, emb) in enumerate(rows):
        assert seq == [float(w) for w in words[i]]
        np.testing.assert_array_equal(np.reshape(emb, (T, 3)), net.blobs["emb"].data[:, i])
    # -test sums such an output per record too (record-wise means over the dataset)
    sums, counts, order = {}, collections.Counter(), []
    _accumulate(net, 3, sums, counts, order)
    emb = net.blobs["emb"].data.astype(np.float64)  # as _accumulate sums
    np.testing.assert_allclose(sums["emb"], emb.swapaxes(0, 1).reshape(3, -1).sum(axis=0))
    net = Net(cos_net(tmp_path / "s.parquet", tops, ["input"], T, embed), phase=TEST)
    net.forward()
    with pytest.raises(SourceError, match=r"'emb' has shape \(4, 4, 3\): its first axis could"):
        list(_feature_rows(net, [b"a", b"b", b"c", b"d"], ["emb"]))


def test_run_inference_test_means_weight_batches_by_size(lenet):
    conf = lenet["conf"]
    layer = conf.data_layer(TEST)
    net = rewrite_net(conf.net_param(TEST), layer.name, TEST)
    spec = {"kind": "lmdb", "path": lenet["lmdb"], "name": "t", "shard": 0, "num": 1}
    out = {
        name: (np.asarray(s), n)
        for name, s, n in run_inference(
            net.SerializeToString(),
            layer.name,
            lenet["weights"].SerializeToString(),
            open_spec(spec),
            "test",
            (),
        )
    }
    assert out["accuracy"][1] == 23
    full = rewrite_net(conf.net_param(TEST), layer.name, TEST, batch_size=23)
    ref = Net(full, phase=TEST)
    ref.copy_from(lenet["weights"])
    ref.forward()
    assert out["accuracy"][0][0] / 23 == pytest.approx(float(ref.blobs["accuracy"].data), abs=1e-6)
    assert out["loss"][0][0] / 23 == pytest.approx(float(ref.blobs["loss"].data), rel=1e-5)


def test_lmdb_missing_on_the_executor_names_the_fix(tmp_path):
    from caffeonspark.sources.lmdb import locate_lmdb

    with pytest.raises(SourceError, match="not on this executor.*sc.addFile"):
        locate_lmdb(str(tmp_path / "elsewhere_lmdb"), str(tmp_path), "layer 'd'")


@pytest.fixture
def spark_files(tmp_path, monkeypatch):
    """A SparkFiles folder (as Spark leaves it after --archives) seen without a SparkContext;
    relative, as an executor's is (its working directory)."""
    from pyspark import SparkFiles

    root = tmp_path / "userFiles"
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SparkFiles, "getRootDirectory", staticmethod(lambda: "userFiles"))
    return root


def test_lmdb_shipped_with_the_job_is_found_by_its_folder_name(tmp_path, spark_files):
    from caffeonspark.sources.lmdb import locate_lmdb

    flat, _, _ = write_lmdb(spark_files / "train_lmdb", 3)  # --archives flat.tgz#train_lmdb
    (spark_files / "val_lmdb.tgz").mkdir()  # --archives val_lmdb.tgz holding one folder
    nested, _, _ = write_lmdb(spark_files / "val_lmdb.tgz" / "val_lmdb", 4)
    (spark_files / "two_lmdb").mkdir()  # an archive holding two LMDBs: which one is meant?
    write_lmdb(spark_files / "two_lmdb" / "a", 2)
    write_lmdb(spark_files / "two_lmdb" / "b", 2)
    work = str(tmp_path)
    assert locate_lmdb("/nowhere/train_lmdb", work, "d") == flat
    assert locate_lmdb("file:///nowhere/val_lmdb/", work, "d") == nested
    present, _, _ = write_lmdb(tmp_path / "present_lmdb", 2)
    assert locate_lmdb(present, work, "d") == present  # a path that exists wins
    for missing in ("/nowhere/two_lmdb", "/nowhere/other_lmdb"):
        with pytest.raises(SourceError, match=r"not on this executor.*--archives"):
            locate_lmdb(missing, work, "d")


def test_driver_reads_a_shipped_lmdb_for_counts_and_key_ranges(lenet, spark_files):
    write_lmdb(spark_files / "digits_lmdb.tgz", 23)
    for lp in lenet["conf"].solver_param.net_param.layer:
        if lp.type == "Data":
            lp.data_param.source = "digits_lmdb"  # relative: not in the driver's folder
    source = DataSource.get(lenet["conf"], is_train=True)
    assert source.readable_here and source.count() == 23
    assert [n for _, n in source._ranges(2)] == [12, 11]
    for lp in lenet["conf"].solver_param.net_param.layer:
        if lp.type == "Data":
            lp.data_param.source = "absent_lmdb"
    with pytest.raises(SourceError, match=r"absent_lmdb not found .*absent_lmdb\.tgz"):
        DataSource.get(lenet["conf"], is_train=True)


def mixed_records():
    """(key, serialized Datum) of every kind an LMDB holds: raw pixels, an encoded image,
    float_data, and a key that is not UTF-8."""
    img = (np.arange(12, dtype=np.uint8) * 20).reshape(1, 3, 4)
    floats = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    return [
        (b"raw", array_to_datum(img, 4)),
        (b"png", encoded_datum(png(img[0]), 7)),
        (b"float", array_to_datum(floats, 2)),
        (b"\xff\x01", array_to_datum(img * 2, 0)),
    ]


def test_export_rows_read_back_as_the_same_records():
    # LMDB2DataFrame's rows, read by the DataFrame source, give back every record unchanged.
    conv = RowConverter(list(OPTIONAL_COLUMNS) + ["data", "label"], "table", None)
    columns = ["SampleID", "label", "channels", "height", "width", "encoded", "data"]
    for key, datum in mixed_records():
        row = dict(zip(columns, export.datum_row(key, datum.SerializeToString(), "r")))
        got_key, value = conv(row, 0)
        got = caffe_pb2.Datum.FromString(value)
        assert got_key == (key.hex().encode() if key == b"\xff\x01" else key)
        assert got.label == datum.label and got.encoded == datum.encoded
        np.testing.assert_array_equal(datum_to_array(got), datum_to_array(datum))
    assert export.datum_row(
        b"k", array_to_datum(np.zeros((1, 2, 2), np.uint8), 1).SerializeToString(), "r"
    )[2:5] == (1, 2, 2)


def test_sequence_records_read_back_as_the_same_records():
    # LMDB2Sequence's pairs (Tuple6 key, pixels in HWC), read by the sequence source, give back
    # every record; Binary2Sequence's (Tuple2 key, the file's bytes) likewise.
    conv = RowConverter(list(OPTIONAL_COLUMNS) + ["data", "label"], "seq", None, pixel_order=HWC)
    colour = array_to_datum(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 5)
    records = [r for r in mixed_records() if r[0] != b"float"] + [(b"colour", colour)]
    for key, datum in records:
        row = export.datum_row(key, datum.SerializeToString(), "r")
        k, v = export.sequence_pair(row)
        header = decode_key(bytes(k), "r")
        got_key, value = conv({**header, "data": bytes(v)}, 0)
        got = caffe_pb2.Datum.FromString(value)
        assert got_key.decode() == row[0] and header["label"] == str(datum.label)
        np.testing.assert_array_equal(datum_to_array(got), datum_to_array(datum))
    # raw pixels go in OpenCV's order, as CaffeOnSpark's LmdbRDD wrote them
    _, v = export.sequence_pair(export.datum_row(b"c", colour.SerializeToString(), "r"))
    assert bytes(v) == np.arange(24, dtype=np.uint8).reshape(2, 3, 4).transpose(1, 2, 0).tobytes()
    k, v = export.sequence_pair(("id7", 3, b"\x89PNG..."))
    assert decode_key(bytes(k), "r")["SampleID"] == "id7" and bytes(v) == b"\x89PNG..."
    floats = dict(mixed_records())[b"float"].SerializeToString()
    with pytest.raises(SourceError, match="record 'float': a Datum of float_data; a sequence"):
        export.sequence_pair(export.datum_row(b"float", floats, "r"))


def test_export_refuses_what_no_data_layer_reads():
    empty = caffe_pb2.Datum(channels=1, height=2, width=2, label=0).SerializeToString()
    with pytest.raises(SourceError, match="r: a Datum of shape 1x2x2 with 0 data bytes"):
        export.datum_row(b"k", empty, "r")
    with pytest.raises(SourceError, match="r: not a valid Datum"):
        export.datum_row(b"k", b"\xff\xff\xff", "r")
    with pytest.raises(ValueError, match="base64 text"):
        export.write_frame(None, "out", "json", 0)
