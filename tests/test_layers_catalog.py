"""Tests for the rest of the layer catalog (neuron_extra, mvn, crop, tile, embed, argmax,
reduction, misc, losses_extra, recurrent): hand-computed forwards, gradient checks, golden."""

import numpy as np
import pytest
from google.protobuf import text_format

from engine import rng
from engine.blob import Blob
from engine.layer import LayerError, create_layer
from engine.proto import caffe_pb2
from tests import golden
from tests.gradient_check import check_gradient, make_blobs


def make_layer(text, phase=caffe_pb2.TRAIN):
    param = text_format.Parse('name: "l" ' + text, caffe_pb2.LayerParameter())
    return create_layer(param, phase)


def randn(*shape, seed=0):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def away_from(x, points, gap=0.05):
    """Move values lying within `gap` of any of `points` (kinks) out of that band."""
    x = x.copy()
    for p in points:
        near = np.abs(x - p) < gap
        x[near] = p + np.where(x[near] >= p, 2 * gap, -2 * gap)
    return x


def run(layer, bottom, tops=1):
    top = [Blob() for _ in range(tops)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return top


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --- neuron layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_prelu(shared):
    rng.set_random_seed(3)
    text = 'type: "PReLU" prelu_param { filler { type: "uniform" min: 0.1 max: 0.5 } '
    text += f"channel_shared: {str(shared).lower()} }}"
    x = away_from(randn(2, 3, 2, 3), [0.0])
    layer = make_layer(text)
    (y,) = run(layer, make_blobs(x))
    a = layer.blobs[0].data
    assert a.shape == (() if shared else (3,))
    slope = a if shared else a.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y.data, np.where(x > 0, x, slope * x), rtol=1e-6)
    check_gradient(make_layer(text), make_blobs(x), [Blob()], kink_range=0.01)


def test_prelu_default_filler_and_in_place():
    text = 'type: "PReLU"'
    x = randn(2, 3, 2, 2, seed=1)
    ref = make_layer(text)
    bottom, top = make_blobs(x), [Blob()]
    ref.setup(bottom, top)
    assert np.all(ref.blobs[0].data == np.float32(0.25))
    ref.forward(bottom, top)
    dy = randn(2, 3, 2, 2, seed=2)
    top[0].diff[...] = dy
    ref.backward(top, [True], bottom)
    inp = make_layer(text)
    (blob,) = make_blobs(x)
    inp.setup([blob], [blob])
    inp.forward([blob], [blob])
    np.testing.assert_array_equal(blob.data, top[0].data)
    blob.diff[...] = dy
    inp.backward([blob], [True], [blob])
    np.testing.assert_array_equal(blob.diff, bottom[0].diff)
    np.testing.assert_allclose(inp.blobs[0].diff, ref.blobs[0].diff, rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_elu(alpha):
    text = f'type: "ELU" elu_param {{ alpha: {alpha} }}'
    x = away_from(randn(2, 3, 2, 3), [0.0])
    (y,) = run(make_layer(text), make_blobs(x))
    np.testing.assert_allclose(y.data, np.where(x > 0, x, alpha * (np.exp(x) - 1)), rtol=1e-6)
    check_gradient(make_layer(text), make_blobs(x), [Blob()], kink_range=0.01)


def test_absval():
    x = away_from(randn(2, 3, 2, 3), [0.0])
    (y,) = run(make_layer('type: "AbsVal"'), make_blobs(x))
    np.testing.assert_array_equal(y.data, np.abs(x))
    check_gradient(make_layer('type: "AbsVal"'), make_blobs(x), [Blob()], kink_range=0.01)
    assert not make_layer('type: "AbsVal"').allow_in_place


@pytest.mark.parametrize(
    "power,scale,shift,positive",
    [
        (2.0, 0.5, 1.0, False),
        (0.5, 2.0, 0.1, True),
        (1.0, -1.5, 0.3, False),
        (3.0, 2.0, 0.0, False),  # Caffe's shift == 0 branch: dx = power * y / x
        (-1.5, 1.0, 0.5, True),
    ],
)
def test_power(power, scale, shift, positive):
    text = f'type: "Power" power_param {{ power: {power} scale: {scale} shift: {shift} }}'
    x = randn(2, 3, 2, 2)
    x = np.abs(x) + 0.2 if positive else away_from(x, [0.0])
    (y,) = run(make_layer(text), make_blobs(x))
    np.testing.assert_allclose(y.data, (shift + scale * x.astype(np.float64)) ** power, rtol=1e-5)
    check_gradient(make_layer(text), make_blobs(x), [Blob()], step=1e-3)


def test_power_constant_when_scale_is_zero():
    layer = make_layer('type: "Power" power_param { power: 2 scale: 0 shift: 3 }')
    bottom = make_blobs(randn(2, 3))
    (y,) = run(layer, bottom)
    np.testing.assert_array_equal(y.data, np.full((2, 3), 9.0))
    y.diff[...] = 1
    layer.backward([y], [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0)


@pytest.mark.parametrize(
    "params,fn",
    [
        ("", np.exp),
        ("base: 2 scale: 0.5 shift: 1", lambda x: 2.0 ** (1 + 0.5 * x)),
        ("scale: -1 shift: 0.5", lambda x: np.exp(0.5 - x)),
    ],
)
def test_exp(params, fn):
    text = f'type: "Exp" exp_param {{ {params} }}'
    x = randn(2, 3, 2, 2)
    (y,) = run(make_layer(text), make_blobs(x))
    np.testing.assert_allclose(y.data, fn(x.astype(np.float64)), rtol=1e-5)
    check_gradient(make_layer(text), make_blobs(x), [Blob()])


@pytest.mark.parametrize(
    "params,fn",
    [
        ("", np.log),
        ("base: 10 scale: 2 shift: 0.5", lambda x: np.log10(0.5 + 2 * x)),
        ("base: 2 scale: 3", lambda x: np.log2(3 * x)),
    ],
)
def test_log(params, fn):
    text = f'type: "Log" log_param {{ {params} }}'
    x = np.abs(randn(2, 3, 2, 2)) + 0.5
    (y,) = run(make_layer(text), make_blobs(x))
    np.testing.assert_allclose(y.data, fn(x.astype(np.float64)), rtol=1e-5, atol=1e-6)
    check_gradient(make_layer(text), make_blobs(x), [Blob()])


def test_exp_log_reject_non_positive_base():
    for text in ('type: "Exp" exp_param { base: -2 }', 'type: "Log" log_param { base: 0 }'):
        with pytest.raises(LayerError, match="base"):
            run(make_layer(text), make_blobs(randn(2, 2)))


def test_bnll():
    x = randn(2, 3, 2, 3) * 3
    x.flat[:3] = [60.0, -60.0, 0.0]
    (y,) = run(make_layer('type: "BNLL"'), make_blobs(x))
    np.testing.assert_allclose(y.data, np.logaddexp(0, x.astype(np.float64)), rtol=1e-6)
    assert np.isfinite(y.data).all()
    check_gradient(make_layer('type: "BNLL"'), make_blobs(randn(2, 3, 2, 3)), [Blob()])


def test_threshold_forward_only():
    x = randn(2, 3, 4)
    x.flat[0] = 0.1
    layer = make_layer('type: "Threshold" threshold_param { threshold: 0.1 }')
    bottom = make_blobs(x)
    (y,) = run(layer, bottom)
    np.testing.assert_array_equal(y.data, (x > np.float32(0.1)).astype(np.float32))
    assert y.data.flat[0] == 0
    assert layer.no_grad_bottoms == (0,)
    with pytest.raises(LayerError):
        layer.backward([y], [True], bottom)


def test_clip():
    text = 'type: "Clip" clip_param { min: -0.5 max: 0.7 }'
    x = away_from(randn(3, 4, 3), [-0.5, 0.7], gap=0.03)
    (y,) = run(make_layer(text), make_blobs(x))
    np.testing.assert_array_equal(y.data, np.clip(x, -0.5, 0.7))
    check_gradient(make_layer(text), make_blobs(x), [Blob()])
    # the boundary itself passes the gradient (min <= x <= max)
    layer = make_layer(text)
    bottom = make_blobs(np.array([-0.5, 0.7, 0.71, -0.51], np.float32))
    (y,) = run(layer, bottom)
    y.diff[...] = 1
    layer.backward([y], [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [1, 1, 0, 0])


@pytest.mark.parametrize("beta", [1.0, 1.7])
def test_swish(beta):
    text = f'type: "Swish" swish_param {{ beta: {beta} }}'
    x = randn(2, 3, 2, 3)
    (y,) = run(make_layer(text), make_blobs(x))
    np.testing.assert_allclose(y.data, x * sigmoid(beta * x), rtol=1e-5, atol=1e-7)
    check_gradient(make_layer(text), make_blobs(x), [Blob()])


# --- MVN, Crop, Tile, Embed, ArgMax, Reduction ---------------------------------------------------


@pytest.mark.parametrize(
    "params,axes,variance",
    [
        ("", (2, 3), True),
        ("across_channels: true", (1, 2, 3), True),
        ("normalize_variance: false", (2, 3), False),
    ],
)
def test_mvn(params, axes, variance):
    text = f'type: "MVN" mvn_param {{ {params} }}'
    x = randn(2, 3, 2, 3) * 2 + 1
    (y,) = run(make_layer(text), make_blobs(x))
    x64 = x.astype(np.float64)
    want = x64 - x64.mean(axis=axes, keepdims=True)
    if variance:
        want /= x64.std(axis=axes, keepdims=True) + 1e-9
    np.testing.assert_allclose(y.data, want, rtol=1e-4, atol=1e-5)
    check_gradient(make_layer(text), make_blobs(x), [Blob()])


def test_mvn_eps_added_to_std():
    x = randn(2, 3, 4)
    (y,) = run(make_layer('type: "MVN" mvn_param { eps: 0.5 }'), make_blobs(x))
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(axis=2, keepdims=True)) / (x64.std(axis=2, keepdims=True) + 0.5)
    np.testing.assert_allclose(y.data, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "params,xshape,rshape,window",
    [
        ("axis: 2 offset: 1 offset: 2", (2, 3, 5, 6), (2, 3, 2, 3), np.s_[:, :, 1:3, 2:5]),
        ("axis: 1 offset: 1", (2, 4, 5, 6), (2, 2, 3, 4), np.s_[:, 1:3, 1:4, 1:5]),
        ("axis: -1", (2, 3, 4), (1, 1, 2), np.s_[:, :, 0:2]),
    ],
)
def test_crop(params, xshape, rshape, window):
    text = f'type: "Crop" crop_param {{ {params} }}'
    x = randn(*xshape)
    ref = np.zeros(rshape, np.float32)
    (y,) = run(make_layer(text), make_blobs(x, ref))
    np.testing.assert_array_equal(y.data, x[window])
    check_gradient(make_layer(text), make_blobs(x, ref), [Blob()], check_bottom=[0])


def test_crop_rejects_window_outside():
    with pytest.raises(LayerError, match="offset"):
        run(
            make_layer('type: "Crop" crop_param { offset: 3 }'),
            make_blobs(randn(1, 1, 4, 4), np.zeros((1, 1, 2, 2))),
        )


@pytest.mark.parametrize("axis,tiles", [(1, 3), (-1, 2), (0, 2)])
def test_tile(axis, tiles):
    text = f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}'
    x = randn(2, 3, 2)
    (y,) = run(make_layer(text), make_blobs(x))
    reps = [1, 1, 1]
    reps[axis] = tiles
    np.testing.assert_array_equal(y.data, np.tile(x, reps))
    check_gradient(make_layer(text), make_blobs(x), [Blob()])


@pytest.mark.parametrize("bias", [True, False])
def test_embed(bias):
    rng.set_random_seed(5)
    text = (
        'type: "Embed" embed_param { input_dim: 6 num_output: 3 '
        f"bias_term: {str(bias).lower()} "
        'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }'
    )
    idx = np.array([[0, 5, 2], [2, 2, 4]], np.float32)
    layer = make_layer(text)
    (y,) = run(layer, make_blobs(idx))
    want = layer.blobs[0].data[idx.astype(int)]
    if bias:
        want = want + layer.blobs[1].data
    np.testing.assert_allclose(y.data, want, rtol=1e-6)
    assert y.shape == (2, 3, 3)
    check_gradient(make_layer(text), make_blobs(idx), [Blob()], check_bottom=[])
    with pytest.raises(LayerError, match="index input"):
        layer.backward([y], [True], make_blobs(idx))


def test_embed_padding_is_a_zero_row_without_gradient():
    """-1 pads CaffeOnSpark's caption indices: a zero row (plus the bias), no table gradient."""
    rng.set_random_seed(6)
    text = (
        'type: "Embed" embed_param { input_dim: 4 num_output: 2 '
        'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "constant" value: 0.5 } }'
    )
    layer = make_layer(text)
    idx = np.array([[1, -1], [3, -1]], np.float32)
    (y,) = run(layer, make_blobs(idx))
    np.testing.assert_array_equal(y.data[:, 1], 0.5)
    np.testing.assert_array_equal(y.data[0, 0], layer.blobs[0].data[1] + 0.5)
    y.diff[...] = 1
    layer.backward([y], [False], make_blobs(idx))
    np.testing.assert_array_equal(layer.blobs[0].diff[[0, 2]], 0)  # rows no index names
    np.testing.assert_array_equal(layer.blobs[0].diff[[1, 3]], 1)  # once each, not from -1
    np.testing.assert_array_equal(layer.blobs[1].diff, 4)  # the bias: every row, as Caffe
    check_gradient(make_layer(text), make_blobs(idx), [Blob()], check_bottom=[])


@pytest.mark.parametrize("bad", [6.0, -2.0, 1.5])
def test_embed_rejects_bad_index(bad):
    text = 'type: "Embed" embed_param { input_dim: 6 num_output: 3 }'
    with pytest.raises(LayerError, match="index"):
        run(make_layer(text), make_blobs(np.array([0, bad], np.float32)))


def test_argmax_flattened():
    x = randn(2, 3, 2, 2)
    x[0, 1, 1, 0] = x[0].max() + 1
    x[0, 2, 0, 1] = x[0, 1, 1, 0]  # a tie: Caffe returns the larger index first
    (y,) = run(
        make_layer('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }'), make_blobs(x)
    )
    assert y.shape == (2, 2, 2, 1)
    assert list(y.data[0, 0, :, 0]) == [9, 6]
    flat = x.reshape(2, -1)
    order = np.argsort(-flat[1], kind="stable")[:2]
    np.testing.assert_array_equal(y.data[1, 0, :, 0], order)
    np.testing.assert_array_equal(y.data[1, 1, :, 0], flat[1][order])
    (y,) = run(make_layer('type: "ArgMax"'), make_blobs(randn(4, 7)))
    assert y.shape == (4, 1, 1)


def test_argmax_axis():
    x = randn(2, 4, 3)
    (y,) = run(make_layer('type: "ArgMax" argmax_param { axis: 1 top_k: 2 }'), make_blobs(x))
    order = np.argsort(-x, axis=1, kind="stable")[:, :2, :]
    np.testing.assert_array_equal(y.data, order)
    (y,) = run(
        make_layer('type: "ArgMax" argmax_param { axis: -1 out_max_val: true }'), make_blobs(x)
    )
    np.testing.assert_array_equal(y.data, x.max(axis=-1, keepdims=True))
    with pytest.raises(LayerError, match="top_k"):
        run(make_layer('type: "ArgMax" argmax_param { axis: 2 top_k: 4 }'), make_blobs(x))


@pytest.mark.parametrize(
    "op,axis,coeff,fn",
    [
        ("SUM", 0, 1.0, lambda x, a: x.sum(axis=a)),
        ("ASUM", 1, 1.0, lambda x, a: np.abs(x).sum(axis=a)),
        ("SUMSQ", 2, 0.5, lambda x, a: 0.5 * (x * x).sum(axis=a)),
        ("MEAN", -1, 2.0, lambda x, a: 2 * x.mean(axis=a)),
    ],
)
def test_reduction(op, axis, coeff, fn):
    text = f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}'
    x = away_from(randn(2, 3, 2, 2), [0.0])
    (y,) = run(make_layer(text), make_blobs(x))
    ax = axis % 4
    assert y.shape == x.shape[:ax]
    want = fn(x.astype(np.float64), tuple(range(ax, 4)))
    np.testing.assert_allclose(y.data, want, rtol=1e-5, atol=1e-6)
    check_gradient(make_layer(text), make_blobs(x), [Blob()], kink_range=0.01)


# --- Silence, Parameter, Filter, BatchReindex ----------------------------------------------------


def test_silence():
    layer = make_layer('type: "Silence"')
    bottom = make_blobs(randn(2, 3), randn(4))
    top = run(layer, bottom, tops=0)
    for b in bottom:
        b.diff[...] = 7
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0)
    np.testing.assert_array_equal(bottom[1].diff, 7)


def test_parameter():
    layer = make_layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }')
    (y,) = run(layer, [])
    assert y.shape == (2, 3) and not y.data.any()
    layer.blobs[0].data[...] = randn(2, 3)
    layer.forward([], [y])
    np.testing.assert_array_equal(y.data, layer.blobs[0].data)
    check_gradient(
        make_layer('type: "Parameter" parameter_param { shape { dim: 3 } }'), [], [Blob()]
    )


def test_filter():
    text = 'type: "Filter" bottom: "a" bottom: "b" bottom: "sel" top: "fa" top: "fb"'
    a, b = randn(4, 2, 3), randn(4, 5, seed=1)
    sel = np.array([1, 0, 1, 1], np.float32)
    layer = make_layer(text)
    assert layer.no_grad_bottoms == (2,)
    ya, yb = run(layer, make_blobs(a, b, sel), tops=2)
    np.testing.assert_array_equal(ya.data, a[[0, 2, 3]])
    np.testing.assert_array_equal(yb.data, b[[0, 2, 3]])
    # set-up sizes the tops to the whole batch (as Caffe), so give the objective's weights
    weights = [randn(3, 2, 3, seed=7), randn(3, 5, seed=8)]
    check_gradient(
        make_layer(text),
        make_blobs(a, b, sel),
        [Blob(), Blob()],
        check_bottom=[0, 1],
        top_weights=weights,
    )
    bottom = make_blobs(a, b, np.zeros(4, np.float32))
    ya, yb = run(make_layer(text), bottom, tops=2)
    layer2 = make_layer(text)
    top = [Blob(), Blob()]
    layer2.setup(bottom, top)
    layer2.reshape(bottom, top)
    assert top[0].shape == (0, 2, 3)
    layer2.forward(bottom, top)
    with pytest.raises(LayerError, match="selector"):
        layer2.backward(top, [True, False, True], bottom)


def test_batch_reindex():
    x = randn(3, 2, 2)
    idx = np.array([2, 0, 0, 1, 2], np.float32)
    layer = make_layer('type: "BatchReindex"')
    (y,) = run(layer, make_blobs(x, idx))
    np.testing.assert_array_equal(y.data, x[[2, 0, 0, 1, 2]])
    check_gradient(
        make_layer('type: "BatchReindex"'), make_blobs(x, idx), [Blob()], check_bottom=[0]
    )
    bottom = make_blobs(x, np.array([0, 0], np.float32))
    (y,) = run(make_layer('type: "BatchReindex"'), bottom)
    with pytest.raises(LayerError, match="batch size"):
        run(make_layer('type: "BatchReindex"'), make_blobs(x, np.array([3], np.float32)))


# --- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,p", [("L1", 1), ("L2", 2)])
def test_hinge_loss(norm, p):
    text = f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}'
    x = away_from(randn(4, 5) * 1.5, [-1.0, 1.0])
    lab = np.array([0, 3, 4, 3], np.float32)
    layer = make_layer(text)
    bottom = make_blobs(x, lab)
    (loss,) = run(layer, bottom)
    sign = -np.ones((4, 5))
    sign[np.arange(4), lab.astype(int)] = 1
    margin = np.maximum(0, 1 - sign * x)
    np.testing.assert_allclose(loss.data, (margin**p).sum() / 4, rtol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, margin, rtol=1e-6)  # Caffe's scratch
    check_gradient(make_layer(text), make_blobs(x, lab), [Blob()], check_bottom=[0])


@pytest.mark.parametrize(
    "extra,divisor", [("", 3), ("loss_param { ignore_label: -1 normalization: VALID }", None)]
)
def test_sigmoid_cross_entropy_loss(extra, divisor):
    text = f'type: "SigmoidCrossEntropyLoss" {extra}'
    x = randn(3, 2, 2) * 3
    t = (np.random.RandomState(1).rand(3, 2, 2) > 0.5).astype(np.float32)
    if divisor is None:
        t.flat[[1, 6]] = -1
    s = sigmoid(x.astype(np.float64))
    terms = -(t * np.log(s) + (1 - t) * np.log(1 - s))
    valid = t != -1
    want = terms[valid].sum() / (divisor or valid.sum())
    (loss,) = run(make_layer(text), make_blobs(x, t))
    np.testing.assert_allclose(loss.data, want, rtol=1e-5)
    check_gradient(make_layer(text), make_blobs(x, t), [Blob()], check_bottom=[0])


def _infogain_reference(x, lab, h, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    p = np.moveaxis(e / e.sum(axis=axis, keepdims=True), axis, -1).reshape(-1, x.shape[axis])
    lab = lab.reshape(-1).astype(int)
    return -(h[lab] * np.log(p)).sum() / len(lab)


def test_infogain_loss_source(tmp_path, monkeypatch):
    h = np.abs(randn(4, 4, seed=3)) + np.eye(4, dtype=np.float32)
    proto = caffe_pb2.BlobProto()
    proto.num, proto.channels, proto.height, proto.width = 1, 1, 4, 4
    proto.data.extend(h.ravel().tolist())
    (tmp_path / "H.binaryproto").write_bytes(proto.SerializeToString())
    monkeypatch.chdir(tmp_path)
    text = 'type: "InfogainLoss" infogain_loss_param { source: "H.binaryproto" }'
    x = randn(5, 4)
    lab = np.array([0, 3, 1, 1, 2], np.float32)
    loss, prob = run(make_layer(text), make_blobs(x, lab), tops=2)
    np.testing.assert_allclose(loss.data, _infogain_reference(x, lab, h), rtol=1e-5)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(prob.data, e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    check_gradient(make_layer(text), make_blobs(x, lab), [Blob()], check_bottom=[0])
    with pytest.raises(LayerError, match="nope"):
        run(
            make_layer('type: "InfogainLoss" infogain_loss_param { source: "nope" }'),
            make_blobs(x, lab),
        )


def test_infogain_loss_third_bottom_spatial_ignore():
    text = 'type: "InfogainLoss" infogain_loss_param { axis: 1 } loss_param { ignore_label: 7 }'
    h = np.abs(randn(3, 3, seed=4))
    x = randn(2, 3, 2, 2)
    lab = np.array([[[0, 2], [1, 7]], [[2, 2], [7, 0]]], np.float32)
    (loss,) = run(make_layer(text), make_blobs(x, lab, h))
    keep = lab.reshape(-1) != 7
    xs = np.moveaxis(x, 1, -1).reshape(-1, 3)[keep]
    np.testing.assert_allclose(
        loss.data, _infogain_reference(xs, lab.reshape(-1)[keep], h), rtol=1e-5
    )
    check_gradient(make_layer(text), make_blobs(x, lab, h), [Blob()], check_bottom=[0])
    layer = make_layer(text)
    assert layer.no_grad_bottoms == (1, 2)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    text = 'type: "ContrastiveLoss" contrastive_loss_param { margin: 1.5 '
    text += f"legacy_version: {str(legacy).lower()} }}"
    a, b = randn(6, 3, 1, 1), randn(6, 3, 1, 1, seed=1) * 0.5
    sim = np.array([1, 0, 0, 1, 0, 0], np.float32)
    d2 = ((a - b) ** 2).reshape(6, -1).sum(axis=1).astype(np.float64)
    if legacy:
        dis = np.maximum(1.5 - d2, 0)
    else:
        dis = np.maximum(1.5 - np.sqrt(d2), 0) ** 2
    want = np.where(sim == 1, d2, dis).sum() / 12
    (loss,) = run(make_layer(text), make_blobs(a, b, sim))
    np.testing.assert_allclose(loss.data, want, rtol=1e-5)
    check_gradient(make_layer(text), make_blobs(a, b, sim), [Blob()], check_bottom=[0, 1])


def test_contrastive_loss_backward_adds_1e4_to_the_distance():
    # A dissimilar pair 1e-3 apart: Caffe divides by (d + 1e-4), which is visible here.
    a = np.array([[1e-3, 0]], np.float32).reshape(1, 2, 1, 1)
    b = np.zeros((1, 2, 1, 1), np.float32)
    layer = make_layer('type: "ContrastiveLoss" contrastive_loss_param { margin: 1.5 }')
    bottom = make_blobs(a, b, np.zeros(1, np.float32))
    (loss,) = run(layer, bottom)
    loss.diff[...] = 2.0
    layer.backward([loss], [True, True, False], bottom)
    want = -2.0 * (1.5 - 1e-3) / (1e-3 + 1e-4) * 1e-3
    np.testing.assert_allclose(bottom[0].diff.ravel(), [want, 0], rtol=1e-5)
    np.testing.assert_allclose(bottom[1].diff.ravel(), [-want, 0], rtol=1e-5)


def test_multinomial_logistic_loss():
    p = np.random.RandomState(2).uniform(0.3, 1.0, (4, 3)).astype(np.float32)
    lab = np.array([0, 2, 1, 2], np.float32)
    text = 'type: "MultinomialLogisticLoss"'
    (loss,) = run(make_layer(text), make_blobs(p, lab))
    np.testing.assert_allclose(loss.data, -np.log(p[np.arange(4), [0, 2, 1, 2]]).mean(), rtol=1e-6)
    check_gradient(make_layer(text), make_blobs(p, lab), [Blob()], check_bottom=[0], step=1e-3)
    p[1, 2] = 0  # clamped at 1e-20 before the log
    (loss,) = run(make_layer(text), make_blobs(p, lab))
    assert np.isfinite(loss.data) and loss.data > 11


# --- recurrent ---------------------------------------------------------------------------------

RECURRENT = (
    "recurrent_param {{ num_output: 3 {extra} "
    'weight_filler {{ type: "uniform" min: -0.5 max: 0.5 }} '
    'bias_filler {{ type: "gaussian" std: 0.2 }} }}'
)
CONT = np.array([[0, 0], [1, 1], [1, 0]], np.float32)


def recurrent_layer(kind, static=False, expose=False):
    rng.set_random_seed(11)
    bottoms = ["x", "cont"] + (["xs"] if static else [])
    tops = ["y"]
    if expose:
        bottoms += ["h0"] + (["c0"] if kind == "LSTM" else [])
        tops += ["hT"] + (["cT"] if kind == "LSTM" else [])
    text = f'type: "{kind}" ' + "".join(f'bottom: "{b}" ' for b in bottoms)
    text += "".join(f'top: "{t}" ' for t in tops)
    text += RECURRENT.format(extra="expose_hidden: true" if expose else "")
    return make_layer(text)


def rnn_reference(blobs, x, cont, xs=None, h0=None):
    """Per-stream, per-step loop straight from the RNN equations (float64)."""
    w = [b.data.astype(np.float64) for b in blobs]
    if xs is None:
        w_xh, b_h, w_hh, w_ho, b_o = w
    else:
        w_xh, b_h, w_xs, w_hh, w_ho, b_o = w
    t_steps, n = cont.shape
    out = np.zeros((t_steps, n, 3))
    h_last = np.zeros((n, 3))
    for s in range(n):
        h = np.zeros(3) if h0 is None else h0[0, s].astype(np.float64)
        for t in range(t_steps):
            a = w_hh @ (cont[t, s] * h) + w_xh @ x[t, s].ravel() + b_h
            if xs is not None:
                a += w_xs @ xs[s].ravel()
            h = np.tanh(a)
            out[t, s] = np.tanh(w_ho @ h + b_o)
        h_last[s] = h
    return out, h_last


def lstm_reference(blobs, x, cont, xs=None, h0=None, c0=None):
    w = [b.data.astype(np.float64) for b in blobs]
    if xs is None:
        w_xc, b_c, w_hc = w
    else:
        w_xc, b_c, w_xs, w_hc = w
    t_steps, n = cont.shape
    out = np.zeros((t_steps, n, 3))
    last = np.zeros((2, n, 3))
    for s in range(n):
        h = np.zeros(3) if h0 is None else h0[0, s].astype(np.float64)
        c = np.zeros(3) if c0 is None else c0[0, s].astype(np.float64)
        for t in range(t_steps):
            g = w_hc @ (cont[t, s] * h) + w_xc @ x[t, s].ravel() + b_c
            if xs is not None:
                g += w_xs @ xs[s].ravel()
            i, f, o = sigmoid(g[:3]), sigmoid(g[3:6]), sigmoid(g[6:9])
            c = cont[t, s] * f * c + i * np.tanh(g[9:])
            h = o * np.tanh(c)
            out[t, s] = h
        last[:, s] = h, c
    return out, last


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
@pytest.mark.parametrize("static", [False, True])
def test_recurrent(kind, static):
    x = randn(3, 2, 2, 2)  # T x N x 2 x 2: features flattened to D = 4
    xs = randn(2, 3, seed=1) if static else None
    arrays = [x, CONT] + ([xs] if static else [])
    layer = recurrent_layer(kind, static)
    (y,) = run(layer, make_blobs(*arrays))
    n_blobs = {"RNN": 5, "LSTM": 3}[kind] + int(static)
    assert len(layer.blobs) == n_blobs
    ref = rnn_reference if kind == "RNN" else lstm_reference
    want, _ = ref(layer.blobs, x, CONT, xs)
    np.testing.assert_allclose(y.data, want, rtol=1e-5, atol=1e-6)
    check = [0, 2] if static else [0]
    check_gradient(recurrent_layer(kind, static), make_blobs(*arrays), [Blob()], check_bottom=check)


def test_recurrent_blob_shapes():
    rnn = recurrent_layer("RNN", static=True)
    run(rnn, make_blobs(randn(3, 2, 4), CONT, randn(2, 5)))
    assert [b.shape for b in rnn.blobs] == [(3, 4), (3,), (3, 5), (3, 3), (3, 3), (3,)]
    lstm = recurrent_layer("LSTM")
    run(lstm, make_blobs(randn(3, 2, 4), CONT))
    assert [b.shape for b in lstm.blobs] == [(12, 4), (12,), (12, 3)]
    assert lstm.no_grad_bottoms == (1,)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_recurrent_expose_hidden(kind):
    x = randn(3, 2, 4)
    cont = np.ones((3, 2), np.float32)
    cont[2, 1] = 0
    states = [randn(1, 2, 3, seed=5 + k) for k in range(1 if kind == "RNN" else 2)]
    layer = recurrent_layer(kind, expose=True)
    assert layer.no_grad_bottoms == (1,) + tuple(range(2, 2 + len(states)))
    bottom = make_blobs(x, cont, *states)
    tops = run(layer, bottom, tops=1 + len(states))
    if kind == "RNN":
        want, h_last = rnn_reference(layer.blobs, x, cont, h0=states[0])
        np.testing.assert_allclose(tops[1].data[0], h_last, rtol=1e-5, atol=1e-6)
    else:
        want, last = lstm_reference(layer.blobs, x, cont, h0=states[0], c0=states[1])
        np.testing.assert_allclose(tops[1].data[0], last[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tops[2].data[0], last[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tops[0].data, want, rtol=1e-5, atol=1e-6)
    # The final-state tops carry no gradient back (Caffe only shares their data): zero
    # weights on them, and the initial states are never written.
    weights = [randn(*tops[0].shape, seed=9)] + [np.zeros(t.shape) for t in tops[1:]]
    layer = recurrent_layer(kind, expose=True)
    bottom = make_blobs(x, cont, *states)
    tops = [Blob() for _ in tops]
    check_gradient(layer, bottom, tops, check_bottom=[0], top_weights=weights)
    for b in bottom[2:]:
        b.diff[...] = np.nan
    layer.backward(tops, [True, False] + [True] * len(states), bottom)
    assert all(np.isnan(b.diff).all() for b in bottom[2:])


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_recurrent_state_carries_over_between_forwards(kind):
    x1, x2 = randn(3, 2, 4), randn(3, 2, 4, seed=1)
    cont = np.ones((3, 2), np.float32)
    cont[0, 0] = 0  # stream 0 restarts, stream 1 continues from the previous forward
    layer = recurrent_layer(kind)
    bottom = make_blobs(x1, cont)
    (y,) = run(layer, bottom)
    ref = rnn_reference if kind == "RNN" else lstm_reference
    _, last = ref(layer.blobs, x1, cont)
    bottom[0].data[...] = x2
    layer.reshape(bottom, [y])
    layer.forward(bottom, [y])
    if kind == "RNN":
        want, _ = rnn_reference(layer.blobs, x2, cont, h0=last[None])
    else:
        want, _ = lstm_reference(layer.blobs, x2, cont, h0=last[0][None], c0=last[1][None])
    np.testing.assert_allclose(y.data, want, rtol=1e-5, atol=1e-6)


def test_recurrent_rejects_cont_gradient_and_bad_shapes():
    layer = recurrent_layer("RNN")
    bottom = make_blobs(randn(3, 2, 4), CONT)
    (y,) = run(layer, bottom)
    with pytest.raises(LayerError, match="sequence indicators"):
        layer.backward([y], [True, True], bottom)
    with pytest.raises(LayerError, match="cont"):
        run(recurrent_layer("RNN"), make_blobs(randn(3, 2, 4), CONT[:2]))


def test_lstm_unit():
    c_prev, gates = randn(1, 3, 2), randn(1, 3, 8, seed=1)
    cont = np.array([[1, 0, 1]], np.float32)
    layer = make_layer('type: "LSTMUnit"')
    c, h = run(layer, make_blobs(c_prev, gates, cont), tops=2)
    g = gates[0].astype(np.float64)
    i, f, o, gg = sigmoid(g[:, :2]), sigmoid(g[:, 2:4]), sigmoid(g[:, 4:6]), np.tanh(g[:, 6:])
    want_c = cont[0][:, None] * f * c_prev[0] + i * gg
    np.testing.assert_allclose(c.data[0], want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.data[0], o * np.tanh(want_c), rtol=1e-5, atol=1e-6)
    check_gradient(
        make_layer('type: "LSTMUnit"'),
        make_blobs(c_prev, gates, cont),
        [Blob(), Blob()],
        check_bottom=[0, 1],
    )


# --- golden parity (BVLC Caffe) ----------------------------------------------------------------

GOLDEN_CASES = [
    "absval",
    "argmax",
    "argmax_axis",
    "argmax_axis_maxval",
    "argmax_topk_maxval",
    "batch_reindex",
    "bnll",
    "clip",
    "contrastive_loss",
    "contrastive_loss_legacy",
    "crop",
    "crop_axis1",
    "elu",
    "elu_alpha",
    "embed",
    "exp",
    "exp_base2",
    "filter",
    "hinge_loss_l1",
    "hinge_loss_l2",
    "infogain_loss",
    "infogain_loss_3bottom",
    "log",
    "log_base10",
    "lstm",
    "lstm_expose_hidden",
    "lstm_unit",
    "multinomial_logistic_loss",
    "mvn",
    "mvn_across_channels",
    "mvn_eps",
    "mvn_mean_only",
    "parameter",
    "power",
    "power_frac",
    "power_scale_only",
    "prelu",
    "prelu_shared",
    "reduction_asum",
    "reduction_mean",
    "reduction_sum",
    "reduction_sumsq",
    "rnn",
    "rnn_static",
    "sigmoid_ce_loss",
    "sigmoid_ce_loss_ignore_valid",
    "silence",
    "swish",
    "swish_beta",
    "threshold",
    "tile",
    "tile_axis_last",
]


@pytest.mark.parametrize("case", golden.cases("layers", GOLDEN_CASES))
def test_golden(case):
    golden.run_net_case(case)
