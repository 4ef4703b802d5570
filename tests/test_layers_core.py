"""Core layers (Input, DummyData, neurons, Dropout, Softmax/Loss, Accuracy, shape ops, Eltwise,
EuclideanLoss, BatchNorm, Scale, Bias): hand-computed forwards, gradient checks, golden parity."""

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import rng
from engine.blob import Blob
from engine.layer import LayerError, create_layer
from engine.proto import caffe_pb2
from tests import golden
from tests.gradient_check import check_gradient, make_blobs

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
FLT_MIN = float(np.finfo(np.float32).tiny)


def make_layer(text, phase=TRAIN):
    return create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()), phase)


def tops(n=1):
    return [Blob() for _ in range(n)]


def randn(*shape, seed=0):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def run(layer, bottom, top):
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return top


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --- Input / DummyData --------------------------------------------------------------------------
def test_input_one_shape_per_top_and_shared_shape():
    layer = make_layer(
        'name: "in" type: "Input" top: "a" top: "b" '
        "input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }"
    )
    a, b = run(layer, [], tops(2))
    assert a.shape == (2, 3) and b.shape == (4,)
    layer = make_layer('name: "in" type: "Input" input_param { shape { dim: 5 dim: 1 } }')
    t = run(layer, [], tops(3))
    assert [x.shape for x in t] == [(5, 1)] * 3


def test_input_keeps_user_data_and_shape():
    layer = make_layer('name: "in" type: "Input" input_param { shape { dim: 2 dim: 3 } }')
    (t,) = top = run(layer, [], tops(1))
    t.reshape((4, 3))
    t.data[...] = 7.0
    layer.reshape([], top)
    layer.forward([], top)
    assert t.shape == (4, 3) and (t.data == 7.0).all()


def test_input_bad_shape_count():
    layer = make_layer('name: "in" type: "Input" input_param { shape { dim: 1 } shape { dim: 2 } }')
    with pytest.raises(LayerError, match="'in'"):
        layer.setup([], tops(3))


def test_dummy_data_constant_fills_once():
    layer = make_layer(
        'name: "d" type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
        'data_filler { type: "constant" value: 1.5 } }'
    )
    top = run(layer, [], tops(2))
    assert all(t.shape == (2, 3) and (t.data == 1.5).all() for t in top)
    top[0].data[...] = -4.0  # constant tops are not refilled: the write survives
    layer.reshape([], top)
    layer.forward([], top)
    assert (top[0].data == -4.0).all()


def test_dummy_data_default_zero_and_legacy_dims():
    layer = make_layer(
        'name: "d" type: "DummyData" dummy_data_param { num: 2 channels: 3 height: 4 width: 5 '
        "num: 1 channels: 1 height: 1 width: 7 }"
    )
    a, b = run(layer, [], tops(2))
    assert a.shape == (2, 3, 4, 5) and b.shape == (1, 1, 1, 7)
    assert not a.data.any() and not b.data.any()


def test_dummy_data_refills_random_per_top_fillers():
    layer = make_layer(
        'name: "d" type: "DummyData" dummy_data_param { shape { dim: 50 } shape { dim: 3 } '
        'data_filler { type: "uniform" min: 2 max: 3 } '
        'data_filler { type: "constant" value: 9 } }'
    )
    rng.set_random_seed(5)
    a, b = top = run(layer, [], tops(2))
    first = a.data.copy()
    assert ((first >= 2) & (first <= 3)).all() and (b.data == 9).all()
    b.data[...] = 0
    layer.forward([], top)
    assert not np.array_equal(first, a.data)  # refilled
    assert (b.data == 0).all()  # constant: filled at set-up only


def test_dummy_data_errors():
    with pytest.raises(LayerError, match="shape must be given"):
        make_layer(
            'name: "d" type: "DummyData" dummy_data_param { shape { dim: 1 } shape { dim: 2 } }'
        ).setup([], tops(3))
    with pytest.raises(LayerError, match="not both"):
        make_layer(
            'name: "d" type: "DummyData" dummy_data_param { shape { dim: 1 } num: 1 channels: 1 '
            "height: 1 width: 1 }"
        ).setup([], tops(1))


# --- neurons ----------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu(slope):
    layer = make_layer(f'name: "r" type: "ReLU" relu_param {{ negative_slope: {slope} }}')
    x = randn(2, 3, 4, 5)
    (y,) = run(layer, make_blobs(x), tops())
    close(y.data, np.where(x > 0, x, slope * x))
    layer = make_layer(f'name: "r" type: "ReLU" relu_param {{ negative_slope: {slope} }}')
    check_gradient(layer, make_blobs(x[:1, :2]), tops(), kink=0.0, kink_range=0.02)


def test_sigmoid_tanh():
    x = randn(2, 3, 4) * 3
    (y,) = run(make_layer('name: "s" type: "Sigmoid"'), make_blobs(x), tops())
    close(y.data, 1 / (1 + np.exp(-x.astype(np.float64))))
    (y,) = run(make_layer('name: "t" type: "TanH"'), make_blobs(x), tops())
    close(y.data, np.tanh(x))
    big = make_blobs(np.array([-200.0, 200.0], np.float32))
    (y,) = run(make_layer('name: "s" type: "Sigmoid"'), big, tops())
    close(y.data, [0.0, 1.0])
    check_gradient(make_layer('name: "s" type: "Sigmoid"'), make_blobs(x), tops())
    check_gradient(make_layer('name: "t" type: "TanH"'), make_blobs(x * 0.3), tops())


@pytest.mark.parametrize(
    "text",
    [
        'type: "ReLU" relu_param { negative_slope: 0.2 }',
        'type: "Sigmoid"',
        'type: "TanH"',
        'type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
        'type: "BatchNorm"',
        'type: "Scale" scale_param { bias_term: true filler { type: "uniform" } '
        'bias_filler { type: "gaussian" } }',
        'type: "Bias" bias_param { filler { type: "gaussian" } }',
    ],
)
def test_in_place_matches_out_of_place(text):
    """A layer whose top is its bottom gives the same data and gradients."""
    x, dy = randn(3, 4, 2, 3), randn(3, 4, 2, 3, seed=1)
    results = []
    for in_place in (False, True):
        rng.set_random_seed(11)
        layer = make_layer(f'name: "l" {text}')
        bottom = make_blobs(x)
        top = [bottom[0]] if in_place else tops()
        run(layer, bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        for p in layer.blobs:
            p.diff[...] = 0
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy(), [p.diff.copy() for p in layer.blobs]))
    (y0, dx0, dp0), (y1, dx1, dp1) = results
    close(y1, y0)
    close(dx1, dx0)
    for a, b in zip(dp0, dp1):
        close(a, b)


# --- Dropout ----------------------------------------------------------------------------------
def test_dropout_train_rule_and_gradient():
    p = 0.3
    layer = make_layer(f'name: "d" type: "Dropout" dropout_param {{ dropout_ratio: {p} }}')
    x = randn(20, 50) + 5.0  # no zero inputs
    rng.set_random_seed(2)
    bottom = make_blobs(x)
    (y,) = top = run(layer, bottom, tops())
    kept = y.data != 0
    close(y.data[kept], x[kept] / (1 - p))
    assert 0.25 < 1 - kept.mean() < 0.35
    dy = randn(20, 50, seed=3)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    close(bottom[0].diff, dy * kept / (1 - p))
    layer = make_layer(f'name: "d" type: "Dropout" dropout_param {{ dropout_ratio: {p} }}')
    check_gradient(layer, make_blobs(randn(2, 3, 4)), tops())


def test_dropout_test_is_identity():
    layer = make_layer('name: "d" type: "Dropout"', phase=TEST)
    x = randn(2, 3)
    bottom = make_blobs(x)
    (y,) = run(layer, bottom, tops())
    close(y.data, x, 0, 0)
    check_gradient(make_layer('name: "d" type: "Dropout"', phase=TEST), make_blobs(x), tops())


def test_dropout_bad_ratio():
    with pytest.raises(LayerError, match="dropout_ratio"):
        make_layer('name: "d" type: "Dropout" dropout_param { dropout_ratio: 1 }').setup(
            make_blobs(randn(2)), tops()
        )


# --- Softmax / SoftmaxWithLoss ----------------------------------------------------------------
def softmax_ref(x, axis):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax(axis):
    x = randn(2, 3, 4) * 2
    layer = make_layer(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}')
    (y,) = run(layer, make_blobs(x), tops())
    close(y.data, softmax_ref(x, axis))
    big = make_blobs(np.array([[1000.0, 0.0, -1000.0]], np.float32))
    (y,) = run(make_layer('name: "s" type: "Softmax"'), big, tops())
    close(y.data, [[1, 0, 0]])
    layer = make_layer(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}')
    check_gradient(layer, make_blobs(x), tops())


def softmax_loss_ref(x, label, axis=1, ignore=None, mode="VALID"):
    p = softmax_ref(x, axis)
    p = np.moveaxis(p, axis, -1).reshape(-1, x.shape[axis])
    lab = label.reshape(-1).astype(int)
    valid = np.ones(lab.shape, bool) if ignore is None else lab != ignore
    rows = np.arange(lab.size)[valid]
    loss = -np.log(np.maximum(p[rows, lab[valid]], FLT_MIN)).sum()
    outer = int(np.prod(x.shape[:axis]))
    n = {
        "VALID": valid.sum(),
        "FULL": lab.size,
        "BATCH_SIZE": outer,
        "NONE": 1,
    }[mode]
    return loss / max(n, 1)


LOSS_MODES = [
    ("", "VALID"),
    ("normalization: VALID", "VALID"),
    ("normalization: FULL", "FULL"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"),
    ("normalization: NONE", "NONE"),
    ("normalize: false", "BATCH_SIZE"),
    ("normalize: true", "VALID"),
]


@pytest.mark.parametrize("lp, mode", LOSS_MODES)
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_normalisation(lp, mode, ignore):
    x = randn(2, 4, 3, 2)
    label = np.random.RandomState(1).randint(0, 4, size=(2, 3, 2)).astype(np.float32)
    label[0, 0, 0] = 2
    loss_param = lp + ("" if ignore is None else f" ignore_label: {ignore}")
    text = f'name: "l" type: "SoftmaxWithLoss" loss_param {{ {loss_param} }}'
    (loss,) = run(make_layer(text), make_blobs(x, label), tops())
    assert loss.shape == ()
    close(loss.data, softmax_loss_ref(x, label, ignore=ignore, mode=mode), rtol=1e-5)
    check_gradient(make_layer(text), make_blobs(x, label), tops(), check_bottom=[0])


def test_softmax_loss_axis_and_hand_value():
    # Two classes with scores 0 and log 3 -> probs 1/4, 3/4.
    x = np.array([[0.0, np.log(3.0)], [np.log(3.0), 0.0]], np.float32)
    label = np.array([1, 1], np.float32)
    (loss,) = run(make_layer('name: "l" type: "SoftmaxWithLoss"'), make_blobs(x, label), tops())
    close(loss.data, -(np.log(0.75) + np.log(0.25)) / 2)
    x = randn(2, 3, 4)
    label = np.random.RandomState(2).randint(0, 4, size=(2, 3)).astype(np.float32)
    text = 'name: "l" type: "SoftmaxWithLoss" softmax_param { axis: 2 }'
    (loss,) = run(make_layer(text), make_blobs(x, label), tops())
    close(loss.data, softmax_loss_ref(x, label, axis=2), rtol=1e-5)
    check_gradient(make_layer(text), make_blobs(x, label), tops(), check_bottom=[0])


def test_softmax_loss_clamps_at_flt_min_and_scales_by_loss_weight():
    x = np.array([[200.0, -200.0]], np.float32)  # prob of class 1 underflows to 0
    bottom = make_blobs(x, np.array([1.0], np.float32))
    layer = make_layer('name: "l" type: "SoftmaxWithLoss"')
    (loss,) = top = run(layer, bottom, tops())
    close(loss.data, -np.log(np.float32(FLT_MIN)), rtol=1e-6)
    top[0].diff[...] = 2.5
    layer.backward(top, [True, False], bottom)
    close(bottom[0].diff, [[2.5, -2.5]])


def test_softmax_loss_all_ignored_and_errors():
    x = randn(3, 4)
    label = np.full(3, 7, np.float32)
    text = 'name: "l" type: "SoftmaxWithLoss" loss_param { ignore_label: 7 }'
    layer = make_layer(text)
    bottom = make_blobs(x, label)
    (loss,) = top = run(layer, bottom, tops())
    assert float(loss.data) == 0.0
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    assert not bottom[0].diff.any()
    with pytest.raises(LayerError, match="second"):
        make_layer('name: "l" type: "SoftmaxWithLoss"').setup(make_blobs(x, label), tops(2))
    with pytest.raises(LayerError, match="out of range"):
        run(make_layer('name: "l" type: "SoftmaxWithLoss"'), make_blobs(x, label), tops())
    with pytest.raises(LayerError, match="number of labels"):
        run(
            make_layer('name: "l" type: "SoftmaxWithLoss"'),
            make_blobs(randn(3, 4, 2), np.zeros(3, np.float32)),
            tops(),
        )


# --- Accuracy ---------------------------------------------------------------------------------
def accuracy_ref(x, label, top_k=1, axis=1, ignore=None):
    s = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    lab = label.reshape(-1).astype(int)
    hits = count = 0
    nums = np.zeros(x.shape[axis])
    per = np.zeros(x.shape[axis])
    for row, l in zip(s, lab):
        if l == ignore:
            continue
        count += 1
        nums[l] += 1
        if (row >= row[l]).sum() - 1 < top_k:
            hits += 1
            per[l] += 1
    return (hits / count if count else 0.0), np.where(nums > 0, per / np.maximum(nums, 1), 0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_accuracy_top_k(top_k):
    x = randn(10, 5)
    label = np.random.RandomState(3).randint(0, 5, 10).astype(np.float32)
    text = f'name: "a" type: "Accuracy" accuracy_param {{ top_k: {top_k} }}'
    acc, per = run(make_layer(text), make_blobs(x, label), tops(2))
    ref, ref_per = accuracy_ref(x, label, top_k)
    assert acc.shape == () and per.shape == (5,)
    assert float(acc.data) == np.float32(ref)
    close(per.data, ref_per, 0, 1e-7)


def test_accuracy_ties_lose_and_ignore():
    x = np.array([[1, 1, 0], [2, 0, 2], [0, 0, 0], [0, 3, 1]], np.float32)
    label = np.array([0, 2, 1, 1], np.float32)
    (acc,) = run(make_layer('name: "a" type: "Accuracy"'), make_blobs(x, label), tops())
    assert float(acc.data) == 0.25  # only the untied row 3 counts
    text = 'name: "a" type: "Accuracy" accuracy_param { ignore_label: 1 }'
    acc, per = run(make_layer(text), make_blobs(x, label), tops(2))
    assert float(acc.data) == 0.0  # rows 0 and 1 are ties, rows 2 and 3 ignored
    close(per.data, [0, 0, 0], 0, 0)
    label_all = np.ones(4, np.float32)
    (acc,) = run(make_layer(text), make_blobs(x, label_all), tops())
    assert float(acc.data) == 0.0  # nothing counted: 0, not NaN


def test_accuracy_spatial_axis_and_checks():
    x = randn(2, 5, 3, 4)
    label = np.random.RandomState(4).randint(0, 5, (2, 3, 4)).astype(np.float32)
    label[0, 0, 0] = -1
    text = 'name: "a" type: "Accuracy" accuracy_param { top_k: 2 ignore_label: -1 }'
    acc, per = run(make_layer(text), make_blobs(x, label), tops(2))
    ref, ref_per = accuracy_ref(x, label, 2, ignore=-1)
    assert float(acc.data) == np.float32(ref)
    close(per.data, ref_per, 0, 1e-7)
    with pytest.raises(LayerError, match="top_k"):
        run(
            make_layer('name: "a" type: "Accuracy" accuracy_param { top_k: 6 }'),
            make_blobs(randn(4, 5), np.zeros(4, np.float32)),
            tops(),
        )
    with pytest.raises(LayerError, match="no backward"):
        layer = make_layer('name: "a" type: "Accuracy"')
        bottom = make_blobs(randn(4, 5), np.zeros(4, np.float32))
        top = run(layer, bottom, tops())
        layer.backward(top, [True, False], bottom)


# --- shape ops --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "param, shape",
    [
        ("", (2, 60)),
        ("flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)),
        ("flatten_param { axis: 0 end_axis: -2 }", (24, 5)),
        ("flatten_param { axis: -1 }", (2, 3, 4, 5)),
    ],
)
def test_flatten(param, shape):
    x = randn(2, 3, 4, 5)
    bottom = make_blobs(x)
    (y,) = run(make_layer(f'name: "f" type: "Flatten" {param}'), bottom, tops())
    assert y.shape == shape
    close(y.data, x.reshape(shape), 0, 0)
    assert np.shares_memory(y.data, bottom[0].data)  # Caffe's ShareData
    check_gradient(make_layer(f'name: "f" type: "Flatten" {param}'), make_blobs(x[:1]), tops())


@pytest.mark.parametrize(
    "param, shape",
    [
        ("shape { dim: 0 dim: -1 dim: 5 }", (2, 12, 5)),
        ("shape { dim: 3 dim: 1 } axis: 1 num_axes: 1", (2, 3, 1, 4, 5)),
        ("shape { dim: -1 }", (120,)),
        ("shape { dim: 1 dim: 1 } axis: -1 num_axes: 0", (2, 3, 4, 5, 1, 1)),
        ("shape { dim: 0 dim: 0 dim: 20 }", (2, 3, 20)),
        ("shape { dim: 0 dim: 2 dim: -1 } axis: 1 num_axes: 2", (2, 3, 2, 2, 5)),
        ("shape { } axis: 1 num_axes: 0", (2, 3, 4, 5)),
    ],
)
def test_reshape(param, shape):
    x = randn(2, 3, 4, 5)
    bottom = make_blobs(x)
    (y,) = run(make_layer(f'name: "r" type: "Reshape" reshape_param {{ {param} }}'), bottom, tops())
    assert y.shape == shape
    close(y.data, x.reshape(shape), 0, 0)
    assert np.shares_memory(y.data, bottom[0].data)
    layer = make_layer(f'name: "r" type: "Reshape" reshape_param {{ {param} }}')
    check_gradient(layer, make_blobs(x), tops())


@pytest.mark.parametrize(
    "param, match",
    [
        ("shape { dim: -1 dim: -1 }", "multiple -1"),
        ("shape { dim: 7 dim: -1 }", "infer"),
        ("shape { dim: 7 }", "count"),
        ("shape { dim: 0 dim: 0 dim: 0 dim: 0 dim: 0 }", "no axis"),
        ("shape { dim: 1 } axis: 2 num_axes: 3", "exceeds"),
    ],
)
def test_reshape_errors(param, match):
    with pytest.raises(LayerError, match=match):
        run(
            make_layer(f'name: "r" type: "Reshape" reshape_param {{ {param} }}'),
            make_blobs(randn(2, 3, 4, 5)),
            tops(),
        )


def test_reshape_follows_bottom_reshape():
    layer = make_layer('name: "r" type: "Reshape" reshape_param { shape { dim: -1 } }')
    bottom = make_blobs(randn(2, 3))
    top = run(layer, bottom, tops())
    bottom[0].reshape((4, 5))
    bottom[0].data[...] = 3.0
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    assert top[0].shape == (20,) and (top[0].data == 3.0).all()


@pytest.mark.parametrize(
    "param, shapes, axis",
    [
        ("concat_param { axis: 0 }", [(2, 3, 2), (1, 3, 2)], 0),
        ("", [(2, 3, 2), (2, 1, 2), (2, 2, 2)], 1),
        ("concat_param { axis: -1 }", [(2, 3, 2), (2, 3, 3)], 2),
        ("concat_param { concat_dim: 2 }", [(2, 3, 1), (2, 3, 3)], 2),
    ],
)
def test_concat(param, shapes, axis):
    xs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    (y,) = run(make_layer(f'name: "c" type: "Concat" {param}'), make_blobs(*xs), tops())
    close(y.data, np.concatenate(xs, axis=axis), 0, 0)
    check_gradient(make_layer(f'name: "c" type: "Concat" {param}'), make_blobs(*xs), tops())


def test_concat_single_bottom_and_errors():
    x = randn(2, 3)
    bottom = make_blobs(x)
    (y,) = run(make_layer('name: "c" type: "Concat"'), bottom, tops())
    close(y.data, x, 0, 0)
    check_gradient(make_layer('name: "c" type: "Concat"'), make_blobs(x), tops())
    with pytest.raises(LayerError, match="same shape except"):
        run(make_layer('name: "c" type: "Concat"'), make_blobs(randn(2, 3), randn(3, 3)), tops())
    with pytest.raises(LayerError, match="not both"):
        make_layer('name: "c" type: "Concat" concat_param { axis: 1 concat_dim: 1 }').setup(
            make_blobs(x, x), tops()
        )


@pytest.mark.parametrize(
    "param, ntop, sizes, axis",
    [
        ("slice_param { axis: 0 }", 2, [2, 2], 0),
        ("slice_param { axis: 1 slice_point: 1 slice_point: 3 }", 3, [1, 2, 2], 1),
        ("slice_param { slice_dim: 1 slice_point: 4 }", 2, [4, 1], 1),
        ("slice_param { axis: -1 }", 3, [1, 1, 1], 2),
        ("", 1, [5], 1),
    ],
)
def test_slice(param, ntop, sizes, axis):
    x = randn(4, 5, 3)
    top = run(make_layer(f'name: "s" type: "Slice" {param}'), make_blobs(x), tops(ntop))
    parts = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    for t, p in zip(top, parts):
        close(t.data, p, 0, 0)
    check_gradient(make_layer(f'name: "s" type: "Slice" {param}'), make_blobs(x), tops(ntop))


def test_slice_errors():
    x = make_blobs(randn(4, 5))
    with pytest.raises(LayerError, match="evenly divide"):
        run(make_layer('name: "s" type: "Slice"'), x, tops(2))
    with pytest.raises(LayerError, match="slice_point"):
        run(make_layer('name: "s" type: "Slice" slice_param { slice_point: 2 }'), x, tops(3))
    with pytest.raises(LayerError, match="slice_point"):
        run(
            make_layer('name: "s" type: "Slice" slice_param { slice_point: 3 slice_point: 2 }'),
            x,
            tops(3),
        )


@pytest.mark.parametrize("ntop", [1, 2, 3])
def test_split(ntop):
    x = randn(2, 3, 2)
    bottom = make_blobs(x)
    top = run(make_layer('name: "s" type: "Split"'), bottom, tops(ntop))
    for t in top:
        close(t.data, x, 0, 0)
        assert np.shares_memory(t.data, bottom[0].data)
    diffs = [randn(2, 3, 2, seed=i + 1) for i in range(ntop)]
    for t, d in zip(top, diffs):
        t.diff[...] = d
    make_layer('name: "s" type: "Split"').backward(top, [True], bottom)
    close(bottom[0].diff, sum(diffs), 1e-6, 1e-6)
    check_gradient(make_layer('name: "s" type: "Split"'), make_blobs(x), tops(ntop))


# --- Eltwise ----------------------------------------------------------------------------------
def separated(n, shape, seed=0):
    """n arrays whose elements differ by >= 0.3 at every position (no near-ties for MAX)."""
    rs = np.random.RandomState(seed)
    base = rs.standard_normal(shape)
    order = np.argsort(rs.random_sample((n,) + shape), axis=0)
    return [(base + 0.3 * order[i]).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize(
    "param, ref",
    [
        ("", lambda a, b, c: a + b + c),
        ("eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 }", lambda a, b, c: a - 0.5 * b + 2 * c),
        ("eltwise_param { operation: PROD }", lambda a, b, c: a * b * c),
        (
            "eltwise_param { operation: PROD stable_prod_grad: false }",
            lambda a, b, c: a * b * c,
        ),
        ("eltwise_param { operation: MAX }", lambda a, b, c: np.maximum(np.maximum(a, b), c)),
    ],
)
def test_eltwise(param, ref):
    xs = separated(3, (2, 3, 4), seed=1)
    if "PROD" in param:
        xs = [x + np.sign(x) * 0.5 for x in xs]  # keep away from 0 for y / x_i
    (y,) = run(make_layer(f'name: "e" type: "Eltwise" {param}'), make_blobs(*xs), tops())
    close(y.data, ref(*xs), 1e-5, 1e-6)
    check_gradient(make_layer(f'name: "e" type: "Eltwise" {param}'), make_blobs(*xs), tops())


def test_eltwise_max_tie_rules():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    b = np.array([1.0, 1.0, 3.0], np.float32)
    c = np.array([0.0, 2.0, 3.0], np.float32)
    layer = make_layer('name: "e" type: "Eltwise" eltwise_param { operation: MAX }')
    bottom = make_blobs(a, b, c)
    top = run(layer, bottom, tops())
    top[0].diff[...] = [10, 20, 30]
    layer.backward(top, [True] * 3, bottom)
    # a == b picks b (strict > between the first two); later ties keep the earlier winner.
    close(bottom[0].diff, [0, 20, 0], 0, 0)
    close(bottom[1].diff, [10, 0, 30], 0, 0)
    close(bottom[2].diff, [0, 0, 0], 0, 0)


def test_eltwise_errors():
    x = make_blobs(randn(2), randn(2))
    with pytest.raises(LayerError, match="one coefficient per bottom"):
        make_layer('name: "e" type: "Eltwise" eltwise_param { coeff: 1 }').setup(x, tops())
    with pytest.raises(LayerError, match="summation"):
        make_layer(
            'name: "e" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }'
        ).setup(x, tops())
    with pytest.raises(LayerError, match="bottom\\[1\\]"):
        run(make_layer('name: "e" type: "Eltwise"'), make_blobs(randn(2), randn(3)), tops())


# --- EuclideanLoss ----------------------------------------------------------------------------
def test_euclidean_loss():
    a, b = randn(4, 3, 2), randn(4, 6, seed=1)
    layer = make_layer('name: "l" type: "EuclideanLoss"')
    (loss,) = run(layer, make_blobs(a, b), tops())
    close(loss.data, ((a.reshape(4, 6) - b) ** 2).sum() / 8, rtol=1e-5)
    check_gradient(make_layer('name: "l" type: "EuclideanLoss"'), make_blobs(a, b), tops())
    assert make_layer('name: "l" type: "EuclideanLoss"').no_grad_bottoms == ()
    with pytest.raises(LayerError, match="same dimension"):
        run(make_layer('name: "l" type: "EuclideanLoss"'), make_blobs(a, randn(4, 5)), tops())


# --- BatchNorm --------------------------------------------------------------------------------
def test_batch_norm_train_forward_and_running_sums():
    x = randn(4, 3, 2, 5) * 2 + 1
    text = (
        'name: "bn" type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 }'
    )
    layer = make_layer(text)
    assert layer.frozen_params
    layer.setup(make_blobs(x), tops())
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    assert layer.param_propagate_down == [False] * 3
    layer.blobs[0].data[...] = [1, 2, 3]
    layer.blobs[1].data[...] = [4, 5, 6]
    layer.blobs[2].data[...] = 2
    (y,) = run(layer, make_blobs(x), tops())
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    ref = (x64 - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3)
    close(y.data, ref, 1e-4, 1e-5)
    m = 4 * 2 * 5
    close(layer.blobs[0].data, mean + 0.9 * np.array([1, 2, 3]), 1e-5, 1e-6)
    close(layer.blobs[1].data, var * m / (m - 1) + 0.9 * np.array([4, 5, 6]), 1e-5, 1e-6)
    close(layer.blobs[2].data, [2 * 0.9 + 1])
    check_gradient(make_layer(text), make_blobs(randn(3, 2, 2, 2) * 2), tops())


def test_batch_norm_global_stats():
    x = randn(2, 3, 4)
    layer = make_layer('name: "bn" type: "BatchNorm"', phase=TEST)
    layer.setup(make_blobs(x), tops())
    layer.blobs[0].data[...] = [0.4, -0.8, 1.2]
    layer.blobs[1].data[...] = [4.0, 2.0, 0.4]
    layer.blobs[2].data[...] = 4.0
    (y,) = run(layer, make_blobs(x), tops())
    mean = np.array([0.1, -0.2, 0.3])[:, None]
    var = np.array([1.0, 0.5, 0.1])[:, None]
    close(y.data, (x - mean) / np.sqrt(var + 1e-5), 1e-5, 1e-6)
    close(layer.blobs[2].data, [4.0])  # not updated
    # factor 0: mean and variance read as 0
    layer.blobs[2].data[...] = 0
    bottom = make_blobs(x)
    top = tops()
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    close(top[0].data, x / np.sqrt(1e-5), 1e-5, 1e-4)
    # TRAIN phase with use_global_stats: true also uses the stored statistics
    layer = make_layer(
        'name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true }', phase=TRAIN
    )
    assert run(layer, make_blobs(x), tops()) and layer.use_global_stats
    layer = make_layer('name: "bn" type: "BatchNorm"', phase=TEST)
    bottom = make_blobs(x)
    layer.setup(bottom, tops())
    layer.blobs[1].data[...] = [4.0, 2.0, 0.4]
    layer.blobs[2].data[...] = 1.0
    check_gradient(layer, bottom, tops(), check_params=False)


@pytest.mark.parametrize("shape", [(6, 3), (8,)])
def test_batch_norm_low_rank_inputs(shape):
    x = randn(*shape) * 3
    (y,) = run(make_layer('name: "bn" type: "BatchNorm"'), make_blobs(x), tops())
    axes = (0,)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(axis=axes)) / np.sqrt(x64.var(axis=axes) + 1e-5)
    close(y.data, ref, 1e-4, 1e-5)
    check_gradient(make_layer('name: "bn" type: "BatchNorm"'), make_blobs(x), tops())


def test_batch_norm_rejects_learning_rate():
    text = 'name: "bn" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }'
    with pytest.raises(LayerError, match="cannot configure batch normalization"):
        make_layer(text).setup(make_blobs(randn(2, 3)), tops())
    text = 'name: "bn" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 }'
    make_layer(text).setup(make_blobs(randn(2, 3)), tops())


def test_batch_norm_frozen_in_net():
    net = engine.Net(
        text_format.Parse(
            """
            force_backward: true
            layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
            layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
            layer { name: "sc" type: "Scale" bottom: "x" top: "y" }
            """,
            caffe_pb2.NetParameter(),
        ),
        engine.TRAIN,
    )
    assert net.layers[1].param_propagate_down == [False] * 3
    net.blobs["x"].data[...] = randn(4, 3)
    net.forward()
    net.blobs["y"].diff[...] = randn(4, 3, seed=1)
    net.backward()
    assert all(not b.diff.any() for b in net.params["bn"])


# --- Scale / Bias -----------------------------------------------------------------------------
SCALE_CASES = [
    # (param, x shape, param shape (learned), axis for broadcasting)
    ("", (2, 3, 4), (3,), 1),
    ("scale_param { axis: 0 num_axes: 2 }", (2, 3, 4), (2, 3), 0),
    ("scale_param { num_axes: 0 }", (2, 3, 4), (), 0),
    ("scale_param { axis: -1 }", (2, 3, 4), (4,), 2),
    ("scale_param { axis: 1 num_axes: -1 }", (2, 3, 4), (3, 4), 1),
    ("scale_param { axis: 0 num_axes: -1 }", (2, 3, 2), (2, 3, 2), 0),
]


def broadcast(p, x_shape, axis):
    p = np.asarray(p)
    return p.reshape((1,) * axis + p.shape + (1,) * (len(x_shape) - axis - p.ndim))


@pytest.mark.parametrize("param, xs, ps, axis", SCALE_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_scale_learned(param, xs, ps, axis, bias):
    extra = ' bias_term: true bias_filler { type: "gaussian" std: 0.5 }' if bias else ""
    p = param if param else "scale_param { }"
    p = p[:-1] + 'filler { type: "uniform" min: 0.5 max: 1.5 }' + extra + " }"
    text = f'name: "s" type: "Scale" {p}'
    x = randn(*xs)
    layer = make_layer(text)
    (y,) = run(layer, make_blobs(x), tops())
    assert [b.shape for b in layer.blobs] == [ps] * (2 if bias else 1)
    s = layer.blobs[0].data
    ref = x * broadcast(s, xs, axis)
    if bias:
        ref = ref + broadcast(layer.blobs[1].data, xs, axis)
    close(y.data, ref, 1e-6, 1e-6)
    check_gradient(make_layer(text), make_blobs(x), tops())


def test_scale_default_filler_is_one():
    x = randn(2, 3)
    layer = make_layer('name: "s" type: "Scale" scale_param { bias_term: true }')
    (y,) = run(layer, make_blobs(x), tops())
    close(layer.blobs[0].data, [1, 1, 1], 0, 0)
    close(layer.blobs[1].data, [0, 0, 0], 0, 0)
    close(y.data, x, 0, 0)


@pytest.mark.parametrize(
    "param, s_shape, axis",
    [("", (3, 4), 1), ("scale_param { axis: 2 }", (4, 5), 2), ("", (), 0)],
)
def test_scale_two_bottoms(param, s_shape, axis):
    x = randn(2, 3, 4, 5)
    s = randn(*s_shape, seed=1) if s_shape else np.float32(1.7)
    text = f'name: "s" type: "Scale" {param}'
    (y,) = run(make_layer(text), make_blobs(x, s), tops())
    close(y.data, x * broadcast(s, x.shape, axis), 1e-6, 1e-6)
    check_gradient(make_layer(text), make_blobs(x[:1, :, :, :2] if axis < 2 else x[:1], s), tops())


def test_scale_two_bottoms_with_bias():
    x, s = randn(2, 3, 4), randn(3, seed=1)
    text = 'name: "s" type: "Scale" scale_param { bias_term: true bias_filler { value: 0.5 } }'
    layer = make_layer(text)
    (y,) = run(layer, make_blobs(x, s), tops())
    assert [b.shape for b in layer.blobs] == [(3,)]
    close(y.data, x * s[:, None] + 0.5, 1e-6, 1e-6)
    check_gradient(make_layer(text), make_blobs(x, s), tops())


def test_scale_shape_errors():
    with pytest.raises(LayerError, match="mismatch"):
        run(make_layer('name: "s" type: "Scale"'), make_blobs(randn(2, 3), randn(4)), tops())
    with pytest.raises(LayerError, match="extends past"):
        make_layer('name: "s" type: "Scale" scale_param { axis: 1 num_axes: 3 }').setup(
            make_blobs(randn(2, 3)), tops()
        )


BIAS_CASES = [
    ("", (2, 3, 4), (3,), 1),
    ("bias_param { axis: 0 num_axes: 2 }", (2, 3, 4), (2, 3), 0),
    ("bias_param { num_axes: 0 }", (2, 3, 4), (), 0),
    ("bias_param { axis: 1 num_axes: -1 }", (2, 3, 4), (3, 4), 1),
]


@pytest.mark.parametrize("param, xs, ps, axis", BIAS_CASES)
def test_bias_learned(param, xs, ps, axis):
    p = param if param else "bias_param { }"
    text = f'name: "b" type: "Bias" {p[:-1]} filler {{ type: "gaussian" std: 0.5 }} }}'
    x = randn(*xs)
    layer = make_layer(text)
    (y,) = run(layer, make_blobs(x), tops())
    assert layer.blobs[0].shape == ps
    close(y.data, x + broadcast(layer.blobs[0].data, xs, axis), 1e-6, 1e-6)
    check_gradient(make_layer(text), make_blobs(x), tops())


def test_bias_default_zero_and_two_bottoms():
    x = randn(2, 3, 4, 5)
    layer = make_layer('name: "b" type: "Bias"')
    (y,) = run(layer, make_blobs(x), tops())
    close(layer.blobs[0].data, [0, 0, 0], 0, 0)
    close(y.data, x, 0, 0)
    b = randn(4, 5, seed=1)
    text = 'name: "b" type: "Bias" bias_param { axis: 2 }'
    (y,) = run(make_layer(text), make_blobs(x, b), tops())
    close(y.data, x + b, 1e-6, 1e-6)
    check_gradient(make_layer(text), make_blobs(x[:1, :2], b), tops())


def test_param_diffs_accumulate():
    """Parameter diffs add to what is there (the solver zeroes them), bottom diffs overwrite."""
    x = randn(2, 3, 4)
    for text in (
        'name: "s" type: "Scale" scale_param { bias_term: true }',
        'name: "b" type: "Bias"',
    ):
        layer = make_layer(text)
        bottom = make_blobs(x)
        top = run(layer, bottom, tops())
        top[0].diff[...] = randn(2, 3, 4, seed=2)
        for p in layer.blobs:
            p.diff[...] = 0
        layer.backward(top, [True], bottom)
        once = [p.diff.copy() for p in layer.blobs]
        dx = bottom[0].diff.copy()
        layer.backward(top, [True], bottom)
        for p, d in zip(layer.blobs, once):
            close(p.diff, 2 * d)
        close(bottom[0].diff, dx, 0, 0)


# --- golden parity (BVLC Caffe) ---------------------------------------------------------------
GOLDEN_CASES = [
    "input",
    "relu",
    "relu_leaky",
    "sigmoid",
    "tanh",
    "dropout_test",
    "softmax",
    "softmax_axis2",
    "softmax_loss",
    "softmax_loss_ignore_batch",
    "softmax_loss_ignore_full",
    "softmax_loss_ignore_none",
    "softmax_loss_ignore_valid",
    "softmax_loss_normalize_false",
    "softmax_loss_weight",
    "accuracy_ignore",
    "accuracy_spatial",
    "accuracy_ties",
    "accuracy_top1",
    "accuracy_top3",
    "flatten",
    "flatten_axes",
    "reshape",
    "reshape_axis",
    "concat_axis0",
    "concat_axis1",
    "slice_even",
    "slice_points",
    "split",
    "eltwise_max",
    "eltwise_prod",
    "eltwise_sum",
    "eltwise_sum_coeff",
    "euclidean_loss",
    "batchnorm_global",
    "batchnorm_train",
    "scale_axis0_numaxes2",
    "scale_learned",
    "scale_scalar",
    "scale_two_bottom",
    "bias_learned",
    "bias_two_bottom",
]


@pytest.mark.parametrize("case", golden.cases("layers", GOLDEN_CASES))
def test_golden(case):
    golden.run_net_case(case)


def test_golden_scale_scalar_from_fillers():
    """scale_scalar's constant fillers give the caffemodel's values: parity without loading it."""
    case = golden.GOLDEN / "layers" / "scale_scalar"
    if not golden.available():
        pytest.skip("no golden suite")
    meta, arrays = golden.load_case(case)
    net = engine.Net(str(case / "net.prototxt"), engine.TRAIN)
    assert net.params["scale_scalar"][0].shape == ()
    net.blobs["x"].data[...] = arrays["input/x"]
    net.forward()
    golden.compare(net, meta, arrays, ("param", "output"))
    net.blobs["y"].diff[...] = arrays["top_diff/y"]
    net.backward()
    golden.compare(net, meta, arrays, ("bottom_diff", "param_diff"))


def test_golden_batchnorm_train_params_as_loaded():
    case = golden.GOLDEN / "layers" / "batchnorm_train"
    if not golden.available():
        pytest.skip("no golden suite")
    meta, arrays = golden.load_case(case)
    with golden.chdir(case):
        net = golden.build_net(case, meta)
    for i in range(3):
        close(net.params["bn"][i].data, arrays[f"param/bn/{i}"], 0, 0)


def test_golden_dropout_train_rule():
    """Caffe's mask is random: check the rule (0 or x / (1 - p); same mask in backward)."""
    case = golden.GOLDEN / "layers" / "dropout_train"
    if not golden.available():
        pytest.skip("no golden suite")
    meta, arrays = golden.load_case(case)
    p = 0.3
    with golden.chdir(case):
        net = golden.build_net(case, meta)
        x = arrays["input/x"]
        net.blobs["x"].data[...] = x
        net.forward()
        y = np.asarray(net.blobs["y"].data)
        kept = y != 0
        golden.assert_close(y[kept], x[kept] / (1 - p), 1e-6, 1e-6, "kept outputs")
        assert 0.15 < 1 - kept.mean() < 0.45, "drop fraction far from 0.3"
        dy = arrays["top_diff/y"]
        net.blobs["y"].diff[...] = dy
        net.backward()
        golden.assert_close(net.blobs["x"].diff, dy * kept / (1 - p), 1e-6, 1e-6, "dx")
    # Caffe's own output obeys the same rule.
    yc = arrays["output/y"]
    kc = yc != 0
    golden.assert_close(yc[kc], x[kc] / (1 - p), 1e-6, 1e-6, "Caffe kept outputs")
    golden.assert_close(arrays["bottom_diff/x"], dy * kc / (1 - p), 1e-5, 1e-6, "Caffe dx")
