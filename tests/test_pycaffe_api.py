"""pycaffe API parity of engine.Net, the solvers and engine.classifier: batched runs, name
maps, callbacks, weight sharing, HDF5 weights, Classifier and Detector."""

import collections

import h5py
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

import engine
from engine.classifier import Classifier, Detector
from engine.layer import LayerError
from engine.preprocess import load_image, resize_image
from engine.proto import caffe_pb2
from engine.solvers import get_solver


def make_net(text, phase=engine.TEST, seed=5):
    engine.set_random_seed(seed)
    return engine.Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase)


# A per-sample net: 4 x 3 in, 4 x 2 out (the batch size is 4).
LINEAR = """
name: "linear"
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "scale" type: "Power" bottom: "h" top: "y" power_param { scale: 2 } }
"""


def test_forward_all_matches_per_batch_forward():
    net = make_net(LINEAR)
    rs = np.random.RandomState(0)
    x = rs.standard_normal((10, 3)).astype(np.float32)  # 2.5 batches of 4
    out = net.forward_all(blobs=["h"], x=x)
    assert set(out) == {"y", "h"}
    assert out["y"].shape == (10, 2) and out["h"].shape == (10, 2)
    padded = np.concatenate([x, np.zeros((2, 3), np.float32)])
    for b in range(3):
        ref = net.forward(blobs=["h"], x=padded[4 * b : 4 * b + 4])
        n = min(4, 10 - 4 * b)
        np.testing.assert_array_equal(out["y"][4 * b : 4 * b + n], ref["y"][:n])
        np.testing.assert_array_equal(out["h"][4 * b : 4 * b + n], ref["h"][:n])
    # Order and values per item, against the layer maths.
    w, bias = net.params["ip"][0].data, net.params["ip"][1].data
    np.testing.assert_allclose(out["y"], 2 * (x @ w.T + bias), rtol=1e-5, atol=1e-5)
    # The results are copies, not views of the net's blobs.
    before = out["y"].copy()
    net.forward(x=np.zeros((4, 3), np.float32))
    np.testing.assert_array_equal(out["y"], before)


def test_forward_all_exact_batches_and_errors():
    net = make_net(LINEAR)
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    assert net.forward_all(x=x)["y"].shape == (8, 2)
    assert net.forward_all(x=x[:0])["y"].shape == (0, 2)
    with pytest.raises(ValueError, match="keyword arrays"):
        net.forward_all()
    with pytest.raises(KeyError, match="nope"):
        net.forward_all(nope=x)


def test_batch_pads_last_batch_with_zeros():
    net = make_net(LINEAR)
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    batches = list(net._batch({"x": x}))
    assert [b["x"].shape for b in batches] == [(4, 3), (4, 3)]
    np.testing.assert_array_equal(batches[0]["x"], x[:4])
    np.testing.assert_array_equal(batches[1]["x"], [x[4], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="differ in length"):
        list(net._batch({"x": x, "y": x[:3]}))


def test_forward_backward_all():
    net = make_net(LINEAR)
    rs = np.random.RandomState(1)
    x = rs.standard_normal((6, 3)).astype(np.float32)
    dy = rs.standard_normal((6, 2)).astype(np.float32)
    outs, diffs = net.forward_backward_all(x=x, y=dy)
    w, bias = net.params["ip"][0].data, net.params["ip"][1].data
    assert outs["y"].shape == (6, 2) and diffs["x"].shape == (6, 3)
    np.testing.assert_allclose(outs["y"], 2 * (x @ w.T + bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(diffs["x"], 2 * dy @ w, rtol=1e-5, atol=1e-5)
    outs, diffs = net.forward_backward_all(blobs=["h"], diffs=["h"], x=x, y=dy)
    np.testing.assert_allclose(diffs["h"], 2 * dy, rtol=1e-6)
    np.testing.assert_allclose(outs["h"], x @ w.T + bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="neither"):
        net.forward_backward_all(x=x, h=dy)


LOSSES = """
name: "losses"
layer { name: "in" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }
layer { name: "loss2" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss2"
        loss_weight: 0.5 }
"""


def test_blob_loss_weights_is_ordered_dict_by_blob():
    net = make_net(LOSSES, phase=engine.TRAIN)
    weights = net.blob_loss_weights
    assert isinstance(weights, collections.OrderedDict)
    assert list(weights) == net._blob_names == net.blob_names
    assert weights["loss"] == 1.0 and weights["loss2"] == 0.5
    assert weights["x"] == weights["y"] == weights["label"] == 0.0
    assert list(weights.values()) == net._blob_loss_weights


SPLIT = """
name: "split"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "a" type: "InnerProduct" bottom: "ip" top: "a" inner_product_param { num_output: 2 } }
layer { name: "b" type: "InnerProduct" bottom: "ip" top: "b" inner_product_param { num_output: 2 } }
"""


def test_top_and_bottom_names_show_the_built_net():
    # Caffe's top_names/bottom_names come from top_id_vecs_/bottom_id_vecs_ after
    # InsertSplits: the auto-inserted split layer and its blobs appear; in-place keeps names.
    net = make_net(SPLIT)
    split = "ip_relu_0_split"
    assert net.top_names == collections.OrderedDict(
        [
            ("data", ["data"]),
            ("ip", ["ip"]),
            ("relu", ["ip"]),
            (split, [f"{split}_0", f"{split}_1"]),
            ("a", ["a"]),
            ("b", ["b"]),
        ]
    )
    assert net.bottom_names == collections.OrderedDict(
        [
            ("data", []),
            ("ip", ["data"]),
            ("relu", ["ip"]),
            (split, ["ip"]),
            ("a", [f"{split}_0"]),
            ("b", [f"{split}_1"]),
        ]
    )
    ids = {n: i for i, n in enumerate(net._blob_names)}
    assert net._top_ids(3) == [ids[f"{split}_0"], ids[f"{split}_1"]]
    assert net._bottom_ids(4) == [ids[f"{split}_0"]]
    assert net._inputs == [ids["data"]] and net.inputs == ["data"]
    assert net._outputs == [ids["a"], ids["b"]] and net.outputs == ["a", "b"]
    # forward(end=...) returns that layer's tops.
    assert set(net.forward(end=split)) == {f"{split}_0", f"{split}_1"}


def test_layer_type_strings():
    # Needs engine.layer.Layer.type (the lead's): pycaffe's layer.type is the Caffe type name.
    net = make_net(SPLIT)
    assert [layer.type for layer in net.layers] == [
        "Input",
        "InnerProduct",
        "ReLU",
        "Split",
        "InnerProduct",
        "InnerProduct",
    ]


def test_callbacks_fire_in_order_with_layer_indices():
    net = make_net(SPLIT)
    events = []
    net.before_forward(lambda i: events.append(("bf", i)))
    net.after_forward(lambda i: events.append(("af", i)))
    net.after_forward(lambda i: events.append(("af2", i)))
    net.before_backward(lambda i: events.append(("bb", i)))
    net.after_backward(lambda i: events.append(("ab", i)))
    net.forward()
    assert events == [e for i in range(6) for e in (("bf", i), ("af", i), ("af2", i))]
    events.clear()
    net.backward()  # every layer, even those that need no backward, as in Caffe
    assert events == [e for i in range(5, -1, -1) for e in (("bb", i), ("ab", i))]
    events.clear()
    net.forward(start="relu", end="a")
    assert [i for tag, i in events if tag == "bf"] == [2, 3, 4]
    events.clear()
    net.forward_backward()  # what the solver runs
    assert events[0] == ("bf", 0) and events[-1] == ("ab", 0)


def test_share_with_shares_data_not_diffs():
    src = make_net(LINEAR, seed=1)
    dst = make_net(LINEAR, seed=2)
    assert not np.array_equal(src.params["ip"][0].data, dst.params["ip"][0].data)
    dst.share_with(src)
    for a, b in zip(dst.params["ip"], src.params["ip"]):
        assert a is not b and a.data is b.data and a.diff is not b.diff
    src.params["ip"][0].data[...] += 1.0  # a training update shows through
    np.testing.assert_array_equal(dst.params["ip"][0].data, src.params["ip"][0].data)
    src.params["ip"][0].diff[...] = 0
    dst.forward(x=np.ones((4, 3), np.float32))
    dst.backward(y=np.ones((4, 2), np.float32))
    assert np.abs(dst.params["ip"][0].diff).sum() > 0
    assert np.abs(src.params["ip"][0].diff).sum() == 0
    other = make_net(LINEAR.replace("num_output: 2", "num_output: 5"))
    with pytest.raises(LayerError, match="shape mismatch"):
        dst.share_with(other)


SHARED = """
name: "shared"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h1"
        param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h1" top: "h2"
        param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 } }
"""


def test_save_and_load_hdf5(tmp_path):
    net = make_net(SHARED, seed=1)
    for blob in net.params["ip1"]:
        blob.diff[...] = 0.25
    path = tmp_path / "w.h5"
    net.save_hdf5(str(path), write_diff=True)
    with h5py.File(path, "r") as f:
        assert set(f) == {"data", "diff"}
        assert list(f["data"]) == ["in", "ip1", "ip2"]
        np.testing.assert_array_equal(f["data/ip1/0"][()], net.params["ip1"][0].data)
        assert list(f["data/ip2"]) == []  # shared params are saved under their owner only
        assert list(f["diff/ip2"]) == ["0", "1"]
        np.testing.assert_array_equal(f["diff/ip1/1"][()], np.full(3, 0.25, np.float32))
    fresh = make_net(SHARED, seed=2)
    assert not np.array_equal(fresh.params["ip1"][0].data, net.params["ip1"][0].data)
    fresh.load_hdf5(str(path))
    for a, b in zip(fresh.params["ip2"], net.params["ip2"]):
        np.testing.assert_array_equal(a.data, b.data)
    # copy_from recognises HDF5 by content, as Caffe's CopyTrainedLayersFrom does.
    again = make_net(SHARED, seed=3)
    again.copy_from(str(path))
    np.testing.assert_array_equal(again.params["ip1"][1].data, net.params["ip1"][1].data)
    wrong = make_net(LINEAR.replace('name: "ip"', 'name: "ip1"'))  # ip1 weights 2 x 3
    with pytest.raises(LayerError, match="shape mismatch"):
        wrong.load_hdf5(str(path))


def test_load_hdf5_missing_unshared_param_fails(tmp_path):
    net = make_net(LINEAR)
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip/0", data=np.zeros((2, 3), np.float32))
    with pytest.raises(LayerError, match="no dataset 1"):
        net.load_hdf5(str(path))


TINY_SOLVER_NET = """
name: "tiny"
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def _tiny_solver(tmp_path):
    (tmp_path / "net.prototxt").write_text(TINY_SOLVER_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
        'max_iter: 3\ndisplay: 0\nrandom_seed: 3\nsnapshot_prefix: "s"\n'
    )
    solver = get_solver(str(tmp_path / "solver.prototxt"))
    rs = np.random.RandomState(0)
    solver.net.blobs["x"].data[...] = rs.standard_normal((4, 3))
    solver.net.blobs["t"].data[...] = rs.standard_normal((4, 2))
    return solver


def test_solver_pycaffe_callbacks_take_no_arguments(tmp_path):
    solver = _tiny_solver(tmp_path)
    seen = []
    solver.add_callback(
        lambda: seen.append(("start", solver.iter)), lambda: seen.append(("ready", solver.iter))
    )
    solver.step(2)
    assert seen == [("start", 0), ("ready", 0), ("start", 1), ("ready", 1)]
    assert solver.iter == 2 and isinstance(solver.param, caffe_pb2.SolverParameter)
    assert solver.test_nets == []


def test_solver_share_weights_and_apply_update(tmp_path):
    solver = _tiny_solver(tmp_path)
    deploy = make_net(TINY_SOLVER_NET, seed=9)
    solver.share_weights(deploy)
    w = solver.net.params["ip"][0]
    assert deploy.params["ip"][0].data is w.data
    solver.net.forward_backward()
    before = w.data.copy()
    grad = w.diff.copy()
    solver.apply_update()  # SGD, lr 0.1, no momentum or decay
    np.testing.assert_allclose(w.data, before - 0.1 * grad, rtol=1e-6)
    np.testing.assert_array_equal(deploy.params["ip"][0].data, w.data)


# --- Classifier and Detector ---------------------------------------------------------------

DEPLOY = """
name: "tiny_classifier"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 }
                              bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

MEAN = np.array([100.0, 120.0, 90.0], np.float32)  # per channel, in the net's BGR order


@pytest.fixture
def deploy_files(tmp_path):
    model = tmp_path / "deploy.prototxt"
    model.write_text(DEPLOY)
    engine.set_random_seed(11)
    net = engine.Net(str(model), engine.TEST)
    weights = tmp_path / "tiny.caffemodel"
    net.save(str(weights))
    w, b = (p.data.copy() for p in net.params["fc"])
    return model, weights, w, b


def _hand_probs(crop, w, b, input_scale=0.5):
    """Preprocess an 8 x 8 x 3 RGB [0, 1] crop as pycaffe's Transformer would, then fc+softmax."""
    x = crop.transpose(2, 0, 1)[[2, 1, 0]] * 255.0 - MEAN[:, None, None]
    logits = w @ (x * input_scale).ravel() + b
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_classifier_centre_crop_and_oversample(deploy_files):
    model, weights, w, b = deploy_files
    clf = Classifier(
        str(model),
        str(weights),
        image_dims=(10, 10),
        mean=MEAN,
        input_scale=0.5,
        raw_scale=255,
        channel_swap=(2, 1, 0),
    )
    rs = np.random.RandomState(4)
    images = [rs.random_sample(s).astype(np.float32) for s in [(12, 9, 3), (10, 10, 3), (7, 13, 3)]]
    resized = [resize_image(im, (10, 10)) for im in images]

    centre = clf.predict(images, oversample=False)
    expected = [_hand_probs(r[1:9, 1:9], w, b) for r in resized]  # centre 5 -/+ 4
    assert centre.shape == (3, 5)
    np.testing.assert_allclose(centre, expected, rtol=1e-4, atol=1e-6)

    over = clf.predict(images)  # 30 crops through a batch-2 net
    expected = []
    for r in resized:
        crops = [r[y : y + 8, x : x + 8] for y, x in [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]]
        crops += [c[:, ::-1] for c in crops]
        expected.append(np.mean([_hand_probs(c, w, b) for c in crops], axis=0))
    assert over.shape == (3, 5)
    np.testing.assert_allclose(over, expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(over, centre, atol=1e-4)


def test_classifier_defaults_to_input_size(deploy_files):
    model, weights, w, b = deploy_files
    clf = Classifier(str(model), str(weights), mean=MEAN, raw_scale=255, channel_swap=(2, 1, 0))
    assert tuple(clf.image_dims) == (8, 8) and tuple(clf.crop_dims) == (8, 8)
    image = np.random.RandomState(5).random_sample((8, 8, 3)).astype(np.float32)
    got = clf.predict([image], oversample=False)
    np.testing.assert_allclose(got[0], _hand_probs(image, w, b, 1.0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="image_dims"):
        Classifier(str(model), str(weights), image_dims=(6, 6))


def _png(path, rs, shape=(16, 16, 3)):
    Image.fromarray(rs.randint(0, 256, shape).astype(np.uint8)).save(path)
    return str(path)


def test_detector_windows(deploy_files, tmp_path):
    model, weights, w, b = deploy_files
    rs = np.random.RandomState(6)
    files = [_png(tmp_path / "a.png", rs), _png(tmp_path / "b.png", rs)]
    windows = [np.array([[0, 0, 8, 8], [2, 3, 14, 16]]), np.array([[4, 4, 12, 10]])]
    det = Detector(str(model), str(weights), mean=MEAN, raw_scale=255, channel_swap=(2, 1, 0))
    found = det.detect_windows(zip(files, windows))
    assert [(d["filename"], tuple(d["window"])) for d in found] == [
        (files[0], (0, 0, 8, 8)),
        (files[0], (2, 3, 14, 16)),
        (files[1], (4, 4, 12, 10)),
    ]
    for d in found:
        im = load_image(d["filename"])
        y0, x0, y1, x1 = d["window"]
        crop = resize_image(im[y0:y1, x0:x1], (8, 8))
        np.testing.assert_allclose(d["prediction"], _hand_probs(crop, w, b, 1.0), rtol=1e-4)


def test_detector_context_pad_crop(deploy_files):
    model, weights, _, _ = deploy_files
    det = Detector(
        str(model), str(weights), mean=MEAN, raw_scale=255, channel_swap=(2, 1, 0), context_pad=2
    )
    assert tuple(det.crop_dims) == (8, 8, 3)
    # The mean back in raw RGB space: channel order undone, raw scale divided out.
    np.testing.assert_allclose(det.crop_mean.ravel(), MEAN[::-1] / 255.0, rtol=1e-6)
    im = np.random.RandomState(7).random_sample((16, 16, 3)).astype(np.float32)
    # Window rows/cols 0..3: scale 8 / (8 - 4) = 2 -> box (-2, -2, 6, 6), 9 pixels for 8:
    # pad round(2 * 8/9) = 2, clipped box 0..6 -> crop round(7 * 8/9) = 6 rows of im[0:6].
    crop = det.crop(im, np.array([0, 0, 3, 3]))
    assert crop.shape == (8, 8, 3)
    np.testing.assert_allclose(crop[2:, 2:], im[0:6, 0:6], rtol=1e-6)
    np.testing.assert_allclose(crop[:2], np.broadcast_to(MEAN[::-1] / 255.0, (2, 8, 3)), rtol=1e-6)
    np.testing.assert_allclose(crop[:, :2], np.broadcast_to(MEAN[::-1] / 255.0, (8, 2, 3)), 1e-6)
    # Without context the window is cut as given.
    plain = Detector(str(model), str(weights))
    assert plain.crop(im, [1, 2, 5, 9]).shape == (4, 7, 3)
