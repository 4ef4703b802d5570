"""CaffeOnSpark's CoSData layer in the engine alone: typed tops from the columns of a local
Parquet table (numbers, number arrays, raw and encoded images), their transforms and shapes,
and the errors that name the record and column. The Spark side runs in test_spark_cluster."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf import text_format
from PIL import Image

import engine as caffe
from engine.data import images
from engine.layer import LayerError
from engine.proto import caffe_pb2

N = 5


def png(arr):
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def table(tmp_path):
    """A table of N rows, one column per CoSData type, and the arrays it was made from."""
    rng = np.random.default_rng(7)
    raw = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(N)]  # H, W, C
    rgb = [rng.integers(0, 256, (6, 7, 3), dtype=np.uint8) for _ in range(N)]
    t = pa.table(
        {
            "id": [f"r{i}" for i in range(N)],
            "label": [str(10 + i) for i in range(N)],
            "k": pa.array(range(N), pa.int32()),
            "x": pa.array([0.25 * i for i in range(N)], pa.float32()),
            "vec": [[float(v) for v in np.arange(6) + i] for i in range(N)],
            "seq": [[i, i + 1, i + 2, i + 3] for i in range(N)],
            "raw": [r.tobytes() for r in raw],
            "png": [png(a) for a in rgb],
            "dim": [{"image": png(a), "height": 6, "width": 7} for a in rgb],
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(t, path)
    return {"path": path, "raw": raw, "rgb": rgb}


ALL_TOPS = """
  top { name: "label" type: STRING }
  top { name: "k" type: INT sample_num_axes: 0 }
  top { name: "x" type: FLOAT }
  top { name: "vec" type: FLOAT_ARRAY channels: 2 height: 3 sample_num_axes: 2
        transform_param { scale: 0.5 } }
  top { name: "seq" type: INT_ARRAY channels: 4 sample_num_axes: 1 transpose: true }
  top { name: "raw" type: RAW_IMAGE channels: 3 height: 4 width: 5
        transform_param { mean_value: 1 mean_value: 2 mean_value: 3 } }
  top { name: "png" type: ENCODED_IMAGE channels: 3 height: 6 width: 7
        out_height: 4 out_width: 4 transform_param { crop_size: 4 } }
  top { name: "dim" type: ENCODED_IMAGE_WITH_DIM channels: 1 height: 6 width: 7 }
"""


def cos_net(source, tops, names, batch=3, extra=""):
    text = f"""name: "cos" layer {{ name: "d" type: "CoSData"
      {" ".join(f'top: "{n}"' for n in names)}
      source_class: "com.yahoo.ml.caffe.DataFrameSource"
      cos_data_param {{ source: "{source}" batch_size: {batch} {tops} }} }} {extra}"""
    return text_format.Parse(text, caffe_pb2.NetParameter())


NAMES = ["label", "k", "x", "vec", "seq", "raw", "png", "dim"]


def test_every_type_fills_its_top(table):
    net = caffe.Net(cos_net(table["path"], ALL_TOPS, NAMES), caffe.TEST)
    shapes = {n: net.blobs[n].data.shape for n in NAMES}
    assert shapes == {
        "label": (3, 1, 1, 1),
        "k": (3,),
        "x": (3, 1, 1, 1),
        "vec": (3, 2, 3),
        "seq": (4, 3),
        "raw": (3, 3, 4, 5),
        "png": (3, 3, 4, 4),
        "dim": (3, 1, 6, 7),
    }
    net.forward()
    b = {n: net.blobs[n].data for n in NAMES}
    np.testing.assert_array_equal(b["label"].ravel(), [10, 11, 12])
    np.testing.assert_array_equal(b["k"], [0, 1, 2])
    np.testing.assert_array_equal(b["x"].ravel(), [0, 0.25, 0.5])
    for i in range(3):
        np.testing.assert_array_equal(b["vec"][i], 0.5 * (np.arange(6) + i).reshape(2, 3))
        np.testing.assert_array_equal(b["seq"][:, i], [i, i + 1, i + 2, i + 3])
        # Raw pixels are interleaved (H, W, C), as OpenCV holds them; the top has planes.
        want = table["raw"][i].transpose(2, 0, 1).astype(np.float32) - [[[1]], [[2]], [[3]]]
        np.testing.assert_array_equal(b["raw"][i], want)
        # Colour decodes to BGR; a TEST crop takes the centre.
        bgr = table["rgb"][i][:, :, ::-1].transpose(2, 0, 1)
        np.testing.assert_array_equal(b["png"][i], bgr[:, 1:5, 1:5])
        grey = images.decode_image(png(table["rgb"][i]), images.GRAY)
        np.testing.assert_array_equal(b["dim"][i, 0], grey.reshape(6, 7))


def test_batches_run_in_row_order_and_wrap(table):
    tops = 'top { name: "label" type: STRING }'
    net = caffe.Net(cos_net(table["path"], tops, ["label"]), caffe.TEST)
    got = []
    for _ in range(3):
        net.forward()
        got.extend(net.blobs["label"].data.ravel().tolist())
    assert got == [10, 11, 12, 13, 14, 10, 11, 12, 13]


def test_a_small_net_learns_from_a_table(tmp_path):
    """Two Gaussian blobs as FLOAT_ARRAY features, INT labels: SGD on the table separates
    them, as it would on an LMDB."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    feats = rng.normal(0, 0.5, (200, 4)) + (labels[:, None] * 2 - 1)
    pq.write_table(
        pa.table({"f": [list(map(float, r)) for r in feats], "y": labels.tolist()}),
        tmp_path / "blobs.parquet",
    )
    tops = """top { name: "f" type: FLOAT_ARRAY channels: 4 sample_num_axes: 1 }
              top { name: "y" type: INT sample_num_axes: 0 }"""
    layers = """layer { name: "ip" type: "InnerProduct" bottom: "f" top: "ip"
                  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
                layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "y" top: "loss" }
                layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "y" top: "acc"
                  include { phase: TEST } }"""
    net = cos_net(tmp_path / "blobs.parquet", tops, ["f", "y"], batch=20, extra=layers)
    (tmp_path / "net.prototxt").write_text(text_format.MessageToString(net))
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 30 '
        "test_iter: 10 test_interval: 1000 random_seed: 1 display: 0 snapshot_after_train: false"
    )
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    solver.solve()
    test = solver.test_nets[0]
    acc = np.mean([test.forward()["acc"] for _ in range(10)])
    assert acc > 0.95


@pytest.mark.parametrize(
    "tops, names, message",
    [
        (
            'top { name: "nope" type: STRING }',
            ["nope"],
            r"has no column\(s\) nope \(it has id, label",
        ),
        ('top { name: "label" type: STRING }', ["a", "b"], "2 tops but 1 cos_data_param.top"),
        (
            'top { name: "label" type: STRING channels: 2 }',
            ["label"],
            "holds one number per record, but its sample shape 2x1x1 has 2 values",
        ),
        (
            'top { name: "seq" type: INT_ARRAY channels: 4 transpose: true }',
            ["seq"],
            "transpose needs sample_num_axes 1, got 3",
        ),
        (
            'top { name: "png" type: ENCODED_IMAGE channels: 3 height: 6 width: 7 '
            "transform_param { crop_size: 4 } }",
            ["png"],
            r"its transform turns 3x6x7 into 3x4x4, but the top is declared 3x6x7",
        ),
    ],
)
def test_set_up_errors_name_the_layer(table, tops, names, message):
    with pytest.raises(LayerError, match=r"layer 'd' \(CoSData\): .*" + message):
        caffe.Net(cos_net(table["path"], tops, names), caffe.TEST)


@pytest.mark.parametrize(
    "tops, message",
    [
        (
            'top { name: "vec" type: FLOAT_ARRAY channels: 5 sample_num_axes: 1 }',
            "key 'r0': column 'vec': 6 values, the top takes 5",
        ),
        (
            'top { name: "png" type: ENCODED_IMAGE channels: 3 height: 8 width: 8 }',
            r"key 'r0': column 'png': the image is 6x7, the top takes 8x8 \(.*-resize\)",
        ),
        (
            'top { name: "raw" type: RAW_IMAGE channels: 3 height: 5 width: 5 }',
            "key 'r0': column 'raw': 60 bytes of raw pixels, but height x width x channels",
        ),
        ('top { name: "id" type: STRING }', "key '0': column 'id': 'r0' is not a number"),
        ('top { name: "x" type: INT }', "key 'r1': column 'x': 0.25 is not an integer"),
    ],
)
def test_a_bad_value_names_its_record_and_column(table, tops, message):
    net = caffe.Net(cos_net(table["path"], tops, ["t"]), caffe.TEST)
    with pytest.raises(LayerError, match=message):
        net.forward()


def test_without_a_table_the_error_says_where(tmp_path):
    tops = 'top { name: "label" type: STRING }'
    with pytest.raises(LayerError, match=r"table .*missing.parquet not found"):
        caffe.Net(cos_net(tmp_path / "missing.parquet", tops, ["label"]), caffe.TEST)


def test_transposed_sequences_feed_an_lstm(tmp_path):
    """LRCN's layout (CaffeOnSpark's lrcn_cos.prototxt): sentences as INT_ARRAY columns,
    transposed to T x N for Embed and LSTM; the loss ignores the padding (-1)."""
    T, rows = 5, 4
    words = [[1 + (i + t) % 8 for t in range(T)] for i in range(rows)]
    target = [w[1:] + [-1] for w in words]
    cont = [[0] + [1] * (T - 1) for _ in range(rows)]
    pq.write_table(
        pa.table({"input": words, "target": target, "cont": cont}), tmp_path / "s.parquet"
    )
    tops = "".join(
        f'top {{ name: "{n}" type: INT_ARRAY channels: {T} sample_num_axes: 1 transpose: true }}'
        for n in ("input", "cont", "target")
    )
    layers = """
      layer { name: "embed" type: "Embed" bottom: "input" top: "emb"
        embed_param { input_dim: 10 num_output: 4 bias_term: false
          weight_filler { type: "uniform" min: -0.1 max: 0.1 } } }
      layer { name: "lstm" type: "LSTM" bottom: "emb" bottom: "cont" top: "h"
        recurrent_param { num_output: 6 weight_filler { type: "uniform" min: -0.1 max: 0.1 } } }
      layer { name: "predict" type: "InnerProduct" bottom: "h" top: "predict"
        inner_product_param { num_output: 10 axis: 2 weight_filler { type: "xavier" } } }
      layer { name: "loss" type: "SoftmaxWithLoss" bottom: "predict" bottom: "target"
        top: "loss" loss_param { ignore_label: -1 } softmax_param { axis: 2 } }"""
    net = caffe.Net(
        cos_net(tmp_path / "s.parquet", tops, ["input", "cont", "target"], 2, layers), caffe.TRAIN
    )
    net.forward()
    np.testing.assert_array_equal(net.blobs["input"].data, np.array(words[:2]).T)
    np.testing.assert_array_equal(net.blobs["target"].data[:, 1], target[1])
    assert net.blobs["predict"].data.shape == (T, 2, 10)
    loss = float(net.blobs["loss"].data)
    assert np.isfinite(loss) and 2.0 < loss < 2.5  # about ln 10 for an untrained net
    net.backward()
    assert np.abs(net.params["embed"][0].diff).sum() > 0


def test_the_readme_lrcn_data_layer_feeds_conf_lrcn(tmp_path):
    """The README's CoSData layer for conf/lrcn over coco2dataframe's table (72x72 images,
    captions of T = 20 padded with -1) builds, runs forward and backward."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    start = readme.index("To train `conf/lrcn` on the table")
    block = readme[readme.index("```", start) + 3 :]
    block = block[: block.index("```")]
    rng = np.random.default_rng(4)
    rows = 16
    words = [[2 + (i + t) % 9 for t in range(i % 7 + 1)] for i in range(rows)]
    inputs = [[0] + w + [-1] * (19 - len(w)) for w in words]
    cont = [[0] + [1] * len(w) + [-1] * (19 - len(w)) for w in words]
    target = [w + [0] + [-1] * (19 - len(w)) for w in words]
    images = [png(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)) for _ in range(rows)]
    table = {
        "id": [str(i) for i in range(rows)],
        "data": [{"height": 72, "width": 72, "image": im} for im in images],
        "label": pa.array([0] * rows, pa.int32()),
        "input_sentence": inputs,
        "cont_sentence": cont,
        "target_sentence": target,
    }
    pq.write_table(pa.table(table), tmp_path / "embedding.parquet")
    block = block.replace("hdfs:///coco/parquet/embedding", str(tmp_path / "embedding.parquet"))
    lrcn = (root / "conf/lrcn/train_val.prototxt").read_text()
    net = text_format.Parse(lrcn, caffe_pb2.NetParameter())
    body = [
        lp
        for lp in net.layer
        if lp.type not in ("Data", "HDF5Data") and lp.name != "silence_image_label"
    ]
    param = text_format.Parse(block, caffe_pb2.NetParameter())
    param.layer.extend(body)
    net = caffe.Net(param, caffe.TRAIN)
    loss = float(net.forward()["cross_entropy_loss"])
    assert np.isfinite(loss) and net.blobs["input_sentence"].data.shape == (20, 16)
    np.testing.assert_array_equal(net.blobs["input_sentence"].data[:, 3], inputs[3])
    net.backward()
    assert np.abs(net.params["embed"][0].diff).sum() > 0
