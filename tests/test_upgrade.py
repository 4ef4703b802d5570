"""Tests of engine.upgrade and the upgrade_* tools: V0 / V1 nets and caffemodels, old data
fields, net inputs, BatchNorm specs and solver_type, checked against the golden LeNet."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import io, upgrade
from engine.layer import registered_types
from engine.proto import caffe_pb2
from engine.tools import upgrade_net_proto_binary, upgrade_net_proto_text, upgrade_solver_proto_text
from tests import golden

ROOT = Path(__file__).resolve().parents[1]
LENET = golden.GOLDEN / "nets" / "lenet"


def parse_net(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def needs_layers(*types):
    missing = sorted(set(types) - set(registered_types()))
    return pytest.mark.skipif(bool(missing), reason=f"layer types not registered yet: {missing}")


def needs_golden(path):
    return pytest.mark.skipif(not Path(path).exists(), reason=f"no golden case at {path}")


# The golden LeNet (nets/lenet/net.prototxt, TRAIN) written by hand in the V1 format, with the
# deprecated net-level inputs instead of an Input layer. INPUTS is filled in per test.
V1_LENET = """
name: "LeNet"
force_backward: true
{inputs}
layers {{
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2
  convolution_param {{
    num_output: 20 kernel_size: 5 stride: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }}
  }}
}}
layers {{
  name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }}
}}
layers {{
  name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2"
  blobs_lr: 1 blobs_lr: 2
  convolution_param {{
    num_output: 50 kernel_size: 5 stride: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }}
  }}
}}
layers {{
  name: "pool2" type: POOLING bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }}
}}
layers {{
  name: "ip1" type: INNER_PRODUCT bottom: "pool2" top: "ip1"
  blobs_lr: 1 blobs_lr: 2
  inner_product_param {{
    num_output: 500 weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }}
  }}
}}
layers {{ name: "relu1" type: RELU bottom: "ip1" top: "ip1" }}
layers {{
  name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2"
  blobs_lr: 1 blobs_lr: 2
  inner_product_param {{
    num_output: 10 weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }}
  }}
}}
layers {{
  name: "accuracy" type: ACCURACY bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }}
}}
layers {{ name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss" }}
"""
INPUT_SHAPE = """
input: "data" input_shape { dim: 4 dim: 1 dim: 28 dim: 28 }
input: "label" input_shape { dim: 4 }
"""
INPUT_DIM = """
input: "data" input_dim: 4 input_dim: 1 input_dim: 28 input_dim: 28
input: "label" input_dim: 4 input_dim: 1 input_dim: 1 input_dim: 1
"""


def v1_lenet(inputs=INPUT_SHAPE):
    return V1_LENET.format(inputs=inputs)


def canonical(param):
    """Text of a NetParameter with float formatting differences removed."""
    return text_format.MessageToString(parse_net(text_format.MessageToString(param)))


# --- V1 nets -------------------------------------------------------------------------------


@needs_golden(LENET)
def test_v1_lenet_upgrades_to_the_golden_prototxt(caplog):
    v1 = parse_net(v1_lenet())
    with caplog.at_level(logging.WARNING, logger="engine"):
        new = upgrade.upgrade_net_param(v1, "lenet_v1.prototxt")
    assert new is not v1 and len(v1.layers) == 9  # the input is left alone
    assert not new.layers and not new.input and not new.input_shape
    ref = io.read_prototxt(LENET / "net.prototxt")
    assert canonical(new) == canonical(ref)
    messages = [r.getMessage() for r in caplog.records]
    assert any("lenet_v1.prototxt" in m and "V1" in m for m in messages)
    assert any("lenet_v1.prototxt" in m and "Input layer" in m for m in messages)
    assert all("upgrade_net_proto_text" in m for m in messages)


def test_v1_param_specs_and_rules():
    v1 = parse_net("""
        layers {
          name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
          param: "shared_w" param: ""
          blob_share_mode: PERMISSIVE
          blobs_lr: 0.5 blobs_lr: 3
          weight_decay: 2 weight_decay: 0
          loss_weight: 0.25
          inner_product_param { num_output: 3 axis: 2 }
          include { phase: TRAIN stage: "s" } exclude { min_level: 2 }
        }
        layers { name: "th" type: THRESHOLD bottom: "y" top: "z" threshold_param { threshold: 2 } }
        layers { name: "d" type: DATA top: "x" data_param { source: "db" batch_size: 3 }
                 transform_param { mean_value: 4 } }""")
    new = upgrade.upgrade_net_param(v1, "t.prototxt")
    ip, th, data = new.layer
    assert (ip.type, th.type, data.type) == ("InnerProduct", "Threshold", "Data")
    assert [p.name for p in ip.param] == ["shared_w", ""]
    assert ip.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert not ip.param[1].HasField("share_mode")
    assert [p.lr_mult for p in ip.param] == [0.5, 3.0]
    assert [p.decay_mult for p in ip.param] == [2.0, 0.0]
    assert list(ip.loss_weight) == [0.25]
    assert ip.inner_product_param.num_output == 3 and ip.inner_product_param.axis == 2
    assert ip.include[0].phase == caffe_pb2.TRAIN and list(ip.include[0].stage) == ["s"]
    assert ip.exclude[0].min_level == 2
    assert th.threshold_param.threshold == 2
    assert data.data_param.batch_size == 3 and list(data.transform_param.mean_value) == [4]


def test_every_v1_type_maps_to_a_current_name():
    names = set(caffe_pb2.V1LayerParameter.LayerType.keys()) - {"NONE"}
    assert names == set(upgrade.V1_LAYER_TYPES)
    # Names of layers the catalog implements must match its registry exactly.
    registered = set(registered_types())
    for v1_name, new_name in upgrade.V1_LAYER_TYPES.items():
        if new_name.lower() in {t.lower() for t in registered}:
            assert new_name in registered, (v1_name, new_name)


def test_v1_errors_name_file_and_layer():
    problems = []
    untyped = parse_net('layers { name: "nameless" top: "x" }')
    assert upgrade.upgrade_net_param(untyped, "bad.prototxt", problems).layer[0].type == ""
    assert problems == ["bad.prototxt: V1 layer 'nameless': has no layer type"]
    mixed = parse_net('layer { name: "a" type: "Input" } layers { name: "b" type: RELU }')
    with pytest.raises(upgrade.UpgradeError, match=r"mixed\.prototxt.*both 'layer'"):
        upgrade.upgrade_net_param(mixed, "mixed.prototxt")


def set_inputs(net, arrays):
    for key, value in arrays.items():
        if key.startswith("input/"):
            blob = net.blobs[key[len("input/") :]]
            blob.data[...] = value.reshape(blob.shape)


@needs_golden(LENET)
@needs_layers("Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss")
@pytest.mark.parametrize("inputs", [INPUT_SHAPE, INPUT_DIM], ids=["input_shape", "input_dim"])
def test_v1_lenet_matches_its_new_format_twin_and_caffe(tmp_path, inputs):
    """Build the V1 LeNet and the golden new-format one, load the same weights, and compare
    outputs and gradients with each other (identical) and with Caffe's (golden tolerances)."""
    meta, arrays = golden.load_case(LENET)
    path = tmp_path / "lenet_v1.prototxt"
    path.write_text(v1_lenet(inputs))
    weights = str(LENET / "weights.caffemodel")
    old = engine.Net(str(path), engine.TRAIN, weights=weights)
    new = engine.Net(str(LENET / "net.prototxt"), engine.TRAIN, weights=weights)
    assert old.layer_names == new.layer_names
    assert old.inputs == new.inputs == ["data", "label"]
    assert [p.shape for p in old.learnable_params] == [p.shape for p in new.learnable_params]
    for net in (old, new):
        set_inputs(net, arrays)
        net.clear_param_diffs()
        net.forward()
        net.backward()
    for name in ("conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "loss"):
        np.testing.assert_array_equal(old.blobs[name].data, new.blobs[name].data, err_msg=name)
        key = f"output/{name}"
        rtol, atol = golden.tolerance(meta, key)
        golden.assert_close(old.blobs[name].data, arrays[key], rtol, atol, key)
    np.testing.assert_array_equal(old.blobs["data"].diff, new.blobs["data"].diff)
    key = "bottom_diff/data"
    golden.assert_close(old.blobs["data"].diff, arrays[key], *golden.tolerance(meta, key), key)
    for layer, blobs in old.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_array_equal(blob.diff, new.params[layer][i].diff)
            key = f"param_diff/{layer}/{i}"
            if key in arrays:
                golden.assert_close(blob.diff, arrays[key], *golden.tolerance(meta, key), key)
    assert old.params_lr == new.params_lr == [1.0, 2.0] * 4


# --- V1 caffemodels ---------------------------------------------------------------------------


def v1_caffemodel(new_param):
    """A NetParameter in the V1 `layers` form, with legacy 4-d blob shapes (num, channels,
    height, width) as V1-era .caffemodel files stored them."""
    to_v1 = {name: v1 for v1, name in upgrade.V1_LAYER_TYPES.items()}
    out = caffe_pb2.NetParameter(name=new_param.name)
    for lp in new_param.layer:
        if lp.type not in to_v1:  # the Input layer: V1 nets had net-level inputs instead
            continue
        v1 = out.layers.add(name=lp.name, bottom=lp.bottom, top=lp.top)
        v1.type = caffe_pb2.V1LayerParameter.LayerType.Value(to_v1[lp.type])
        for blob in lp.blobs:
            arr = io.blobproto_to_array(blob)
            legacy = v1.blobs.add()
            legacy.num, legacy.channels, legacy.height, legacy.width = (1,) * (
                4 - arr.ndim
            ) + arr.shape
            legacy.data.extend(blob.data)
    return out


@needs_golden(LENET)
def test_v1_caffemodel_upgrades_to_the_same_weights(tmp_path):
    ref = io.read_binary(LENET / "weights.caffemodel", caffe_pb2.NetParameter())
    old = v1_caffemodel(ref)
    assert len(old.layers) == len(ref.layer) - 1 and not old.layer
    path = tmp_path / "lenet_v1.caffemodel"
    io.write_binary(path, old)
    new = upgrade.upgrade_net_param(io.read_binary(path, caffe_pb2.NetParameter()), str(path))
    assert [lp.name for lp in new.layer] == [lp.name for lp in ref.layer][1:]
    assert [lp.type for lp in new.layer if lp.blobs] == [lp.type for lp in ref.layer if lp.blobs]
    for a, b in zip(new.layer, ref.layer[1:]):
        for x, y in zip(a.blobs, b.blobs):
            assert io.blobproto_to_array(x).size == io.blobproto_to_array(y).size
            np.testing.assert_array_equal(np.asarray(x.data), np.asarray(y.data))


@needs_golden(LENET)
@needs_layers("Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss")
def test_v1_caffemodel_loads_with_copy_from(tmp_path, caplog):
    ref = io.read_binary(LENET / "weights.caffemodel", caffe_pb2.NetParameter())
    path = tmp_path / "lenet_v1.caffemodel"
    io.write_binary(path, v1_caffemodel(ref))
    net = engine.Net(str(LENET / "net.prototxt"), engine.TRAIN)
    with caplog.at_level(logging.WARNING, logger="engine"):
        net.copy_from(str(path))
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert any("upgrade_net_proto_binary" in r.getMessage() for r in caplog.records)
    for lp in ref.layer:
        for i, blob in enumerate(lp.blobs):
            np.testing.assert_array_equal(
                net.params[lp.name][i].data, io.blobproto_to_array(blob), err_msg=lp.name
            )


@needs_golden(LENET)
def test_upgrade_net_proto_binary_tool(tmp_path, capsys):
    ref = io.read_binary(LENET / "weights.caffemodel", caffe_pb2.NetParameter())
    src, dst = tmp_path / "old.caffemodel", tmp_path / "new.caffemodel"
    io.write_binary(src, v1_caffemodel(ref))
    assert upgrade_net_proto_binary.main([str(src), str(dst)]) == 0
    assert "upgraded" in capsys.readouterr().out
    out = io.read_binary(dst, caffe_pb2.NetParameter())
    assert not out.layers and [lp.name for lp in out.layer] == [lp.name for lp in ref.layer][1:]
    assert not upgrade.net_needs_upgrade(out)
    # Already current: written unchanged.
    again = tmp_path / "again.caffemodel"
    assert upgrade_net_proto_binary.main([str(dst), str(again)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert again.read_bytes() == dst.read_bytes()


# --- V0 nets ---------------------------------------------------------------------------------

# A V0 net with two padding layers (one before a conv, one before a pool).
V0_NET = """
name: "v0"
input: "data" input_dim: 2 input_dim: 3 input_dim: 7 input_dim: 7
layers {
  layer { name: "pad1" type: "padding" pad: 2 }
  bottom: "data" top: "pad1"
}
layers {
  layer {
    name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 group: 1
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 }
    blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers {
  layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
  bottom: "pad2" top: "pool1"
}
layers {
  layer { name: "fc" type: "innerproduct" num_output: 5 biasterm: false
          weight_filler { type: "gaussian" std: 0.1 } }
  bottom: "pool1" top: "fc"
}
"""

V0_TWIN = """
name: "v0"
layer {
  name: "input" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 7 dim: 7 } }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 4 pad: 2 kernel_size: 3 group: 1 stride: 2
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 }
  }
}
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }
}
layer {
  name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 bias_term: false weight_filler { type: "gaussian" std: 0.1 } }
}
"""


def test_v0_net_folds_padding_and_upgrades(caplog):
    with caplog.at_level(logging.WARNING, logger="engine"):
        new = upgrade.upgrade_net_param(parse_net(V0_NET), "old_v0.prototxt")
    assert canonical(new) == canonical(parse_net(V0_TWIN))
    assert any(
        "old_v0.prototxt" in r.getMessage() and "V0" in r.getMessage() for r in caplog.records
    )


@needs_layers("Convolution", "Pooling", "InnerProduct", "ReLU")
def test_v0_net_runs_like_its_twin():
    rng = np.random.default_rng(3)
    old = engine.Net(parse_net(V0_NET), engine.TEST)
    new = engine.Net(parse_net(V0_TWIN), engine.TEST)
    assert old.blobs["pool1"].shape == new.blobs["pool1"].shape == (2, 4, 3, 3)
    for name, blobs in new.params.items():
        for a, b in zip(old.params[name], blobs):
            a.data[...] = b.data[...] = rng.standard_normal(b.shape)
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    out_old, out_new = old.forward(data=x)["fc"].copy(), new.forward(data=x)["fc"].copy()
    np.testing.assert_array_equal(out_old, out_new)
    g = rng.standard_normal(out_new.shape).astype(np.float32)
    for net in (old, new):
        net.clear_param_diffs()
        net.blobs["fc"].diff[...] = g
        net.backward()
    for name, blobs in new.params.items():
        for a, b in zip(old.params[name], blobs):
            np.testing.assert_array_equal(a.diff, b.diff)


def test_v0_data_layer_fields():
    v0 = parse_net("""
        layers { layer { name: "d" type: "data" source: "train_db" batchsize: 16 rand_skip: 3
                         scale: 0.5 meanfile: "mean.binaryproto" cropsize: 11 mirror: true }
                 top: "data" top: "label" }
        layers { layer { name: "img" type: "images" source: "list.txt" batchsize: 2
                         new_height: 8 new_width: 9 shuffle_images: true }
                 top: "im" top: "l2" }
        layers { layer { name: "w" type: "window_data" det_fg_threshold: 0.7 det_crop_mode: "square"
                         det_context_pad: 4 } top: "win" top: "l3" }
        layers { layer { name: "n" type: "lrn" local_size: 3 alpha: 2 beta: 0.5 k: 2 }
                 bottom: "data" top: "n" }
        layers { layer { name: "c" type: "concat" concat_dim: 0 } bottom: "n" bottom: "n" top: "c" }
        layers { layer { name: "dr" type: "dropout" dropout_ratio: 0.25 } bottom: "c" top: "c" }
        layers { layer { name: "o" type: "hdf5_output" hdf5_output_param { file_name: "o.h5" } }
                 bottom: "c" }""")
    d, img, w, n, c, dr, o = upgrade.upgrade_net_param(v0, "v0.prototxt").layer
    assert d.type == "Data" and d.data_param.source == "train_db"
    assert d.data_param.batch_size == 16 and d.data_param.rand_skip == 3
    t = d.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.5, "mean.binaryproto", 11, True)
    assert not d.data_param.HasField("scale")
    assert img.type == "ImageData" and img.image_data_param.shuffle
    assert (img.image_data_param.new_height, img.image_data_param.new_width) == (8, 9)
    wp = w.window_data_param
    assert w.type == "WindowData" and wp.crop_mode == "square" and wp.context_pad == 4
    assert wp.fg_threshold == pytest.approx(0.7)
    assert n.type == "LRN" and (n.lrn_param.local_size, n.lrn_param.k) == (3, 2)
    assert c.type == "Concat" and c.concat_param.concat_dim == 0
    assert dr.type == "Dropout" and dr.dropout_param.dropout_ratio == 0.25
    assert o.type == "HDF5Output" and o.hdf5_output_param.file_name == "o.h5"


def test_v0_problems_and_errors(caplog):
    stray = parse_net(
        'layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "x" top: "x" }'
    )
    problems = []
    with caplog.at_level(logging.ERROR, logger="engine"):
        new = upgrade.upgrade_net_param(stray, "stray.prototxt", problems)
    assert new.layer[0].type == "ReLU"
    assert len(problems) == 1 and "stray.prototxt" in problems[0] and "'r'" in problems[0]
    assert "num_output" in problems[0] and any(
        "num_output" in r.getMessage() for r in caplog.records
    )

    bad_pad = parse_net("""
        layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "px" }
        layers { layer { name: "r" type: "relu" } bottom: "px" top: "y" }""")
    with pytest.raises(upgrade.UpgradeError, match=r"pad\.prototxt: V0 layer 'r'.*padding"):
        upgrade.upgrade_net_param(bad_pad, "pad.prototxt")
    unknown = parse_net('layers { layer { name: "q" type: "quux" } }')
    with pytest.raises(upgrade.UpgradeError, match=r"u\.prototxt: V0 layer 'q'.*'quux'"):
        upgrade.upgrade_net_param(unknown, "u.prototxt")


def test_upgrade_net_proto_text_tool(tmp_path, capsys):
    src, dst = tmp_path / "old.prototxt", tmp_path / "new.prototxt"
    src.write_text(V0_NET)
    assert upgrade_net_proto_text.main([str(src), str(dst)]) == 0
    assert canonical(io.read_prototxt(dst)) == canonical(parse_net(V0_TWIN))
    # Problems are reported with a non-zero status, the file is still written.
    src.write_text('layers { layer { name: "r" type: "relu" kernelsize: 3 } bottom: "x" top: "x" }')
    assert upgrade_net_proto_text.main([str(src), str(dst)]) == 1
    assert "1 problem" in capsys.readouterr().err
    assert io.read_prototxt(dst).layer[0].type == "ReLU"
    # A file that does not parse: the error names it.
    src.write_text("layers { bogus: 1 }")
    assert upgrade_net_proto_text.main([str(src), str(dst)]) == 1
    assert str(src) in capsys.readouterr().err


def test_tool_runs_as_a_module(tmp_path):
    src, dst = tmp_path / "old.prototxt", tmp_path / "new.prototxt"
    src.write_text(v1_lenet())
    run = subprocess.run(
        [sys.executable, "-m", "engine.tools.upgrade_net_proto_text", str(src), str(dst)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert str(src) in run.stderr  # the logged warning names the file
    new = io.read_prototxt(dst)
    assert [lp.type for lp in new.layer][:2] == ["Input", "Convolution"]


# --- data transform, inputs, BatchNorm ----------------------------------------------------------


def test_data_transform_fields_move_to_transform_param():
    v1 = parse_net("""
        layers { name: "d" type: DATA top: "x"
                 data_param { source: "db" batch_size: 4 scale: 0.25 mean_file: "m" mirror: true } }
        layers { name: "i" type: IMAGE_DATA top: "y"
                 image_data_param { source: "l" crop_size: 5 } transform_param { scale: 2 } }""")
    assert upgrade.net_needs_data_upgrade(v1)
    d, i = upgrade.upgrade_net_param(v1, "d.prototxt").layer
    assert (d.transform_param.scale, d.transform_param.mean_file) == (0.25, "m")
    assert d.transform_param.mirror and not d.data_param.HasField("mirror")
    assert d.data_param.source == "db" and d.data_param.batch_size == 4
    assert i.transform_param.crop_size == 5 and i.transform_param.scale == 2
    # Current-format layers are upgraded the same way (Caffe would ignore the fields).
    new = parse_net('layer { name: "d" type: "Data" top: "x" data_param { crop_size: 3 } }')
    assert upgrade.upgrade_net_param(new, "n.prototxt").layer[0].transform_param.crop_size == 3


def test_input_upgrade_and_errors():
    net = parse_net("""
        input: "a" input: "b"
        input_shape { dim: 2 dim: 3 } input_shape { dim: 2 }
        layer { name: "r" type: "ReLU" bottom: "a" top: "a" }""")
    new = upgrade.upgrade_net_param(net, "in.prototxt")
    assert [lp.name for lp in new.layer] == ["input", "r"]
    assert list(new.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in new.layer[0].input_param.shape] == [[2, 3], [2]]
    cases = {
        'input: "a" input: "b" input_shape { dim: 1 }': "one input_shape must be given per input",
        'input: "a" input_dim: 1 input_dim: 2': "input_dim needs 4 values per input",
        'input: "a"': "no input_shape or input_dim",
        'input: "a" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1 input_shape { dim: 1 }': (
            "either input_shape or input_dim"
        ),
    }
    for text, message in cases.items():
        with pytest.raises(upgrade.UpgradeError, match=rf"in\.prototxt: .*{message}"):
            upgrade.upgrade_net_param(parse_net(text), "in.prototxt")


@needs_layers("BatchNorm")
def test_batchnorm_param_specs_are_frozen():
    old = parse_net("""
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y"
                param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 0 } param { } }""")
    assert upgrade.net_needs_batchnorm_upgrade(old)
    new = upgrade.upgrade_net_param(old, "bn.prototxt")
    assert [(p.lr_mult, p.decay_mult) for p in new.layer[1].param] == [(0, 0)] * 3
    assert not upgrade.net_needs_upgrade(new)
    net = engine.Net(old, engine.TRAIN)
    assert net.params_lr == [0.0, 0.0, 0.0]


def test_current_nets_are_returned_unchanged():
    for path in sorted((ROOT / "conf").glob("*/*.prototxt")):
        if "solver" in path.name:
            continue
        param = io.read_prototxt(path)
        assert not upgrade.net_needs_upgrade(param), path
        assert upgrade.upgrade_net_param(param, str(path)) is param


# --- solvers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "enum,name", list(upgrade.SOLVER_TYPES.items()), ids=list(upgrade.SOLVER_TYPES.values())
)
def test_solver_type_enum_becomes_type_string(enum, name, caplog):
    old = caffe_pb2.SolverParameter(base_lr=0.5, solver_type=enum)
    with caplog.at_level(logging.WARNING, logger="engine"):
        new = upgrade.upgrade_solver_param(old, "s.prototxt")
    assert new.type == name and not new.HasField("solver_type") and new.base_lr == 0.5
    assert any("s.prototxt" in r.getMessage() for r in caplog.records)
    assert upgrade.upgrade_solver_param(new, "s.prototxt") is new


def test_solver_type_conflict_is_an_error():
    both = caffe_pb2.SolverParameter(type="Adam", solver_type=caffe_pb2.SolverParameter.ADAM)
    assert upgrade.upgrade_solver_param(both, "s.prototxt").type == "Adam"
    both.type = "SGD"
    with pytest.raises(upgrade.UpgradeError, match=r"s\.prototxt: .*ADAM.*'SGD' disagree"):
        upgrade.upgrade_solver_param(both, "s.prototxt")


def test_solver_with_embedded_v1_net_and_tool(tmp_path):
    src, dst = tmp_path / "solver.prototxt", tmp_path / "solver_new.prototxt"
    src.write_text(
        'solver_type: NESTEROV base_lr: 0.01 net_param { layers { name: "r" type: RELU '
        'bottom: "x" top: "x" } } test_net_param { input: "x" input_dim: 1 input_dim: 1 '
        "input_dim: 1 input_dim: 1 }\n"
    )
    assert upgrade_solver_proto_text.main([str(src), str(dst)]) == 0
    new = io.read_prototxt(dst, caffe_pb2.SolverParameter())
    assert new.type == "Nesterov" and not new.HasField("solver_type")
    assert new.net_param.layer[0].type == "ReLU" and not new.net_param.layers
    assert new.test_net_param[0].layer[0].type == "Input"
    assert not upgrade.solver_needs_upgrade(new)
