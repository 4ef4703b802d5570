"""Convolution through the Fourier transform (engine.fourier): the transforms against NumPy's
FFT, the layer against the im2col path and finite differences, golden parity with the path
forced on, and when the cost model picks it."""

import golden
import numpy as np
import pytest
from gradient_check import check_gradient, make_blobs
from test_layers_vision import FILLERS, conv_layer, make_layer, randn, ref_conv, run, setup

from engine import fourier
from engine.blob import Blob
from engine.layers import conv as conv_module
from engine.proto.caffe_pb2 import TEST, TRAIN

# (convolution_param, input shape): stride 1, dilation 1, one group; odd and even frames,
# rectangular kernels and images, padding beyond the kernel, a 1-pixel output.
GEOMETRIES = {
    "pad2_k5": ("num_output: 4 kernel_size: 5 pad: 2", (3, 3, 8, 8)),
    "valid_k5": ("num_output: 5 kernel_size: 5", (2, 4, 9, 7)),
    "rect": ("num_output: 3 kernel_h: 3 kernel_w: 5 pad_h: 1 pad_w: 2", (2, 2, 6, 9)),
    "wide_pad": ("num_output: 2 kernel_size: 3 pad: 3", (2, 3, 5, 5)),
    "nobias": ("num_output: 3 kernel_size: 2 bias_term: false", (2, 3, 6, 5)),
    "one_pixel": ("num_output: 2 kernel_size: 4", (3, 2, 4, 4)),
}


@pytest.fixture
def forced(monkeypatch):
    """Every eligible convolution through the transform, forward included."""
    monkeypatch.setattr(conv_module, "FOURIER_GAIN", 0.0)
    monkeypatch.setenv(fourier.FORWARD_ENV, "1")


@pytest.mark.parametrize("shape", [(5, 7), (8, 8), (6, 9)])
@pytest.mark.parametrize("side", ["image", "map", "kernel"])
def test_spectrum_is_the_fft_of_the_padded_frame_and_inverts(shape, side):
    plan = fourier.Plan(shape, (3, 2), (2, 1), np.float64)
    (h, w), (oh, ow) = plan.sides[side]
    signals = np.random.RandomState(0).standard_normal((4, h, w))
    spec = np.empty(plan.spectrum_shape(4))
    plan.spectrum(side, signals, spec)
    frame = np.zeros((4,) + plan.frame)
    frame[:, oh : oh + h, ow : ow + w] = signals
    ref = np.fft.rfft2(frame).transpose(1, 2, 0)
    np.testing.assert_allclose(spec[0], ref.real, atol=1e-10)
    np.testing.assert_allclose(spec[1], ref.imag, atol=1e-10)
    back = np.empty_like(signals)
    plan.inverse(side, spec, back)
    np.testing.assert_allclose(back, signals, atol=1e-10)


def test_complex_products_with_conjugates():
    rs = np.random.RandomState(1)
    a = rs.standard_normal((2, 5, 3, 4)).astype(np.float32)
    b = rs.standard_normal((2, 5, 4, 6)).astype(np.float32)
    ac, bc = a[0] + 1j * a[1], b[0] + 1j * b[1]
    for conj_a in (False, True):
        for conj_b in (False, True):
            out = np.empty((2, 5, 3, 6), np.float32)
            fourier.cmatmul(a, b, out, conj_a=conj_a, conj_b=conj_b)
            ref = (ac.conj() if conj_a else ac) @ (bc.conj() if conj_b else bc)
            np.testing.assert_allclose(out[0] + 1j * out[1], ref, rtol=1e-5, atol=1e-5)


def _forward_backward(layer, x, weights, top_diff, weight_diff):
    bottom, top = setup(layer, x)
    for blob, value in zip(layer.blobs, weights):
        blob.data[...] = value
    (y,) = run(layer, bottom, top)
    top[0].diff[...] = top_diff
    for blob in layer.blobs:
        blob.diff[...] = weight_diff[: blob.count].reshape(blob.shape)
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy(), [blob.diff.copy() for blob in layer.blobs]


@pytest.mark.parametrize("forward", ["0", "1"])  # on TRAIN-phase layers
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_fourier_path_matches_im2col_path(monkeypatch, geometry, forward):
    """Forward (when enabled), bottom, weight and bias gradients equal the GEMM path's; the
    parameter gradients add to what the diffs held."""
    params, shape = GEOMETRIES[geometry]
    monkeypatch.setattr(conv_module, "FOURIER_GAIN", 0.0)
    monkeypatch.setenv(fourier.FORWARD_ENV, forward)
    x = randn(*shape)
    ours = conv_layer("Convolution", params)
    gemm = conv_layer("Convolution", params + " engine: CAFFE")
    probe_b, probe_t = setup(ours, x)
    assert ours.fourier is not None and ours.fourier_forward == (forward == "1")
    y_shape = run(ours, probe_b, probe_t)[0].shape
    weights = [blob.data.copy() for blob in ours.blobs]
    top_diff = randn(*y_shape, seed=5)
    held = randn(1000, seed=6)
    got = _forward_backward(ours, x, weights, top_diff, held)
    want = _forward_backward(gemm, x, weights, top_diff, held)
    assert gemm.fourier is None
    for a, b, what in zip(got[:2], want[:2], ("top", "bottom diff")):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max(), err_msg=what)
    for a, b in zip(got[2], want[2]):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())
    bias = weights[1] if len(weights) > 1 else None
    ref = ref_conv(x, weights[0], bias, (1, 1), ours.pad, (1, 1), 1)
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_fourier_path_gradient_check(forced, geometry):
    params, shape = GEOMETRIES[geometry]
    layer = conv_layer("Convolution", params)
    bottom, top = setup(layer, randn(*shape))
    assert layer.fourier is not None
    check_gradient(layer, bottom, top)


def test_fourier_path_over_two_bottoms_keeps_each_spectrum(forced):
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 3 pad: 1")
    x0, x1 = randn(2, 3, 6, 6), randn(2, 3, 6, 6, seed=1)
    bottom = make_blobs(x0, x1)
    top = [Blob(), Blob()]
    layer.setup(bottom, top)
    assert layer.fourier is not None
    y0, y1 = run(layer, bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(y0, ref_conv(x0, w, b, (1, 1), (1, 1), (1, 1), 1), atol=1e-5)
    np.testing.assert_allclose(y1, ref_conv(x1, w, b, (1, 1), (1, 1), (1, 1), 1), atol=1e-5)
    check_gradient(layer, bottom, top)


def _picks(params, shape):
    layer = conv_layer("Convolution", params)
    setup(layer, np.zeros(shape, np.float32))
    return layer.fourier is not None


def test_cost_model_picks_the_transform_only_where_it_saves_work():
    # LeNet at batch 64: conv2 (20 -> 50, 5x5 on 12x12) saves 2.5x, conv1 (1 channel) not.
    assert _picks("num_output: 50 kernel_size: 5", (64, 20, 12, 12))
    assert not _picks("num_output: 20 kernel_size: 5", (64, 1, 28, 28))
    # CIFAR10-quick conv2 and conv3 at batch 100, not conv1 (3 channels).
    assert _picks("num_output: 32 kernel_size: 5 pad: 2", (100, 32, 16, 16))
    assert _picks("num_output: 64 kernel_size: 5 pad: 2", (100, 32, 8, 8))
    assert not _picks("num_output: 32 kernel_size: 5 pad: 2", (100, 3, 32, 32))
    # Large images: dense transforms cost more than they save.
    assert not _picks("num_output: 64 kernel_size: 3 pad: 1", (2, 64, 224, 224))
    # Many channels: VGG-16's conv4_2 would save multiply-adds, but its kernel spectrum
    # would take 1 GB; GoogLeNet's inception_4e/5x5 at batch 8 is fine.
    assert not _picks("num_output: 512 kernel_size: 3 pad: 1", (8, 512, 28, 28))
    assert _picks("num_output: 128 kernel_size: 5 pad: 2", (8, 32, 14, 14))
    # Outside its reach: strides, dilation, groups, engine: CAFFE.
    assert not _picks("num_output: 50 kernel_size: 5 stride: 2", (64, 20, 12, 12))
    assert not _picks("num_output: 50 kernel_size: 5 dilation: 2", (64, 20, 12, 12))
    assert not _picks("num_output: 50 kernel_size: 5 group: 2", (64, 20, 12, 12))
    assert not _picks("num_output: 50 kernel_size: 5 engine: CAFFE", (64, 20, 12, 12))


@pytest.mark.parametrize(
    "value, train_forward, test_forward",
    [(None, False, True), ("test", False, True), ("1", True, True), ("all", True, True)]
    + [("0", False, False), ("none", False, False), ("off", False, False)],
)
def test_which_forwards_take_the_transform(monkeypatch, value, train_forward, test_forward):
    """By default TEST nets' forwards take it and TRAIN forwards keep Caffe's GEMM."""
    if value is None:
        monkeypatch.delenv(fourier.FORWARD_ENV, raising=False)
    else:
        monkeypatch.setenv(fourier.FORWARD_ENV, value)
    for phase, expected in ((TRAIN, train_forward), (TEST, test_forward)):
        layer = make_layer(
            "name: 'c' type: 'Convolution' convolution_param { num_output: 50 kernel_size: 5 }",
            phase,
        )
        setup(layer, np.zeros((64, 20, 12, 12), np.float32))
        assert layer.fourier is not None and layer.fourier_forward == expected, phase


def test_a_bad_forward_setting_is_named(monkeypatch):
    monkeypatch.setenv(fourier.FORWARD_ENV, "sometimes")
    layer = conv_layer("Convolution", "num_output: 50 kernel_size: 5")
    with pytest.raises(ValueError, match="ENGINE_FOURIER_FORWARD='sometimes'.*test, all, none"):
        setup(layer, np.zeros((64, 20, 12, 12), np.float32))


def test_a_test_net_runs_backward_after_a_transform_forward(monkeypatch):
    """A TEST net keeps no spectrum; its backward transforms the bottom again."""
    params, shape = GEOMETRIES["pad2_k5"]
    monkeypatch.setattr(conv_module, "FOURIER_GAIN", 0.0)
    monkeypatch.delenv(fourier.FORWARD_ENV, raising=False)
    text = f"name: 'c' type: 'Convolution' convolution_param {{ {params} {FILLERS} }}"
    ours = make_layer(text, TEST, seed=3)
    gemm = make_layer(text.replace(params, params + " engine: CAFFE"), TEST, seed=3)
    x = randn(*shape)
    probe_b, probe_t = setup(ours, x)
    weights = [blob.data.copy() for blob in ours.blobs]
    assert ours.fourier_forward
    top_diff = randn(*run(ours, probe_b, probe_t)[0].shape, seed=5)
    held = randn(1000, seed=6)
    got = _forward_backward(ours, x, weights, top_diff, held)
    want = _forward_backward(gemm, x, weights, top_diff, held)
    assert gemm.fourier is None
    assert not [key for key in ours._buf if key[0] == "spectrum"], "a TEST forward kept one"
    for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())


@pytest.mark.parametrize(
    "case",
    golden.cases("layers", ["conv_basic", "conv_nobias"])
    + golden.cases("nets", ["lenet", "cifar10_quick", "cifar10_full"]),
)
def test_golden_parity_with_the_transform_forced(forced, case):
    net = golden.run_net_case(case)
    used = [layer for layer in net.layers if getattr(layer, "fourier", None) is not None]
    assert used, "no convolution took the Fourier path"
