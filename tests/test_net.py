"""Net building: phase/stage rules, splits, in-place blobs, shared params, need-backward,
weights I/O and the pycaffe-style API."""

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import io
from engine.layer import LayerError
from engine.net import filter_net, insert_splits, state_meets_rule
from engine.proto import caffe_pb2


def net_param(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


MLP = """
name: "mlp"
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "acc" type: "Accuracy" bottom: "y" bottom: "label" top: "acc"
        include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }
"""


def make_mlp(phase=engine.TRAIN, text=MLP):
    engine.set_random_seed(3)
    net = engine.Net(net_param(text), phase)
    rs = np.random.RandomState(0)
    net.blobs["x"].data[...] = rs.standard_normal((4, 6))
    net.blobs["label"].data[...] = [0, 2, 1, 2]
    return net


def test_state_rules():
    state = caffe_pb2.NetState(phase=caffe_pb2.TEST, level=2, stage=["a"])
    rule = caffe_pb2.NetStateRule
    assert state_meets_rule(state, rule(phase=caffe_pb2.TEST))
    assert not state_meets_rule(state, rule(phase=caffe_pb2.TRAIN))
    assert not state_meets_rule(state, rule(min_level=3))
    assert state_meets_rule(state, rule(max_level=2))
    assert not state_meets_rule(state, rule(stage=["b"]))
    assert not state_meets_rule(state, rule(not_stage=["a"]))
    assert state_meets_rule(state, rule(stage=["a"], not_stage=["b"]))


def test_filter_by_phase_and_stage():
    p = net_param("""
      state { phase: TEST stage: "deploy" }
      layer { name: "a" type: "Input" include { phase: TEST } }
      layer { name: "b" type: "Input" include { phase: TRAIN } }
      layer { name: "c" type: "Input" exclude { stage: "deploy" } }
      layer { name: "d" type: "Input" include { stage: "deploy" } }
    """)
    assert [lp.name for lp in filter_net(p).layer] == ["a", "d"]
    p.layer[0].exclude.add(phase=caffe_pb2.TRAIN)
    with pytest.raises(LayerError, match="'a'.*either include rules or exclude rules"):
        filter_net(p)


def test_net_phase_filters_layers():
    assert "acc" not in make_mlp(engine.TRAIN).layer_names
    test_net = make_mlp(engine.TEST)
    assert "acc" in test_net.layer_names
    assert test_net.outputs == ["acc", "loss"]


def test_splits_are_inserted_for_shared_blobs():
    p = insert_splits(filter_net(net_param(MLP.replace("include { phase: TEST }", ""))))
    names = [lp.name for lp in p.layer]
    assert "y_ip2_0_split" in names
    split = p.layer[names.index("y_ip2_0_split")]
    assert list(split.top) == ["y_ip2_0_split_0", "y_ip2_0_split_1"]
    assert list(p.layer[names.index("acc")].bottom) == ["y_ip2_0_split_0", "label_in_1_split_0"]
    assert list(p.layer[names.index("loss")].bottom) == ["y_ip2_0_split_1", "label_in_1_split_1"]


def test_split_backward_sums_diffs():
    text = """
    force_backward: true
    layer { name: "in" type: "Input" top: "x" top: "t1" top: "t2"
            input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "l1" type: "EuclideanLoss" bottom: "x" bottom: "t1" top: "l1" }
    layer { name: "l2" type: "EuclideanLoss" bottom: "x" bottom: "t2" top: "l2"
            loss_weight: 3 }
    """
    net = engine.Net(net_param(text), engine.TRAIN)
    rs = np.random.RandomState(1)
    x, t1, t2 = (rs.standard_normal((2, 3)).astype(np.float32) for _ in range(3))
    net.blobs["x"].data[...] = x
    net.blobs["t1"].data[...] = t1
    net.blobs["t2"].data[...] = t2
    net.forward()
    net.backward()
    expected = (x - t1) / 2 + 3 * (x - t2) / 2
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-5, atol=1e-6)


def test_in_place_blob_and_need_backward():
    net = make_mlp()
    # relu writes into "h": no new blob.
    assert list(net.blobs) == ["x", "label", "h", "y", "loss"]
    relu = net.layer_names.index("relu")
    assert net.top_vecs[relu][0] is net.bottom_vecs[relu][0]
    # force_backward asks for x's gradient but never the label's.
    loss_i = net.layer_names.index("loss")
    assert net.bottom_need_backward[loss_i] == [True, False]


def test_need_backward_without_force_backward():
    text = MLP.replace("force_backward: true", "")
    net = make_mlp(text=text)
    ip1 = net.layer_names.index("ip1")
    assert net.layer_need_backward[ip1]
    assert net.bottom_need_backward[ip1] == [False]  # inputs need no gradient
    # Freezing ip1 entirely (lr_mult 0) removes its backward.
    frozen = text.replace(
        "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }",
        "param { lr_mult: 0 } param { lr_mult: 0 }",
    )
    net = make_mlp(text=frozen)
    assert not net.layer_need_backward[net.layer_names.index("ip1")]


def test_forward_backward_matches_numpy():
    net = make_mlp()
    out = net.forward()
    w1, b1 = (p.data for p in net.params["ip1"])
    (w2,) = [net.params["ip2"][0].data]
    x = net.blobs["x"].data.astype(np.float64)
    h = np.maximum(x @ w1.T + b1, 0)
    y = h @ w2.T + net.params["ip2"][1].data
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([0, 2, 1, 2])
    loss = -np.log(p[np.arange(4), labels]).mean()
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    diffs = net.backward()
    dy = p.copy()
    dy[np.arange(4), labels] -= 1
    dy /= 4
    np.testing.assert_allclose(net.params["ip2"][0].diff, dy.T @ h, rtol=1e-4, atol=1e-6)
    dh = (dy @ w2) * (h > 0)
    np.testing.assert_allclose(diffs["x"], dh @ w1, rtol=1e-4, atol=1e-6)


def test_lr_and_decay_mults():
    net = make_mlp()
    assert net.params_lr == [1.0, 2.0, 1.0, 1.0]
    assert net.params_weight_decay == [1.0, 0.0, 1.0, 1.0]
    assert len(net.learnable_params) == 4


SHARED = """
force_backward: true
layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "fa" type: "InnerProduct" bottom: "a" top: "ya"
        param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "fb" type: "InnerProduct" bottom: "b" top: "yb"
        param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ya" bottom: "yb" top: "loss" }
"""


def test_shared_params_are_one_blob_with_summed_diff():
    net = engine.Net(net_param(SHARED), engine.TRAIN)
    assert net.params["fa"][0] is net.params["fb"][0]
    assert len(net.learnable_params) == 2
    rs = np.random.RandomState(2)
    a, b = rs.standard_normal((2, 2, 4)).astype(np.float32)
    net.blobs["a"].data[...] = a
    net.blobs["b"].data[...] = b
    net.forward()
    net.clear_param_diffs()
    net.backward()
    w = net.params["fa"][0].data
    d = (a @ w.T - b @ w.T) / 2  # d loss / d ya
    expected = d.T @ a - d.T @ b
    np.testing.assert_allclose(net.params["fa"][0].diff, expected, rtol=1e-4, atol=1e-5)


def test_shared_param_shape_mismatch_names_layer():
    bad = SHARED.replace(
        'top: "yb"\n        param { name: "w" } param { name: "bias" }\n'
        "        inner_product_param { num_output: 3",
        'top: "yb"\n        param { name: "w" } param { name: "bias" }\n'
        "        inner_product_param { num_output: 2",
    )
    with pytest.raises(LayerError, match="'fb'.*share param 'w'"):
        engine.Net(net_param(bad), engine.TRAIN)


def test_unknown_bottom_and_type_name_the_layer():
    with pytest.raises(LayerError, match="'ip'.*unknown bottom blob 'nope'"):
        engine.Net(
            net_param('layer { name: "ip" type: "ReLU" bottom: "nope" top: "y" }'), engine.TRAIN
        )
    with pytest.raises(LayerError, match="'z'.*unknown layer type 'Zzz'"):
        engine.Net(net_param('layer { name: "z" type: "Zzz" }'), engine.TRAIN)


def test_save_and_copy_from_round_trip(tmp_path):
    net = make_mlp()
    path = tmp_path / "mlp.caffemodel"
    net.save(path)
    proto = io.read_binary(path, caffe_pb2.NetParameter())
    again = caffe_pb2.NetParameter()
    again.ParseFromString(net.to_proto().SerializeToString())
    assert proto == again  # what we write is what we read back, unchanged
    other = make_mlp()
    for blobs in other.params.values():
        for b in blobs:
            b.data[...] = 0
    other.copy_from(str(path))
    for name, blobs in net.params.items():
        for a, b in zip(blobs, other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    # pycaffe's constructor forms load weights too.
    third = engine.Net(str(_write_prototxt(tmp_path)), str(path), engine.TEST)
    np.testing.assert_array_equal(third.params["ip1"][0].data, net.params["ip1"][0].data)


def _write_prototxt(tmp_path):
    p = tmp_path / "mlp.prototxt"
    p.write_text(MLP)
    return p


def test_copy_from_shape_mismatch_is_clear(tmp_path):
    net = make_mlp()
    path = tmp_path / "mlp.caffemodel"
    net.save(path)
    other = engine.Net(net_param(MLP.replace("num_output: 5", "num_output: 7")), engine.TRAIN)
    with pytest.raises(LayerError, match="layer 'ip1'.*shape mismatch.*5 6.*7 6"):
        other.copy_from(str(path))


def test_corrupt_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer { name: "a" type: "Input" \n  bogus_field: 3 }\n')
    with pytest.raises(io.CaffeFileError, match=r"bad.prototxt:3:.*bogus_field"):
        engine.Net(str(bad), engine.TRAIN)
    garbage = tmp_path / "bad.caffemodel"
    garbage.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    net = make_mlp()
    with pytest.raises(io.CaffeFileError, match="bad.caffemodel: not a valid binary NetParameter"):
        net.copy_from(str(garbage))
    with pytest.raises(io.CaffeFileError, match="missing.caffemodel: cannot read"):
        net.copy_from(str(tmp_path / "missing.caffemodel"))


def test_forward_with_start_end_and_inputs():
    net = make_mlp()
    x = np.ones((4, 6), np.float32)
    out = net.forward(end="relu", x=x)
    assert set(out) == {"h"}
    h = net.blobs["h"].data.copy()
    out = net.forward(start="ip2")
    np.testing.assert_array_equal(net.blobs["h"].data, h)
    assert set(out) == {"loss"}


def test_legacy_input_fields_become_input_layer():
    net = engine.Net(
        net_param("""
      input: "data" input_shape { dim: 2 dim: 3 }
      layer { name: "r" type: "ReLU" bottom: "data" top: "out" }
    """),
        engine.TEST,
    )
    assert net.inputs == ["data"]
    assert net.blobs["data"].shape == (2, 3)
    net = engine.Net(
        net_param("""
      input: "data" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4
      layer { name: "r" type: "ReLU" bottom: "data" top: "out" }
    """),
        engine.TEST,
    )
    assert net.blobs["out"].shape == (1, 2, 3, 4)


def test_top_produced_twice_is_an_error():
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 } } }
    layer { name: "a" type: "ReLU" bottom: "x" top: "y" }
    layer { name: "b" type: "ReLU" bottom: "x" top: "y" }
    """
    with pytest.raises(LayerError, match="'b'.*'y' produced by multiple sources"):
        engine.Net(net_param(text), engine.TRAIN)
