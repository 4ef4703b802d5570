"""CaffeOnSpark's own prototxts (MemoryData layers with source_class and memory_data_param's
source) load as Data layers and pick their source; what cannot run is refused by name. The
DataFrame side (CaffeOnSpark's table layout) runs on Spark in test_spark_cluster."""

import numpy as np
import pytest
from google.protobuf import text_format
from test_spark_sources import write_lmdb

from caffeonspark import Config, ConfigError, DataSource, SourceError
from caffeonspark.config import TEST, TRAIN
from caffeonspark.sources.dataframe import RowConverter
from engine.data.datum import datum_to_array
from engine.proto import caffe_pb2

LAYERS = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def cos_layer(phase, body, source_class=None, extra=""):
    cls = f'source_class: "{source_class}"' if source_class else ""
    return f"""layer {{ name: "data" type: "MemoryData" top: "data" top: "label"
  include {{ phase: {phase} }} {cls} {extra}
  memory_data_param {{ {body} }} transform_param {{ scale: 0.00390625 }} }}"""


def solver(tmp_path, train, test):
    (tmp_path / "net.prototxt").write_text(f'name: "LeNet"\n{train}\n{test}\n{LAYERS}')
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path}/net.prototxt" base_lr: 0.01 lr_policy: "fixed"')
    return str(path)


def load(path):
    """The solver Config loads from `path` (it loads lazily)."""
    return Config(conf=path).solver_param


@pytest.fixture
def lmdb(tmp_path):
    return write_lmdb(tmp_path / "digits_lmdb", 23)[0]


def test_lmdb_source_class_becomes_a_data_layer(tmp_path, lmdb):
    train = cos_layer(
        "TRAIN",
        f'source: "file://{lmdb}" batch_size: 8 channels: 1 height: 28 width: 28 '
        "share_in_parallel: false",
        "com.yahoo.ml.caffe.LMDB",
    )
    # No source_class: an LMDB, as in CaffeOnSpark.
    test = cos_layer("TEST", f'source: "{lmdb}/" batch_size: 5 channels: 1 height: 28 width: 28')
    conf = Config(conf=solver(tmp_path, train, test))
    layer = conf.data_layer(TRAIN)
    assert layer.type == "Data" and layer.data_param.batch_size == 8
    assert layer.data_param.source == f"file://{lmdb}"
    assert layer.transform_param.scale == pytest.approx(0.00390625)
    for is_train, batch in ((True, 8), (False, 5)):
        source = DataSource.get(conf, is_train=is_train)
        assert source.kind == "lmdb" and source.batch_size == batch and source.count() == 23


def test_image_data_frame_is_read_as_a_table_whatever_its_path(tmp_path, lmdb):
    """A folder without a .parquet suffix is still a table when source_class says so."""
    table = tmp_path / "mnist_test_dataframe"
    table.mkdir()
    test = cos_layer(
        "TEST",
        f'source: "{table}" batch_size: 5 channels: 1 height: 28 width: 28 '
        'dataframe_format: "json"',
        "com.yahoo.ml.caffe.ImageDataFrame",
    )
    conf = Config(
        conf=solver(tmp_path, cos_layer("TRAIN", f'source: "{lmdb}" batch_size: 4'), test)
    )
    layer = conf.data_layer(TEST)
    assert layer.source_class == "com.yahoo.ml.caffe.ImageDataFrame"
    assert layer.memory_data_param.dataframe_format == "json"
    with pytest.raises(SourceError, match="reading a table needs a SparkSession"):
        DataSource.get(conf, is_train=False)


def test_encoded_images_decode_as_the_declared_channels(tmp_path, lmdb):
    test = cos_layer(
        "TEST",
        f'source: "{tmp_path}" batch_size: 5 channels: 3 height: 32 width: 32',
        "ImageDataFrame",
        "image_encoded: true",
    )
    conf = Config(
        conf=solver(tmp_path, cos_layer("TRAIN", f'source: "{lmdb}" batch_size: 4'), test)
    )
    tp = conf.data_layer(TEST).transform_param
    assert tp.force_color and not tp.force_gray


def test_pycaffe_memory_data_layer_is_left_alone(tmp_path):
    net = caffe_pb2.NetParameter()
    net.layer.add(name="data", type="MemoryData").memory_data_param.batch_size = 4
    from caffeonspark.dialect import standard_net

    standard_net(net)
    assert net.layer[0].type == "MemoryData" and not net.layer[0].HasField("data_param")


@pytest.mark.parametrize(
    "source_class, message",
    [
        ("com.example.MySource", "unknown source_class 'com.example.MySource'; known: "),
    ],
)
def test_unsupported_source_classes_are_named(tmp_path, lmdb, source_class, message):
    train = cos_layer("TRAIN", f'source: "{lmdb}" batch_size: 4', source_class)
    with pytest.raises(ConfigError, match=message):
        load(solver(tmp_path, train, ""))


def test_missing_batch_size_is_named(tmp_path, lmdb):
    train = cos_layer("TRAIN", f'source: "{lmdb}"', "com.yahoo.ml.caffe.LMDB")
    with pytest.raises(ConfigError, match="layer 'data': memory_data_param.batch_size"):
        load(solver(tmp_path, train, ""))


def test_cos_data_layer_is_the_data_layer(tmp_path):
    """CaffeOnSpark's CoSData layer (DataFrameSource) loads; its source is a table."""
    train = """layer { name: "data" type: "CoSData" top: "data" top: "label"
      include { phase: TRAIN } source_class: "com.yahoo.ml.caffe.DataFrameSource"
      cos_data_param { source: "rel/table" batch_size: 4
        top { name: "data" type: RAW_IMAGE channels: 1 height: 28 width: 28
               transform_param { scale: 0.00390625 mean_file: "mean.binaryproto" } }
        top { name: "label" type: STRING channels: 1 height: 1 width: 1 } } }"""
    conf = Config(conf=solver(tmp_path, train, ""))
    layer = conf.data_layer(TRAIN)
    assert layer.type == "CoSData"
    # Relative paths become absolute, the per-top mean file too.
    assert layer.cos_data_param.source.endswith("/rel/table")
    assert layer.cos_data_param.top[0].transform_param.mean_file.startswith("/")
    with pytest.raises(SourceError, match="reading a table needs a SparkSession"):
        DataSource.get(conf, is_train=True)
    bad = train.replace("DataFrameSource", "LMDB")
    conf = Config(conf=solver(tmp_path, bad, ""))
    with pytest.raises(SourceError, match="CoSData layer reads through .*DataFrameSource"):
        DataSource.get(conf, is_train=True)


def test_row_converter_reads_string_labels():
    conv = RowConverter(["data", "label"], "t", None)
    row = {"data": bytes(4), "label": "7", "channels": 1, "height": 2, "width": 2}
    key, value = conv(row, 0)
    assert caffe_pb2.Datum.FromString(value).label == 7
    for bad in ("cat", "2.5", float("nan")):
        with pytest.raises(SourceError, match="is not an integer"):
            conv(dict(row, label=bad), 0)


def test_caffeonspark_raw_pixels_are_in_opencv_order():
    """CaffeOnSpark's LMDB2DataFrame stored colour pixels interleaved (height, width, channels);
    the Datum gets Caffe's planes. Our own tables keep Caffe's order."""
    from caffeonspark.sources.dataframe import HWC

    hwc = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # H=2, W=3, C=3
    row = {"data": hwc.tobytes(), "label": 1, "channels": 3, "height": 2, "width": 3}
    _, value = RowConverter(["data", "label"], "t", None, pixel_order=HWC)(row, 0)
    got = datum_to_array(caffe_pb2.Datum.FromString(value), "t")
    np.testing.assert_array_equal(got, hwc.transpose(2, 0, 1))
    _, value = RowConverter(["data", "label"], "t", None)(row, 0)
    got = datum_to_array(caffe_pb2.Datum.FromString(value), "t")
    np.testing.assert_array_equal(got, hwc.reshape(3, 2, 3))


def test_encoded_looking_raw_data_says_how_to_mark_it():
    png = b"\x89PNG\r\n\x1a\n" + bytes(20)
    row = {"data": png, "label": 1, "channels": 1, "height": 2, "width": 2, "encoded": False}
    with pytest.raises(SourceError, match="look like an encoded image"):
        RowConverter(["data", "label"], "t", None)(row, 0)


def test_engine_alone_names_the_caffeonspark_source():
    """`python -m engine` does not read a CaffeOnSpark MemoryData source: it says so."""
    from engine.layer import LayerError
    from engine.net import Net

    net = caffe_pb2.NetParameter()
    text_format.Parse(
        'layer { name: "data" type: "MemoryData" top: "data" top: "label" '
        'source_class: "com.yahoo.ml.caffe.LMDB" memory_data_param { source: "/data/lmdb" '
        "batch_size: 2 channels: 1 height: 4 width: 4 } }",
        net,
    )
    with pytest.raises(LayerError, match=r"CaffeOnSpark source \(/data/lmdb\).*caffeonspark.py"):
        Net(net, phase=TRAIN).forward()
