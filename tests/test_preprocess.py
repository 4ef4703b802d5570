"""pycaffe's caffe.io preprocessing: Transformer, load_image, resize_image, oversample."""

import numpy as np
import pytest
from PIL import Image

import engine as caffe


def test_transformer_pipeline_and_inverse():
    t = caffe.io.Transformer({"data": (1, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    img = np.random.RandomState(0).rand(2, 2, 3).astype(np.float32)  # H x W x RGB
    out = t.preprocess("data", img)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    expected = (img.transpose(2, 0, 1)[::-1] * 255 - np.array([10, 20, 30])[:, None, None]) * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(t.deprocess("data", out[None]), img, rtol=1e-5, atol=1e-6)


def test_transformer_resizes_to_the_input_and_checks_arguments():
    t = caffe.io.Transformer({"data": (1, 3, 4, 6)})
    t.set_transpose("data", (2, 0, 1))
    assert t.preprocess("data", np.ones((8, 8, 3), np.float32)).shape == (3, 4, 6)
    with pytest.raises(KeyError, match="not one of the net inputs"):
        t.preprocess("nope", np.ones((4, 6, 3)))
    with pytest.raises(ValueError, match="channel swap"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="mean shape"):
        t.set_mean("data", np.zeros((3, 5, 5)))
    t.set_mean("data", np.zeros((3, 4, 6)))  # elementwise mean of the blob's shape is fine


def test_resize_image_bilinear_half_pixel():
    im = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[:, :, None]
    out = caffe.io.resize_image(im, (4, 4))
    assert out.shape == (4, 4, 1)
    np.testing.assert_allclose(out[0, :, 0], [0, 0.25, 0.75, 1])
    np.testing.assert_allclose(out[:, 0, 0], [0, 0.5, 1.5, 2])
    const = np.full((5, 7, 3), 0.3, np.float32)
    np.testing.assert_allclose(caffe.io.resize_image(const, (3, 2)), 0.3, rtol=1e-6)
    assert caffe.io.resize_image(im, (3, 3), interp_order=0).shape == (3, 3, 1)


def test_oversample_gives_corners_centre_and_mirrors():
    im = np.arange(4 * 6, dtype=np.float32).reshape(4, 6, 1)
    crops = caffe.io.oversample([im, im + 100], (2, 2))
    assert crops.shape == (20, 2, 2, 1)
    np.testing.assert_array_equal(crops[0, :, :, 0], [[0, 1], [6, 7]])  # top-left
    np.testing.assert_array_equal(crops[3, :, :, 0], [[16, 17], [22, 23]])  # bottom-right
    np.testing.assert_array_equal(crops[4, :, :, 0], [[8, 9], [14, 15]])  # centre
    np.testing.assert_array_equal(crops[5], crops[0][:, ::-1])  # mirrors follow
    np.testing.assert_array_equal(crops[10], crops[0] + 100)


def test_load_image_rgb_in_unit_range(tmp_path):
    px = np.zeros((2, 3, 3), np.uint8)
    px[0, 0] = (255, 0, 0)  # red
    Image.fromarray(px).save(tmp_path / "a.png")
    img = caffe.io.load_image(str(tmp_path / "a.png"))
    assert img.shape == (2, 3, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img[0, 0], [1, 0, 0])
    grey = caffe.io.load_image(str(tmp_path / "a.png"), color=False)
    assert grey.shape == (2, 3, 1)
