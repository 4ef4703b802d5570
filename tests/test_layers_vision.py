"""Vision layers (Convolution, Deconvolution, Im2col, Pooling, SPP, InnerProduct, LRN) and
im2col/col2im: forward against direct computations, gradient checks, Caffe's shape rules
and golden parity with BVLC Caffe."""

import golden
import numpy as np
import pytest
from google.protobuf import text_format
from gradient_check import check_gradient, make_blobs

from engine import rng as engine_rng
from engine.blob import Blob
from engine.im2col import (
    col2im,
    col2im_nlast,
    conv_out_size,
    im2col,
    shift_work_shape,
    split_gemms_exact,
)
from engine.layer import LayerError, create_layer
from engine.layers import conv as conv_module
from engine.layers import pooling as pooling_module
from engine.layers.pooling import pooled_size
from engine.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make_layer(text, phase=TRAIN, seed=1701):
    engine_rng.set_random_seed(seed)
    return create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()), phase)


def setup(layer, *arrays, tops=1):
    bottom = make_blobs(*arrays)
    top = [Blob() for _ in range(tops)]
    layer.setup(bottom, top)
    return bottom, top


def run(layer, bottom, top):
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return [t.data.copy() for t in top]


def distinct(shape, seed=0, gap=0.1):
    """Values with pairwise gaps >= `gap` (no ties, no kinks for max-type layers)."""
    n = int(np.prod(shape))
    v = np.random.RandomState(seed).permutation(n).astype(np.float64) - n / 2
    return (v * gap).reshape(shape).astype(np.float32)


def randn(*shape, seed=0):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Direct reference computations (independent of the engine's im2col)
# ------------------------------------------------------------------------------------------
def ref_conv(x, w, b, stride, pad, dil, group):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    y = np.zeros((n, o, ho, wo))
    og = o // group
    for g in range(group):
        for oo in range(g * og, (g + 1) * og):
            for yy in range(ho):
                for zz in range(wo):
                    hs, ws = yy * stride[0], zz * stride[1]
                    patch = xp[
                        :,
                        g * cg : (g + 1) * cg,
                        hs : hs + dil[0] * (kh - 1) + 1 : dil[0],
                        ws : ws + dil[1] * (kw - 1) + 1 : dil[1],
                    ]
                    y[:, oo, yy, zz] = (patch * w[oo]).sum(axis=(1, 2, 3))
    if b is not None:
        y += b[None, :, None, None]
    return y


def ref_deconv(x, w, b, stride, pad, dil, group):
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    ho = stride[0] * (h - 1) + dil[0] * (kh - 1) + 1
    wo = stride[1] * (wd - 1) + dil[1] * (kw - 1) + 1
    out = np.zeros((n, og * group, ho, wo))
    cg = c // group
    for ci in range(c):
        g = ci // cg
        for yy in range(h):
            for zz in range(wd):
                for i in range(kh):
                    for j in range(kw):
                        oh, ow = yy * stride[0] + i * dil[0], zz * stride[1] + j * dil[1]
                        out[:, g * og : (g + 1) * og, oh, ow] += (
                            x[:, ci, yy, zz][:, None] * w[ci, :, i, j][None, :]
                        )
    out = out[:, :, pad[0] : ho - pad[0], pad[1] : wo - pad[1]]
    if b is not None:
        out = out + b[None, :, None, None]
    return out


def ref_pool(x, method, kernel, stride, pad, ceil=True):
    """Caffe's pooling loops, transcribed: returns (top, argmax flat index)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    any_pad = pad[0] > 0 or pad[1] > 0
    ho = pooled_size(h, kh, pad[0], stride[0], ceil, any_pad)
    wo = pooled_size(w, kw, pad[1], stride[1], ceil, any_pad)
    y = np.zeros((n, c, ho, wo))
    idx = np.full((n, c, ho, wo), -1.0)
    for a in range(ho):
        for b in range(wo):
            hs, ws = a * stride[0] - pad[0], b * stride[1] - pad[1]
            he, we = min(hs + kh, h + pad[0]), min(ws + kw, w + pad[1])
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            win = x[:, :, hs:he, ws:we].astype(np.float64)
            if method == "MAX":
                flat = win.reshape(n, c, -1)
                k = flat.argmax(axis=2)
                y[:, :, a, b] = flat.max(axis=2)
                ww = we - ws
                idx[:, :, a, b] = (hs + k // ww) * w + (ws + k % ww)
            else:
                y[:, :, a, b] = win.sum(axis=(2, 3)) / size
    return y, idx


# ------------------------------------------------------------------------------------------
# im2col / col2im
# ------------------------------------------------------------------------------------------
IM2COL_GEOMS = [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 4), (1, 0), (1, 2), (1, 1)),
    ((3, 3), (2, 2), (2, 2), (1, 1)),
    ((3, 3), (2, 1), (1, 2), (2, 2)),
    ((1, 1), (0, 0), (1, 1), (1, 1)),
    ((5, 5), (2, 2), (1, 1), (1, 1)),
]


def ref_im2col(x, kernel, pad, stride, dil):
    n, c, h, w = x.shape
    ho = conv_out_size(h, kernel[0], pad[0], stride[0], dil[0])
    wo = conv_out_size(w, kernel[1], pad[1], stride[1], dil[1])
    col = np.zeros((c, kernel[0], kernel[1], n, ho, wo), np.float32)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            for yy in range(ho):
                for zz in range(wo):
                    hh = yy * stride[0] - pad[0] + i * dil[0]
                    ww = zz * stride[1] - pad[1] + j * dil[1]
                    if 0 <= hh < h and 0 <= ww < w:
                        col[:, i, j, :, yy, zz] = x[:, :, hh, ww].T
    return col


@pytest.mark.parametrize("geom", IM2COL_GEOMS)
def test_im2col_matches_reference_and_col2im_is_adjoint(geom):
    x = randn(2, 3, 7, 9)
    col = im2col(x, *geom)
    np.testing.assert_array_equal(col, ref_im2col(x, *geom))
    g = randn(*col.shape, seed=1)
    dx = col2im(g, x.shape, *geom)
    # <im2col(x), g> == <x, col2im(g)>
    np.testing.assert_allclose(
        np.sum(col.astype(np.float64) * g), np.sum(x.astype(np.float64) * dx), rtol=1e-5
    )


@pytest.mark.parametrize("geom", IM2COL_GEOMS)
def test_batch_minor_col2im_matches_col2im(geom):
    x = randn(3, 4, 7, 9)
    shape = ref_im2col(x, *geom).shape  # (C, kh, kw, N, Ho, Wo)
    g = randn(*shape, seed=1)
    padded = (4, 7 + 2 * geom[1][0], 9 + 2 * geom[1][1], 3)
    work = np.empty(padded, np.float32)
    dx = col2im_nlast(np.moveaxis(g, 3, -1).copy(), *geom, out=np.empty_like(x), work=work)
    np.testing.assert_allclose(dx, col2im(g, x.shape, *geom), atol=1e-5)


def test_im2col_large_batch_threaded_path_and_buffers():
    # Big enough to be split between threads; compared with a sliding-window reference.
    x = randn(64, 3, 16, 16)
    geom = ((3, 3), (1, 1), (2, 2), (1, 1))
    ref = ref_im2col(x, *geom)
    out = np.empty(ref.shape, np.float32)
    work = np.full((3, 64, 18, 18), np.nan, np.float32)  # another user's leftovers
    for _ in range(2):  # buffers reused
        np.testing.assert_array_equal(im2col(x, *geom, out=out, work=work), ref)
    g = randn(*ref.shape, seed=2)
    full = col2im(g, x.shape, *geom)
    per_image = np.concatenate(
        [
            col2im(np.ascontiguousarray(g[:, :, :, n : n + 1]), (1, 3, 16, 16), *geom)
            for n in range(64)
        ]
    )
    np.testing.assert_allclose(full, per_image, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "geom",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((2, 4), (1, 0), (1, 1), (1, 1)),
        ((3, 2), (0, 3), (1, 1), (2, 3)),
        ((5, 5), (4, 4), (1, 1), (1, 1)),
    ],
)
def test_im2col_stride1_shifted_path_matches_reference_with_dirty_work(geom):
    # Work arrays are shared between layers (engine.im2col.workspace): whatever they hold
    # outside the input must not leak into the columns. Two inputs through the same buffers,
    # against the reference and the padded-work path.
    shape = shift_work_shape((6, 3, 7, 9), *geom)
    assert shape is not None
    work = np.full(shape, np.nan, np.float32)
    for seed in (0, 1):
        x = randn(6, 3, 7, 9, seed=seed)
        col = im2col(x, *geom, work=work)
        np.testing.assert_array_equal(col, ref_im2col(x, *geom))
        padded = np.full((3, 6, 7 + 2 * geom[1][0], 9 + 2 * geom[1][1]), np.nan, np.float32)
        np.testing.assert_array_equal(col, im2col(x, *geom, work=padded))
        work[...] = 5.0
    assert shift_work_shape((6, 3, 7, 9), (3, 3), (1, 1), (1, 2), (1, 1)) is None


def test_convolutions_sharing_work_arrays_in_turn_stay_exact():
    """Layers of different geometry take turns with the thread's shared work arrays (shifted
    input, padded input, columns): each still computes its own convolution."""
    layers = [
        ("num_output: 4 kernel_size: 3 pad: 2", (2, 3, 6, 6), (1, 1), (2, 2)),
        ("num_output: 3 kernel_size: 5 pad: 1", (3, 2, 9, 7), (1, 1), (1, 1)),
        ("num_output: 2 kernel_size: 3 stride: 2 pad: 1", (2, 3, 8, 8), (2, 2), (1, 1)),
        ("num_output: 5 kernel_size: 2", (2, 4, 5, 5), (1, 1), (0, 0)),
    ]
    built = []
    for k, (params, shape, stride, pad) in enumerate(layers):
        layer = conv_layer("Convolution", params + " engine: CAFFE")
        x = randn(*shape, seed=k)
        bottom, top = setup(layer, x)
        want = ref_conv(x, layer.blobs[0].data, layer.blobs[1].data, stride, pad, (1, 1), 1)
        built.append((layer, bottom, top, want))
    for _ in range(2):
        for layer, bottom, top, want in built + built[::-1]:
            (y,) = run(layer, bottom, top)
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_im2col_nd_one_and_three_spatial_axes():
    x1 = randn(2, 3, 10)
    col = im2col(x1, (3,), (1,), (2,), (1,))
    ref = ref_im2col(x1[:, :, None, :], (1, 3), (0, 1), (1, 2), (1, 1))
    np.testing.assert_array_equal(col, ref.reshape(col.shape))
    x3 = randn(2, 2, 4, 5, 3)
    col3 = im2col(x3, (2, 2, 2), (0, 1, 0), (1, 2, 1), (1, 1, 1))
    assert col3.shape == (2, 2, 2, 2, 2, 3, 3, 2)
    # spot value: c=1, k=(1,0,1), n=1, out=(2,1,0) -> input (3, 1*2-1+0, 0+1)
    assert col3[1, 1, 0, 1, 1, 2, 1, 0] == x3[1, 1, 3, 1, 1]


def test_conv_out_size():
    assert conv_out_size(7, 3, 1, 2) == 4
    assert conv_out_size(9, 3, 2, 1, dilation=2) == 9
    assert conv_out_size(28, 5, 0, 1) == 24


# ------------------------------------------------------------------------------------------
# Convolution / Deconvolution / Im2col layers
# ------------------------------------------------------------------------------------------
CONV_CASES = {
    "basic": ("num_output: 3 kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    "pad_stride": ("num_output: 2 kernel_size: 3 pad: 1 stride: 2", (2, 2), (1, 1), (1, 1), 1),
    "rect": (
        "num_output: 2 kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2",
        (1, 2),
        (1, 0),
        (1, 1),
        1,
    ),
    "dilation": ("num_output: 2 kernel_size: 2 pad: 1 dilation: 2", (1, 1), (1, 1), (2, 2), 1),
    "group": ("num_output: 4 kernel_size: 2 group: 2", (1, 1), (0, 0), (1, 1), 2),
    "1x1": ("num_output: 3 kernel_size: 1", (1, 1), (0, 0), (1, 1), 1),
    "1x1_group": ("num_output: 4 kernel_size: 1 group: 2", (1, 1), (0, 0), (1, 1), 2),
    "nobias": ("num_output: 2 kernel_size: 2 bias_term: false", (1, 1), (0, 0), (1, 1), 1),
    # Same-size stride-1 convolutions: bottom gradient through the flipped weights.
    "same": ("num_output: 3 kernel_size: 3 pad: 1", (1, 1), (1, 1), (1, 1), 1),
    "same_rect": (
        "num_output: 4 kernel_h: 3 kernel_w: 5 pad_h: 1 pad_w: 2",
        (1, 1),
        (1, 2),
        (1, 1),
        1,
    ),
}
FILLERS = "weight_filler { type: 'gaussian' std: 0.3 } bias_filler { type: 'gaussian' std: 0.3 }"


def conv_layer(kind, params):
    return make_layer(
        f"name: 'c' type: '{kind}' convolution_param {{ {params} {FILLERS} }}", seed=3
    )


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_convolution_forward_and_gradient(case):
    params, stride, pad, dil, group = CONV_CASES[case]
    layer = conv_layer("Convolution", params)
    x = randn(2, 4, 5, 6)
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    w = layer.blobs[0].data
    b = layer.blobs[1].data if len(layer.blobs) > 1 else None
    ref = ref_conv(x, w, b, stride, pad, dil, group)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("case", ["basic", "pad_stride", "rect", "dilation", "group", "1x1"])
def test_deconvolution_forward_and_gradient(case):
    params, stride, pad, dil, group = CONV_CASES[case]
    layer = conv_layer("Deconvolution", params)
    x = randn(2, 4, 3, 4)
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    w = layer.blobs[0].data
    assert w.shape[0] == 4  # (C_in, C_out / group, kh, kw)
    b = layer.blobs[1].data if len(layer.blobs) > 1 else None
    np.testing.assert_allclose(
        y, ref_deconv(x, w, b, stride, pad, dil, group), rtol=1e-5, atol=1e-5
    )
    check_gradient(layer, bottom, top)


def test_deconvolution_is_adjoint_of_convolution():
    conv = conv_layer(
        "Convolution", "num_output: 3 kernel_size: 3 pad: 1 stride: 2 bias_term: false"
    )
    deconv = conv_layer(
        "Deconvolution", "num_output: 2 kernel_size: 3 pad: 1 stride: 2 bias_term: false"
    )
    x = randn(2, 2, 7, 7)
    cb, ct = setup(conv, x)
    (y,) = run(conv, cb, ct)
    deconv_b, deconv_t = setup(deconv, randn(*y.shape, seed=4))
    deconv.blobs[0].data[...] = conv.blobs[0].data
    (z,) = run(deconv, deconv_b, deconv_t)
    assert z.shape == x.shape
    lhs = np.sum(y.astype(np.float64) * deconv_b[0].data)
    rhs = np.sum(x.astype(np.float64) * z)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_convolution_shared_weights_over_two_bottoms():
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 3 pad: 1")
    x0, x1 = randn(2, 3, 5, 5), randn(2, 3, 5, 5, seed=1)
    bottom = make_blobs(x0, x1)
    top = [Blob(), Blob()]
    layer.setup(bottom, top)
    y0, y1 = run(layer, bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(y0, ref_conv(x0, w, b, (1, 1), (1, 1), (1, 1), 1), atol=1e-5)
    np.testing.assert_allclose(y1, ref_conv(x1, w, b, (1, 1), (1, 1), (1, 1), 1), atol=1e-5)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("keep", [True, False])
def test_convolution_chunked_batch_matches_single_chunk(monkeypatch, keep):
    # Chunks of 2 images, with the forward's columns kept or rebuilt in backward.
    x = randn(5, 3, 6, 6)
    results = []
    for chunked in (False, True):
        layer = conv_layer("Convolution", "num_output: 4 kernel_size: 3 pad: 1")
        if chunked:
            monkeypatch.setattr(conv_module, "COL_BUDGET", 2 * 27 * 36)
            monkeypatch.setattr(conv_module, "KEEP_BUDGET", conv_module.KEEP_BUDGET * keep)
        bottom, top = setup(layer, x)
        (y,) = run(layer, bottom, top)
        top[0].diff[...] = randn(*y.shape, seed=5)
        for _ in range(2):  # a second backward accumulates the same weight gradient
            layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    assert layer.chunk == 2 and layer.keep_cols == keep
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_test_phase_convolution_keeps_no_columns_and_backward_rebuilds_them():
    # A TEST net (features, test nets beside a training net) holds no batch of columns per
    # layer; a backward through it (deploy-net saliency) rebuilds them: same bits as TRAIN.
    x = randn(3, 3, 7, 7)
    dy = None
    results = []
    for phase in (TRAIN, TEST):
        layer = make_layer(
            f"name: 'c' type: 'Convolution' convolution_param {{ num_output: 4 kernel_size: 3 "
            f"pad: 1 stride: 2 {FILLERS} }}",
            phase,
            seed=3,
        )
        bottom, top = setup(layer, x)
        (y,) = run(layer, bottom, top)
        dy = randn(*y.shape, seed=4) if dy is None else dy
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        assert layer.keep_cols == (phase == TRAIN)
        assert any(k[0] == "cols" for k in layer._buf) == (phase == TRAIN)
        results.append((y, bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("keep", [True, False])
def test_convolutions_interleaved_share_the_workspace_safely(monkeypatch, keep):
    # Two layers run as in a net (forward 1, forward 2, backward 2, backward 1), with chunked
    # columns in the thread's shared workspace: each must give what it gives alone.
    monkeypatch.setattr(conv_module, "COL_BUDGET", 2 * 36 * 36)
    monkeypatch.setattr(conv_module, "KEEP_BUDGET", conv_module.KEEP_BUDGET * keep)
    specs = [
        ("num_output: 4 kernel_size: 3 pad: 1", (5, 4, 6, 6)),
        ("num_output: 3 kernel_size: 3", (5, 4, 6, 6)),
    ]

    def make(i):
        layer = conv_layer("Convolution", specs[i][0])
        bottom, top = setup(layer, randn(*specs[i][1], seed=i))
        return layer, bottom, top

    alone = []
    for i in range(2):
        layer, bottom, top = make(i)
        (y,) = run(layer, bottom, top)
        top[0].diff[...] = randn(*y.shape, seed=10 + i)
        layer.backward(top, [True], bottom)
        alone.append((y.copy(), bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    layers = [make(i) for i in range(2)]
    for layer, bottom, top in layers:
        run(layer, bottom, top)
    for i, (layer, bottom, top) in reversed(list(enumerate(layers))):
        top[0].diff[...] = randn(*top[0].shape, seed=10 + i)
        layer.backward(top, [True], bottom)
    for (layer, bottom, top), ref in zip(layers, alone):
        assert layer.chunk < 5 and layer.keep_cols == keep
        got = (top[0].data, bottom[0].diff, layer.blobs[0].diff)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "case", ["basic", "pad_stride", "rect", "dilation", "group", "same", "same_rect"]
)
def test_convolution_bottom_gradient_paths_agree(case):
    # Caffe's column order, the batch-minor one (picked by a cost model) for col2im, and
    # (same-size stride-1 layers) the convolution of the top diff with the flipped weights.
    params = CONV_CASES[case][0]
    grads = []
    for batch_minor, flip in ((False, False), (True, False), (False, True)):
        layer = conv_layer("Convolution", params)
        bottom, top = setup(layer, randn(3, 4, 6, 7))
        (y,) = run(layer, bottom, top)
        if flip and not layer.flip_dgrad:
            continue
        layer.dgrad_nlast, layer.flip_dgrad = batch_minor, flip
        top[0].diff[...] = randn(*y.shape, seed=2)
        layer.backward(top, [True], bottom)
        grads.append(bottom[0].diff.copy())
    assert len(grads) == (3 if case.startswith("same") else 2)
    for g in grads[1:]:
        np.testing.assert_allclose(grads[0], g, rtol=1e-5, atol=1e-6)


PER_IMAGE_CASES = {c: (CONV_CASES[c][0], (4, 6, 7)) for c in CONV_CASES}
# CIFAR10-quick's conv2 (fewer images): a shape whose split products round alike on OpenBLAS.
PER_IMAGE_CASES["cifar_conv2"] = ("num_output: 32 kernel_size: 5 pad: 2", (32, 16, 16))


@pytest.mark.parametrize(
    "case", ["basic", "pad_stride", "rect", "dilation", "same", "nobias", "cifar_conv2"]
)
@pytest.mark.parametrize("num", [5, 40])  # 40 images: enough work for the threads to split
def test_convolution_forward_per_image_gemms_match_one_gemm(monkeypatch, case, num):
    # Wide maps run one GEMM per image into the top, a few images per thread at a time; small
    # ones one GEMM per chunk of the batch. Where the BLAS rounds split products alike, the
    # two agree bit for bit (Caffe's per-image GEMM order is what TRAIN forwards must keep).
    spec, shape = PER_IMAGE_CASES[case]
    x = randn(num, *shape)
    probe = conv_layer("Convolution", spec)
    setup(probe, x)
    # Three images' columns per block: blocks of several images, and a partial last one.
    monkeypatch.setattr(conv_module, "FUSE_BUDGET", 3 * probe.kernel_dim * probe.map_dim)
    outs = []
    for min_pixels in (0, 10**9):
        monkeypatch.setattr(conv_module, "FUSE_MIN_PIXELS", min_pixels)
        layer = conv_layer("Convolution", spec)
        bottom, top = setup(layer, x)
        exact = split_gemms_exact(
            layer.num_output // layer.group, layer.kernel_dim // layer.group, layer.map_dim
        )
        assert layer.fused == (exact and min_pixels == 0)
        (y,) = run(layer, bottom, top)
        outs.append(y.copy())
    if exact:
        np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_split_gemms_exact_compares_real_products(monkeypatch):
    # The check runs the split products; a BLAS whose split products round differently (here:
    # one that perturbs every product of a narrow GEMM) is caught.
    real = np.matmul

    def narrow_rounds_off(a, b, out=None):
        result = real(a, b, out=out)
        if b.ndim == 2 and b.shape[1] == 11:
            result += np.float32(1e-3)
        return result

    monkeypatch.setattr(np, "matmul", narrow_rounds_off)
    assert not split_gemms_exact(3, 7, 11)


@pytest.mark.parametrize("num_output", [1, 3])
def test_convolution_bias_gradient_adds_images_in_order(num_output):
    # Caffe adds each image's sums to the bias diff in turn: bitwise that order.
    layer = conv_layer("Convolution", f"num_output: {num_output} kernel_size: 3 pad: 1")
    bottom, top = setup(layer, randn(6, 2, 5, 5))
    (y,) = run(layer, bottom, top)
    top[0].diff[...] = randn(*y.shape, seed=7) * 100
    start = randn(num_output, seed=8)
    layer.blobs[1].diff[...] = start
    layer.backward(top, [False], bottom)
    sums = np.matmul(top[0].diff.reshape(6, num_output, -1), np.ones(25, np.float32))
    expect = start.copy()
    for n in range(6):
        expect += sums[n]
    np.testing.assert_array_equal(layer.blobs[1].diff, expect)


def test_convolution_flipped_bottom_gradient_only_where_it_applies():
    def flips(params, shape=(2, 4, 6, 6)):
        layer = conv_layer("Convolution", params)
        setup(layer, randn(*shape))
        return layer.flip_dgrad

    assert flips("num_output: 4 kernel_size: 5 pad: 2")
    assert not flips("num_output: 8 kernel_size: 5 pad: 2")  # more outputs than inputs
    assert not flips("num_output: 4 kernel_size: 5")  # valid conv: input larger than output
    assert not flips("num_output: 4 kernel_size: 3 pad: 1 stride: 2")
    assert not flips("num_output: 4 kernel_size: 3 pad: 2 dilation: 2")
    assert not flips("num_output: 4 kernel_size: 3 pad: 1 group: 2")


def test_convolution_3d_and_axis():
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 2 pad: 1 stride: 2")
    x = randn(2, 2, 3, 4, 3)
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    assert y.shape == (2, 2, 2, 3, 2)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    # Element (n, o, 1, 2, 1) by hand: window starting at input (1, 3, 1).
    win = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (1, 1)))[1, :, 2:4, 4:6, 2:4]
    np.testing.assert_allclose(y[1, 1, 1, 2, 1], (win * w[1]).sum() + b[1], rtol=1e-5)
    check_gradient(layer, bottom, top)


def test_convolution_backward_respects_propagate_flags():
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 3")
    bottom, top = setup(layer, randn(2, 3, 5, 5))
    run(layer, bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = 7
    layer.param_propagate_down = [False, True]
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7)
    assert np.all(layer.blobs[0].diff == 0)
    np.testing.assert_allclose(layer.blobs[1].diff, [18, 18])  # 2 images x 3 x 3 outputs


def test_convolution_configuration_errors():
    with pytest.raises(LayerError, match="not both"):
        setup(
            conv_layer("Convolution", "num_output: 2 kernel_size: 3 kernel_h: 2 kernel_w: 2"),
            randn(1, 2, 5, 5),
        )
    with pytest.raises(LayerError, match="multiple of group"):
        setup(conv_layer("Convolution", "num_output: 3 kernel_size: 1 group: 2"), randn(1, 2, 5, 5))
    with pytest.raises(LayerError, match="required"):
        setup(conv_layer("Convolution", "num_output: 3"), randn(1, 2, 5, 5))
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 3")
    bottom, top = setup(layer, randn(1, 2, 5, 5))
    with pytest.raises(LayerError, match="channels"):
        layer.reshape(make_blobs(randn(1, 3, 5, 5)), top)


def test_im2col_layer_forward_and_gradient():
    layer = make_layer(
        "name: 'i' type: 'Im2col' convolution_param { kernel_size: 3 pad: 1 stride: 2 }"
    )
    x = randn(2, 3, 5, 6)
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    assert y.shape == (2, 27, 3, 3)
    ref = ref_im2col(x, (3, 3), (1, 1), (2, 2), (1, 1))  # (C, kh, kw, N, Ho, Wo)
    np.testing.assert_array_equal(y, ref.reshape(27, 2, 3, 3).transpose(1, 0, 2, 3))
    check_gradient(layer, bottom, top)


# ------------------------------------------------------------------------------------------
# Pooling
# ------------------------------------------------------------------------------------------
def pool_layer(params, phase=TRAIN):
    return make_layer(f"name: 'p' type: 'Pooling' pooling_param {{ {params} }}", phase)


POOL_CASES = {
    "k2s2": ("kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0), True),
    "k3s2_ceil": ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),
    "k3s2p1": ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),
    "k3s1p1": ("kernel_size: 3 stride: 1 pad: 1", (3, 3), (1, 1), (1, 1), True),
    "k2s2p1_clip": ("kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), True),
    "rect": (
        "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0",
        (3, 2),
        (2, 3),
        (1, 0),
        True,
    ),
    "floor": ("kernel_size: 2 stride: 2 round_mode: FLOOR", (2, 2), (2, 2), (0, 0), False),
    "k2s3_floor": ("kernel_size: 2 stride: 3 round_mode: FLOOR", (2, 2), (3, 3), (0, 0), False),
}


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pooling_forward_and_gradient(method, case):
    params, kernel, stride, pad, ceil = POOL_CASES[case]
    layer = pool_layer(f"pool: {method} {params}")
    x = distinct((2, 2, 7, 9))
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    ref, _ = ref_pool(x, method, kernel, stride, pad, ceil)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pooling_ave_dense_matrix_matches_phase_path(monkeypatch, case):
    # Small planes run AVE as a GEMM with the averaging matrix; the phase-plane path (taken
    # for larger planes) must give the same forward and backward.
    params, kernel, stride, pad, ceil = POOL_CASES[case]
    x = distinct((3, 2, 7, 9))
    dy = None
    results = []
    for limit in (pooling_module.DENSE_AVE_MAX, 0):
        monkeypatch.setattr(pooling_module, "DENSE_AVE_MAX", limit)
        layer = pool_layer(f"pool: AVE {params}")
        bottom, top = setup(layer, x)
        (y,) = run(layer, bottom, top)
        assert (layer._dense is not None) == (limit > 0)
        dy = randn(*y.shape, seed=4) if dy is None else dy
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy()))
    ref, _ = ref_pool(x, "AVE", kernel, stride, pad, ceil)
    np.testing.assert_allclose(results[0][0], ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["k3s2p1", "k2s2p1_clip", "rect", "k3s2_ceil"])
def test_pooling_max_mask_top(case):
    params, kernel, stride, pad, ceil = POOL_CASES[case]
    layer = pool_layer(f"pool: MAX {params}")
    x = randn(2, 3, 7, 9)
    x[0, 0, :3, :3] = 1.0  # ties: the first in scan order wins, as in Caffe
    bottom, top = setup(layer, x, tops=2)
    y, mask = run(layer, bottom, top)
    ref, idx = ref_pool(x, "MAX", kernel, stride, pad, ceil)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    np.testing.assert_array_equal(mask, idx)
    # backward routes each top diff to its argmax
    top[0].diff[...] = randn(*y.shape, seed=3)
    layer.backward(top, [True], bottom)
    expect = np.zeros(x.shape)
    flat = expect.reshape(x.shape[0] * x.shape[1], -1)
    for p, (m, d) in enumerate(
        zip(mask.reshape(flat.shape[0], -1), top[0].diff.reshape(flat.shape[0], -1))
    ):
        np.add.at(flat[p], m.astype(int), d)
    np.testing.assert_allclose(bottom[0].diff, expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_large_batch_threaded_path(method):
    layer = pool_layer(f"pool: {method} kernel_size: 3 stride: 2 pad: 1")
    x = randn(32, 16, 17, 15)
    bottom, top = setup(layer, x, tops=2 if method == "MAX" else 1)
    out = run(layer, bottom, top)
    ref, idx = ref_pool(x, method, (3, 3), (2, 2), (1, 1))
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-6)
    if method == "MAX":
        np.testing.assert_array_equal(out[1], idx)


def test_poolings_sharing_work_arrays_in_turn_stay_exact(monkeypatch):
    """Pooling layers of different geometry take turns with the thread's shared phase planes:
    padding must read as -inf (MAX, on all-negative inputs) or 0 (AVE) every time, never as
    the last layer's values."""
    monkeypatch.setattr(pooling_module, "DENSE_AVE_MAX", 0)  # AVE on the phase planes too
    cases = [
        ("MAX", "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), (2, 3, 7, 9)),
        ("AVE", "kernel_size: 3 stride: 1 pad: 1", (3, 3), (1, 1), (1, 1), (3, 2, 6, 6)),
        (
            "MAX",
            "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1",
            (3, 2),
            (2, 3),
            (1, 0),
            (2, 2, 9, 8),
        ),
        ("AVE", "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), (2, 3, 5, 7)),
    ]
    built = []
    for k, (method, params, kernel, stride, pad, shape) in enumerate(cases):
        layer = pool_layer(f"pool: {method} {params}")
        x = distinct(shape, seed=k) - 100.0  # all negative
        bottom, top = setup(layer, x, tops=2 if method == "MAX" else 1)
        ref, idx = ref_pool(x, method, kernel, stride, pad)
        dy = randn(*ref.shape, seed=10 + k)
        if method == "MAX":  # each top diff lands on its argmax
            want_dx = np.zeros(x.size)
            np.add.at(
                want_dx,
                (
                    idx
                    + np.arange(idx.shape[0] * idx.shape[1]).reshape(idx.shape[:2] + (1, 1))
                    * shape[2]
                    * shape[3]
                )
                .astype(int)
                .ravel(),
                dy.ravel(),
            )
        else:  # AVE is linear: its backward is the adjoint, checked by <y, dy> = <x, dx>
            want_dx = None
        built.append((layer, bottom, top, ref, dy, want_dx))
    for _ in range(2):
        for layer, bottom, top, ref, dy, want_dx in built + built[::-1]:
            y = run(layer, bottom, top)[0]
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
            top[0].diff[...] = dy
            layer.backward(top, [True], bottom)
            dx = bottom[0].diff
            if want_dx is not None:
                np.testing.assert_allclose(dx.ravel(), want_dx, rtol=1e-6, atol=1e-6)
            else:
                x = bottom[0].data.astype(np.float64)
                np.testing.assert_allclose(np.sum(ref * dy), np.sum(x * dx), rtol=1e-5, atol=1e-4)
                assert np.abs(dx).max() < np.abs(dy).max() * 10  # nothing stale added


def test_pooling_global():
    x = distinct((2, 3, 4, 5))
    for method in ("MAX", "AVE"):
        layer = pool_layer(f"pool: {method} global_pooling: true")
        bottom, top = setup(layer, x, tops=2 if method == "MAX" else 1)
        out = run(layer, bottom, top)
        assert out[0].shape == (2, 3, 1, 1)
        if method == "MAX":
            np.testing.assert_array_equal(out[0][..., 0, 0], x.max(axis=(2, 3)))
            np.testing.assert_array_equal(out[1][..., 0, 0], x.reshape(2, 3, -1).argmax(2))
        else:
            np.testing.assert_allclose(out[0][..., 0, 0], x.mean(axis=(2, 3)), rtol=1e-6)
        check_gradient(layer, bottom, top[:1] if method == "AVE" else top, top_weights=None)


def test_pooling_shape_rules():
    # pool_max_ceil_clip: 5x5, kernel 2, stride 2, pad 1 -> ceil gives 4, clipped to 3
    layer = pool_layer("pool: MAX kernel_size: 2 stride: 2 pad: 1")
    _, top = setup(layer, randn(1, 1, 5, 5))
    assert top[0].shape == (1, 1, 3, 3)
    assert pooled_size(5, 2, 1, 2) == 3
    assert pooled_size(7, 2, 0, 2) == 4  # ceil, partial last window
    assert pooled_size(7, 2, 0, 2, ceil_mode=False) == 3
    assert pooled_size(7, 3, 1, 2) == 4
    assert pooled_size(9, 3, 1, 2) == 5
    assert pooled_size(8, 3, 0, 2) == 4
    layer = pool_layer("pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR")
    _, top = setup(layer, randn(1, 1, 7, 9))
    assert top[0].shape == (1, 1, 3, 4)
    # the clip is applied to both axes as soon as either pad is set
    layer = pool_layer(
        "pool: MAX kernel_h: 2 kernel_w: 1 stride_h: 2 stride_w: 2 pad_h: 1 pad_w: 0"
    )
    _, top = setup(layer, randn(1, 1, 5, 4))
    assert top[0].shape == (1, 1, 3, 2)


def test_pooling_configuration_errors():
    with pytest.raises(LayerError, match="smaller than the kernel"):
        setup(pool_layer("pool: MAX kernel_size: 2 pad: 2"), randn(1, 1, 5, 5))
    with pytest.raises(LayerError, match="second"):
        setup(pool_layer("pool: AVE kernel_size: 2"), randn(1, 1, 5, 5), tops=2)
    with pytest.raises(LayerError, match="global_pooling"):
        setup(pool_layer("pool: MAX global_pooling: true kernel_size: 2"), randn(1, 1, 5, 5))
    with pytest.raises(LayerError, match="4 axes"):
        setup(pool_layer("pool: MAX kernel_size: 2"), randn(2, 5, 5))
    with pytest.raises(LayerError, match="padding"):
        setup(pool_layer("pool: STOCHASTIC kernel_size: 3 pad: 1"), randn(1, 1, 5, 5))


def test_stochastic_pooling_train_samples_in_proportion():
    layer = pool_layer("pool: STOCHASTIC kernel_size: 2 stride: 2")
    x = np.tile(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), (4000, 1, 1, 1))
    bottom, top = setup(layer, x)
    engine_rng.set_random_seed(7)
    (y,) = run(layer, bottom, top)
    freq = np.array([(y == v).mean() for v in (1, 2, 3, 4)])
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    # backward: each top diff goes to the sampled position only
    top[0].diff[...] = np.arange(4000, dtype=np.float32).reshape(y.shape)
    layer.backward(top, [True], bottom)
    d = bottom[0].diff.reshape(4000, 4)
    assert np.all((d != 0).sum(axis=1) <= 1)
    picked = np.take_along_axis(x.reshape(4000, 4), np.abs(d).argmax(axis=1)[:, None], 1)[:, 0]
    np.testing.assert_array_equal(picked[1:], y.reshape(-1)[1:])
    np.testing.assert_array_equal(d.sum(axis=1), top[0].diff.reshape(-1))


def test_stochastic_pooling_train_partial_windows_pick_inside():
    layer = pool_layer("pool: STOCHASTIC kernel_size: 3 stride: 2")
    x = np.abs(randn(3, 2, 6, 7)) + 0.1
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    assert y.shape == (3, 2, 3, 3)
    for a in range(3):
        for b in range(3):
            win = x[:, :, 2 * a : 2 * a + 3, 2 * b : 2 * b + 3].reshape(3, 2, -1)
            assert np.all(np.any(win == y[:, :, a, b][..., None], axis=2))


def test_stochastic_pooling_test_phase_forward_and_gradient():
    layer = pool_layer("pool: STOCHASTIC kernel_size: 3 stride: 2", TEST)
    x = np.abs(randn(2, 2, 7, 6)) + 0.5
    x[0, 0, :3, :3] = 0  # sum 0 -> output 0
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    ref = np.zeros_like(y)
    for a in range(y.shape[2]):
        for b in range(y.shape[3]):
            win = x[:, :, 2 * a : 2 * a + 3, 2 * b : 2 * b + 3].astype(np.float64)
            s = win.sum(axis=(2, 3))
            ref[:, :, a, b] = np.where(s > 0, (win**2).sum(axis=(2, 3)) / np.where(s > 0, s, 1), 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5)
    assert y[0, 0, 0, 0] == 0
    x[0, 0, :3, :3] = 1.0
    bottom, top = setup(layer, x)
    check_gradient(layer, bottom, top)


# ------------------------------------------------------------------------------------------
# SPP
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp_forward_and_gradient(method):
    layer = make_layer(f"name: 's' type: 'SPP' spp_param {{ pyramid_height: 3 pool: {method} }}")
    x = distinct((2, 2, 7, 9))
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    parts = []
    for level in range(3):
        bins = 2**level
        kh, kw = -(-7 // bins), -(-9 // bins)
        pad = ((kh * bins - 7 + 1) // 2, (kw * bins - 9 + 1) // 2)
        ref, _ = ref_pool(x, method, (kh, kw), (kh, kw), pad)
        assert ref.shape[2:] == (bins, bins)
        parts.append(ref.reshape(2, -1))
    np.testing.assert_allclose(y, np.concatenate(parts, axis=1), rtol=1e-6, atol=1e-6)
    assert y.shape == (2, 2 * (1 + 4 + 16))
    check_gradient(layer, bottom, top)


def test_spp_height_one_is_plain_global_pooling_and_reshapes():
    layer = make_layer("name: 's' type: 'SPP' spp_param { pyramid_height: 1 pool: AVE }")
    x = randn(2, 3, 5, 4)
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    assert y.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(y[..., 0, 0], x.mean(axis=(2, 3)), rtol=1e-5)
    layer = make_layer("name: 's' type: 'SPP' spp_param { pyramid_height: 2 pool: MAX }")
    bottom, top = setup(layer, x)
    run(layer, bottom, top)
    bottom2 = make_blobs(randn(3, 3, 8, 6))
    (y2,) = run(layer, bottom2, top)
    assert y2.shape == (3, 15)
    np.testing.assert_array_equal(y2[:, :3], bottom2[0].data.max(axis=(2, 3)))


# ------------------------------------------------------------------------------------------
# InnerProduct
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,shape,axis",
    [
        ("num_output: 4", (2, 3, 2, 2), 1),
        ("num_output: 3 axis: 2", (2, 3, 2, 2), 2),
        ("num_output: 3 bias_term: false", (4, 5), 1),
        ("num_output: 4 transpose: true", (2, 3, 2), 1),
        ("num_output: 2 axis: -1", (2, 3, 4), 2),
    ],
)
def test_inner_product_forward_and_gradient(params, shape, axis):
    layer = make_layer(
        f"name: 'ip' type: 'InnerProduct' inner_product_param {{ {params} {FILLERS} }}"
    )
    x = randn(*shape)
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    m = int(np.prod(shape[:axis]))
    w = layer.blobs[0].data.astype(np.float64)
    wt = w if "transpose" in params else w.T
    ref = x.reshape(m, -1) @ wt
    if len(layer.blobs) > 1:
        ref = ref + layer.blobs[1].data
    assert y.shape == shape[:axis] + (ref.shape[1],)
    np.testing.assert_allclose(y.reshape(m, -1), ref, rtol=1e-5, atol=1e-6)
    check_gradient(layer, bottom, top)


def test_inner_product_rejects_changed_input_size():
    layer = make_layer("name: 'ip' type: 'InnerProduct' inner_product_param { num_output: 2 }")
    _, top = setup(layer, randn(2, 6))
    with pytest.raises(LayerError, match="incompatible"):
        layer.reshape(make_blobs(randn(2, 7)), top)


# ------------------------------------------------------------------------------------------
# LRN
# ------------------------------------------------------------------------------------------
def ref_lrn(x, region, size, alpha, beta, k):
    x = x.astype(np.float64)
    half = (size - 1) // 2
    sq = x * x
    if region == "ACROSS_CHANNELS":
        c = x.shape[1]
        s = np.zeros_like(x)
        for ch in range(c):
            s[:, ch] = sq[:, max(0, ch - half) : min(c, ch + half + 1)].sum(axis=1)
        return x / (k + alpha / size * s) ** beta
    p = np.pad(sq, ((0, 0), (0, 0), (half, half), (half, half)))
    s = np.zeros_like(x)
    for i in range(size):
        for j in range(size):
            s += p[:, :, i : i + x.shape[2], j : j + x.shape[3]]
    return x / (1 + alpha / size**2 * s) ** beta


@pytest.mark.parametrize(
    "region,size,alpha,beta,k",
    [
        ("ACROSS_CHANNELS", 5, 0.1, 0.75, 2.0),
        ("ACROSS_CHANNELS", 3, 1.0, 0.6, 1.0),
        ("WITHIN_CHANNEL", 3, 0.1, 0.75, 1.0),
        ("WITHIN_CHANNEL", 5, 0.5, 0.9, 3.0),
    ],
)
def test_lrn_forward_and_gradient(region, size, alpha, beta, k):
    layer = make_layer(
        f"name: 'n' type: 'LRN' lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} "
        f"k: {k} norm_region: {region} }}"
    )
    x = randn(2, 7, 4, 5)
    bottom, top = setup(layer, x)
    (y,) = run(layer, bottom, top)
    np.testing.assert_allclose(y, ref_lrn(x, region, size, alpha, beta, k), rtol=1e-5, atol=1e-6)
    check_gradient(layer, bottom, top)


def test_lrn_rejects_even_size():
    with pytest.raises(LayerError, match="odd"):
        setup(make_layer("name: 'n' type: 'LRN' lrn_param { local_size: 4 }"), randn(1, 3, 2, 2))


# ------------------------------------------------------------------------------------------
# Golden parity with BVLC Caffe
# ------------------------------------------------------------------------------------------
GOLDEN_CASES = [
    "conv_1x1",
    "conv_basic",
    "conv_dilation",
    "conv_group",
    "conv_group_dilation_stride",
    "conv_nobias",
    "conv_pad_stride",
    "conv_rect",
    "deconv_basic",
    "deconv_group_rect",
    "deconv_upsample",
    "im2col",
    "pool_ave_ceil",
    "pool_ave_pad",
    "pool_global_ave",
    "pool_global_max",
    "pool_max",
    "pool_max_ceil_clip",
    "pool_max_floor",
    "pool_max_mask",
    "pool_max_pad_ceil",
    "pool_max_rect",
    "spp_ave",
    "spp_max",
    "ip_axis1",
    "ip_axis2",
    "ip_nobias",
    "ip_transpose",
    "lrn_across",
    "lrn_across_default",
    "lrn_within",
]


def test_golden_list_covers_every_vision_case():
    if not golden.available():
        pytest.skip("no golden suite")
    prefixes = ("conv_", "deconv_", "im2col", "pool_", "spp_", "ip_", "lrn_")
    found = {p.name for p in (golden.GOLDEN / "layers").iterdir() if p.name.startswith(prefixes)}
    assert found == set(GOLDEN_CASES)


@pytest.mark.parametrize("case", golden.cases("layers", GOLDEN_CASES))
def test_golden(case):
    net = golden.run_net_case(case)
    if case.name == "pool_max_ceil_clip":
        assert net.blobs["y"].shape == (2, 3, 3, 3)
    if case.name == "pool_max_mask":
        expected = np.load(case / "io.npz")["output/mask"]
        np.testing.assert_array_equal(net.blobs["mask"].data, expected)


# ------------------------------------------------------------------------------------------
# Threaded batch splitting
# ------------------------------------------------------------------------------------------
def test_parallel_batch_covers_range_nests_and_survives_fork():
    import os
    import threading

    from engine.im2col import parallel_batch

    n = 1 << 17
    hits = np.zeros(n, np.int64)
    names = set()

    def fn(a, b):
        names.add(threading.current_thread().name)
        hits[a:b] += 1
        parallel_batch(b - a, lambda c, d: None, n)  # nested call runs inline

    parallel_batch(n, fn, n)
    assert np.all(hits == 1)
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:  # the child must not wait on the parent's (absent) worker threads
        try:
            parallel_batch(n, fn, n)
            os._exit(0 if np.all(hits == 2) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_batched_matmul_matches_matmul_and_restores_blas_threads():
    from engine.im2col import _blas_thread_control, batched_matmul

    a = randn(7, 30, 20)
    b = randn(7, 20, 11, seed=1)
    control = _blas_thread_control()
    before = control[1]() if control else None
    out = batched_matmul(
        a, b.swapaxes(1, 2).copy().swapaxes(1, 2), np.empty((7, 30, 11), np.float32)
    )
    np.testing.assert_array_equal(out, np.matmul(a, b))  # the same GEMM per item, bit for bit
    if control:
        assert control[1]() == before
