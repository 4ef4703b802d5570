"""Tests for engine.net_spec (pycaffe's NetSpec, L, P, to_proto): the prototxt it writes, the
nets it builds running in engine.Net, its naming rules and its errors."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import engine
import engine as caffe
from engine import layers as L
from engine import params as P
from engine.net_spec import NetSpecError
from engine.proto import caffe_pb2


def parse_net(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def assert_same_net(got, expected):
    """Field-by-field comparison, layer by layer, showing both texts on a mismatch."""
    assert [lp.name for lp in got.layer] == [lp.name for lp in expected.layer]
    for g, e in zip(got.layer, expected.layer, strict=True):
        assert g == e, f"layer {e.name!r} differs:\n--- got\n{g}--- expected\n{e}"
    assert got == expected


# --- the pycaffe LeNet tutorial (examples/01-learning-lenet.ipynb) -----------------------------


def tutorial_lenet(lmdb, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.Data(
        batch_size=batch_size,
        backend=P.Data.LMDB,
        source=lmdb,
        transform_param=dict(scale=1.0 / 255),
        ntop=2,
    )
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(
        n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier")
    )
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


TUTORIAL_LENET = """
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00392156862745 }
  data_param { source: "mnist/mnist_train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool2" top: "fc1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "score" type: "InnerProduct" bottom: "fc1" top: "score"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""


def test_tutorial_lenet_matches_expected_prototxt():
    proto = tutorial_lenet("mnist/mnist_train_lmdb", 64)
    assert isinstance(proto, caffe_pb2.NetParameter)
    assert_same_net(proto, parse_net(TUTORIAL_LENET))
    # str() is protobuf's text format, and it reads back to the same net.
    text = str(proto)
    assert text.startswith('layer {\n  name: "data"\n  type: "Data"\n  top: "data"\n')
    assert "backend: LMDB" in text and "pool: MAX" in text
    assert parse_net(text) == proto
    # Fields left unset stay unset (the prototxt shows only what the script gave).
    conv1 = proto.layer[1]
    assert not conv1.convolution_param.HasField("bias_term")
    assert not conv1.HasField("phase") and not conv1.param


# --- pycaffe's own test nets (python/caffe/test/test_net_spec.py), run in engine.Net -------------


def pycaffe_lenet(batch_size, anonymous):
    n = caffe.NetSpec()
    shapes = [dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])]
    data, label = L.DummyData(shape=shapes, transform_param=dict(scale=1.0 / 255), ntop=2)
    conv1 = L.Convolution(data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    conv2 = L.Convolution(pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    pool2 = L.Pooling(conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool2, num_output=500, weight_filler=dict(type="xavier"))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10, weight_filler=dict(type="xavier"))
    loss = L.SoftmaxWithLoss(ip2, label)
    if anonymous:
        return loss.to_proto()
    n.data, n.label, n.conv1, n.pool1, n.conv2 = data, label, conv1, pool1, conv2
    n.pool2, n.ip1, n.relu1, n.ip2, n.loss = pool2, ip1, relu1, ip2, loss
    return n.to_proto()


@pytest.mark.parametrize("anonymous", [False, True])
def test_pycaffe_lenet_builds_and_runs(anonymous):
    proto = pycaffe_lenet(4, anonymous)
    assert proto.layer[6].bottom == proto.layer[6].top  # the ReLU is in place
    if anonymous:
        names = ["DummyData1", "Convolution1", "Pooling1", "Convolution2", "Pooling2"]
        names += ["InnerProduct1", "ReLU1", "InnerProduct2", "SoftmaxWithLoss1"]
        assert list(proto.layer[0].top) == ["DummyData1", "DummyData2"]
        assert list(proto.layer[6].top) == ["InnerProduct1"]
        assert list(proto.layer[8].bottom) == ["InnerProduct2", "DummyData2"]
    else:
        names = ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"]
        assert list(proto.layer[6].top) == ["ip1"]
    assert [lp.name for lp in proto.layer] == names
    net = caffe.Net(proto, caffe.TEST)
    assert len(net.layers) == 9
    out = net.forward()
    # DummyData fills zeros and biases start at 0, so the scores are all 0: loss = ln 10.
    assert float(out[names[-1]]) == pytest.approx(math.log(10), rel=1e-6)


def test_netspec_net_runs_forward_backward():
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[2, 3, 6, 6]), dict(dim=[2])], ntop=2)
    n.conv1 = L.Convolution(
        n.data,
        num_output=4,
        kernel_size=3,
        weight_filler=dict(type="gaussian", std=0.3),
        bias_filler=dict(type="constant", value=0.1),
        param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)],
    )
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=3, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_weight=2)
    engine.set_random_seed(3)
    net = caffe.Net(n.to_proto(), caffe.TRAIN)
    assert list(net.blobs) == ["data", "label", "conv1", "score", "loss"]
    assert list(net.params) == ["conv1", "score"]
    assert net.params_lr[:2] == [1, 2] and net.params_weight_decay[:2] == [1, 0]

    rs = np.random.default_rng(0)
    net.blobs["data"].data[...] = rs.standard_normal((2, 3, 6, 6))
    net.blobs["label"].data[...] = [0, 2]
    net.clear_param_diffs()
    weighted = net.forward_backward()

    assert (net.blobs["conv1"].data >= 0).all()  # ReLU wrote into conv1
    score = net.blobs["score"].data.astype(np.float64)
    logp = score - score.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    expected = -(logp[0, 0] + logp[1, 2]) / 2
    assert float(net.blobs["loss"].data) == pytest.approx(expected, rel=1e-5)
    assert weighted == pytest.approx(2 * expected, rel=1e-5)
    for name in ("conv1", "score"):
        assert np.abs(net.params[name][0].diff).sum() > 0, name


# --- P: the enum constants of caffe.proto -------------------------------------------------------


def test_params_enum_values():
    # Numbers from caffe.proto.
    assert (P.Pooling.MAX, P.Pooling.AVE, P.Pooling.STOCHASTIC) == (0, 1, 2)
    assert (P.Data.LEVELDB, P.Data.LMDB) == (0, 1)
    assert (P.Eltwise.PROD, P.Eltwise.SUM, P.Eltwise.MAX) == (0, 1, 2)
    assert (P.Loss.FULL, P.Loss.VALID, P.Loss.BATCH_SIZE, P.Loss.NONE) == (0, 1, 2, 3)
    assert (P.Convolution.DEFAULT, P.Convolution.CAFFE, P.Convolution.CUDNN) == (0, 1, 2)
    assert (P.Reduction.SUM, P.Reduction.ASUM, P.Reduction.SUMSQ, P.Reduction.MEAN) == (1, 2, 3, 4)
    assert (P.Filler.FAN_IN, P.Filler.FAN_OUT, P.Filler.AVERAGE) == (0, 1, 2)
    assert P.Pooling.PoolMethod.Name(1) == "AVE"
    assert {"MAX", "AVE", "STOCHASTIC", "PoolMethod"} <= set(dir(P.Pooling))


def test_params_errors():
    with pytest.raises(AttributeError, match="PoolingParameter has no constant 'MAXX'.*'MAX'"):
        _ = P.Pooling.MAXX
    with pytest.raises(AttributeError, match="no message PolingParameter"):
        _ = P.Poling
    assert not hasattr(P, "__wrapped__") and not hasattr(P.Pooling, "__len__")


# --- keyword values ----------------------------------------------------------------------------


def test_repeated_and_nested_fields():
    x = L.Input(shape=dict(dim=[1, 2, 5, 5]))
    y = L.Convolution(
        x,
        num_output=3,
        kernel_size=3,  # a single value for a repeated field becomes [3]
        pad=(1, 0),
        param=[dict(lr_mult=1), dict(lr_mult=2)],
        include=dict(phase=caffe.TRAIN),
        loss_weight=0.5,
        propagate_down=[False],
        weight_filler=caffe_pb2.FillerParameter(type="msra"),
        bias_filler=dict(type="constant", value=0.2),
        engine="CAFFE",  # an enum by name
    )
    layer = y.to_proto().layer[1]
    expected = text_format.Parse(
        """name: "Convolution1" type: "Convolution" bottom: "Input1" top: "Convolution1"
        param { lr_mult: 1 } param { lr_mult: 2 } include { phase: TRAIN }
        loss_weight: 0.5 propagate_down: false
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 pad: 0 engine: CAFFE
          weight_filler { type: "msra" } bias_filler { type: "constant" value: 0.2 } }""",
        caffe_pb2.LayerParameter(),
    )
    assert layer == expected, str(layer)
    # Keywords ending in "param" go to LayerParameter as they are; nested dicts recurse.
    d = L.Data(
        data_param=dict(source="db", batch_size=2), transform_param=dict(mean_value=[1, 2, 3])
    )
    dp = d.to_proto().layer[0]
    assert dp.data_param.source == "db" and list(dp.transform_param.mean_value) == [1, 2, 3]
    # Python layers: param_str goes to python_param.
    py = L.Python(x, module="m", layer="Lay", param_str="{'a': 1}").to_proto().layer[1]
    assert py.python_param.layer == "Lay" and py.python_param.param_str == "{'a': 1}"


def test_alias_parameter_messages():
    x = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    deconv = L.Deconvolution(x, num_output=2, kernel_size=2, stride=2).to_proto().layer[1]
    assert deconv.convolution_param.num_output == 2 and deconv.convolution_param.stride == [2]
    label = L.Input(shape=dict(dim=[1, 4, 4]))
    loss = L.SoftmaxWithLoss(x, label, ignore_label=255, axis=1, normalize=False)
    lp = loss.to_proto().layer[2]
    assert lp.loss_param.ignore_label == 255 and lp.loss_param.normalize is False
    assert lp.softmax_param.axis == 1
    lstm = L.LSTM(x, label, num_output=4).to_proto().layer[2]
    assert lstm.recurrent_param.num_output == 4


# --- naming, ordering, ntop, in_place ---------------------------------------------------------


def test_ntop_zero_returns_the_layer_and_is_named():
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=[3]), ntop=2)
    silence = L.Silence(n.data, n.data2, ntop=0)
    assert isinstance(silence, engine.net_spec.Function) and silence.tops == ()
    n.silence = silence
    proto = n.to_proto()
    assert [lp.name for lp in proto.layer] == ["data", "silence"]
    assert list(proto.layer[1].bottom) == ["data", "data2"] and not proto.layer[1].top
    net = caffe.Net(proto, caffe.TEST)
    assert net.forward() == {}
    # Unnamed, a top-less layer is named after its type.
    assert caffe.to_proto(L.Silence(n.data, ntop=0)).layer[1].name == "Silence1"


def test_multi_top_layer_named_after_first_top():
    n = caffe.NetSpec()
    a, n.label = L.Input(shape=dict(dim=[2]), ntop=2)
    n.out = L.Eltwise(a, n.label)
    proto = n.to_proto()
    assert proto.layer[0].name == "Input1"
    assert list(proto.layer[0].top) == ["Input1", "label"]
    assert list(proto.layer[1].bottom) == ["Input1", "label"]


def test_order_is_depth_first_from_assigned_tops_and_each_layer_once():
    n = caffe.NetSpec()
    x = L.Input(shape=dict(dim=[2, 3]))
    y = L.ReLU(x)
    n.z = L.Eltwise(y, x, y)  # assigned first; x and y are named later or never
    n.x = x
    n.w = L.Sigmoid(n.z)
    proto = n.to_proto()
    assert [lp.type for lp in proto.layer] == ["Input", "ReLU", "Eltwise", "Sigmoid"]
    assert [lp.name for lp in proto.layer] == ["x", "ReLU1", "z", "w"]
    assert list(proto.layer[2].bottom) == ["ReLU1", "x", "ReLU1"]
    # to_proto of several tops shares the layers they have in common.
    both = caffe.to_proto(n.w, n.z)
    assert [lp.type for lp in both.layer] == ["Input", "ReLU", "Eltwise", "Sigmoid"]
    assert [lp.name for lp in both.layer] == ["Input1", "ReLU1", "Eltwise1", "Sigmoid1"]


def test_in_place_layer_keeps_its_netspec_name_and_chains():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.fc = L.InnerProduct(n.data, num_output=2)
    n.relu = L.ReLU(n.fc, in_place=True)
    n.drop = L.Dropout(n.relu, in_place=True, dropout_ratio=0.3)
    n.out = L.TanH(n.drop)
    layers = n.to_proto().layer
    assert [lp.name for lp in layers] == ["data", "fc", "relu", "drop", "out"]
    assert [list(lp.top) for lp in layers[2:4]] == [["fc"], ["fc"]]
    assert list(layers[4].bottom) == ["fc"]
    assert layers[3].dropout_param.dropout_ratio == pytest.approx(0.3)


def test_name_keyword_renames_the_layer_only():
    # pycaffe has no special `name`: it falls through to LayerParameter.name after naming.
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.fc = L.InnerProduct(n.data, num_output=2, name="my_fc")
    layer = n.to_proto().layer[1]
    assert layer.name == "my_fc" and list(layer.top) == ["fc"]


def test_netspec_item_access_update_and_delete():
    n = caffe.NetSpec()
    n["data"] = L.Input(shape=dict(dim=[1, 2]))
    n.fc = L.InnerProduct(n["data"], num_output=2)
    assert n["fc"] is n.fc and n.keys() == ["data", "fc"] and n.vals() == [n.data, n.fc]
    n.update("fc", dict(num_output=7, bias_term=False))
    assert n.to_proto().layer[1].inner_product_param.num_output == 7
    with pytest.raises(NetSpecError, match="unknown keyword 'num_outptu'"):
        n.update("fc", dict(num_outptu=7))
    del n["fc"]
    assert n.keys() == ["data"] and len(n.to_proto().layer) == 1
    with pytest.raises(AttributeError, match="no top 'fc'"):
        _ = n.fc
    with pytest.raises(KeyError):
        _ = n["fc"]
    assert not hasattr(n, "fc")


def test_deep_net_does_not_hit_the_recursion_limit():
    top = L.Input(shape=dict(dim=[1]))
    for _ in range(sys.getrecursionlimit() + 100):
        top = L.ReLU(top)
    layers = top.to_proto().layer
    assert len(layers) == sys.getrecursionlimit() + 101
    assert layers[-1].name == f"ReLU{sys.getrecursionlimit() + 100}"


# --- errors ------------------------------------------------------------------------------------


def test_unknown_keyword_names_type_keyword_and_message():
    x = L.Input(shape=dict(dim=[1, 2, 5, 5]))
    with pytest.raises(NetSpecError) as err:
        L.Convolution(x, kernal_size=3)
    text = str(err.value)
    assert "L.Convolution" in text and "'kernal_size'" in text
    assert "ConvolutionParameter (convolution_param)" in text and "'kernel_size'" in text
    with pytest.raises(NetSpecError, match=r"weight_filler: FillerParameter has no field 'typ'"):
        L.Convolution(x, num_output=1, weight_filler=dict(typ="xavier"))
    with pytest.raises(
        NetSpecError, match="keyword 'axis': layer type 'Silence' has no parameter message"
    ):
        L.Silence(x, axis=1, ntop=0)
    with pytest.raises(NetSpecError, match="unknown keyword 'conv_param'"):
        L.Convolution(x, conv_param=dict(num_output=1))


def test_bad_values_are_named():
    x = L.Input(shape=dict(dim=[1, 2, 5, 5]))
    with pytest.raises(NetSpecError, match=r"convolution_param\.num_output: bad value 'ten'"):
        L.Convolution(x, num_output="ten")
    with pytest.raises(NetSpecError, match=r"'MAXX' is not a PoolMethod \(MAX, AVE, STOCHASTIC\)"):
        L.Pooling(x, pool="MAXX")
    with pytest.raises(NetSpecError, match=r"num_output takes one value"):
        L.Convolution(x, num_output=[1, 2])
    with pytest.raises(NetSpecError, match=r"weight_filler is a FillerParameter message"):
        L.Convolution(x, weight_filler="xavier")
    with pytest.raises(NetSpecError, match="ntop must be an int"):
        L.Input(ntop=-1)
    # Both exception families catch it, as pycaffe scripts may expect either.
    assert issubclass(NetSpecError, TypeError) and issubclass(NetSpecError, ValueError)


def test_inputs_and_assignments_must_be_tops():
    pair = L.DummyData(shape=dict(dim=[1]), ntop=2)
    with pytest.raises(
        TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"
    ):
        L.Silence(pair, ntop=0)
    L.Silence(*pair, ntop=0)
    n = caffe.NetSpec()
    with pytest.raises(NetSpecError, match="NetSpec.data.*unpack it"):
        n.data = pair
    with pytest.raises(NetSpecError, match="to_proto argument 0"):
        caffe.to_proto("data")


# --- exposure: engine.NetSpec, engine.layers.<Type>, lazy import -------------------------------


def test_engine_exposes_net_spec_and_layers_package_still_works():
    import engine.layers.conv
    import engine.net_spec

    assert caffe.NetSpec is engine.net_spec.NetSpec and caffe.to_proto is engine.net_spec.to_proto
    assert caffe.params is engine.net_spec.params and caffe.layers is L
    assert {"NetSpec", "params", "to_proto", "layers", "net_spec"} <= set(caffe.__all__)
    assert L.conv is engine.layers.conv  # submodules still resolve
    assert isinstance(L.Pooling(L.Input(shape=dict(dim=[1, 1, 2, 2]))), engine.net_spec.Top)
    assert L.Pooling.__name__ == "Pooling"
    for missing in ("nonexistent", "_private", "__wrapped__"):
        assert not hasattr(L, missing), missing
    with pytest.raises(AttributeError, match="engine.layers' has no attribute 'convolution'"):
        _ = L.convolution
    assert engine.net_spec.layers.Convolution.__name__ == "Convolution"


def test_import_engine_does_not_load_net_spec():
    # `import engine` stays light: neither net_spec nor the layer catalog loads with it.
    code = (
        "import sys, engine\nfor m in ('engine.net_spec', 'engine.layers'): print(m in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
