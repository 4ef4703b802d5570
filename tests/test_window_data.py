"""WindowData (R-CNN window sampling): window-file parsing, fg/bg batches, warp geometry with
context padding and mirroring, mean / scale, square mode, errors, and a net built around it."""

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import io
from engine.data import images
from engine.layer import LayerError
from engine.layers.window_data import WindowFile
from engine.proto import caffe_pb2


def write_image(path, img):
    path.write_bytes(images.encode_image(img, "png"))  # lossless: read back bit for bit
    return img


def random_image(h, w, seed, low=0):
    return np.random.RandomState(seed).randint(low, 256, (h, w, 3)).astype(np.uint8)


def window_file(path, blocks):
    """blocks: [(image name, (h, w), [(class, overlap, x1, y1, x2, y2), ...])]."""
    lines = []
    for i, (name, (h, w), windows) in enumerate(blocks):
        lines += [f"# {i}", name, "3", str(h), str(w), str(len(windows))]
        lines += [" ".join(str(v) for v in win) for win in windows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_layer(source, root, params="", transform="", batch_size=2, prefetch=0):
    text = (
        f'name: "win" type: "WindowData" top: "data" top: "label" '
        f'window_data_param {{ source: "{source}" root_folder: "{root}/" '
        f"batch_size: {batch_size} {params} }} "
        f"transform_param {{ {transform} }} data_param {{ prefetch: {prefetch} }}"
    )
    layer = engine.layer.create_layer(
        text_format.Parse(text, caffe_pb2.LayerParameter()), caffe_pb2.TRAIN
    )
    top = [engine.Blob(), engine.Blob()]
    layer.setup([], top)
    return layer, top


def forward(layer, top):
    layer.reshape([], top)
    layer.forward([], top)
    return top[0].data.copy(), top[1].data.copy()


def chw(img):
    return img.transpose(2, 0, 1).astype(np.float32)


@pytest.fixture
def one_image(tmp_path):
    """A 20 x 20 image with no zero pixels, and a helper writing a one-window file for it."""
    img = write_image(tmp_path / "a.png", random_image(20, 20, 1, low=1))

    def source(*box, overlap=0.0, cls=0):
        return window_file(tmp_path / "w.txt", [("a.png", (20, 20), [(cls, overlap, *box)])])

    return img, source


def test_fg_bg_split_labels_and_unused_windows(tmp_path):
    for name, value in [("a.png", 10), ("b.png", 200), ("c.png", 100)]:
        write_image(tmp_path / name, np.full((12, 16, 3), value, np.uint8))
    source = window_file(
        tmp_path / "w.txt",
        [
            ("a.png", (12, 16), [(3, 0.9, 0, 0, 7, 7), (7, 0.1, 2, 2, 9, 9)]),
            ("b.png", (12, 16), [(5, 0.5, 1, 1, 8, 8), (6, 0.29, 0, 0, 15, 11)]),
            # between the thresholds (0.3 <= overlap < 0.5): never used
            ("c.png", (12, 16), [(9, 0.4, 0, 0, 5, 5), (4, 0.3, 0, 0, 15, 11)]),
        ],
    )
    parsed = WindowFile.read(source, 0.5, 0.3, str(tmp_path) + "/")
    assert parsed.fg[:, 1].tolist() == [3, 5] and parsed.fg[:, 0].tolist() == [0, 1]
    assert parsed.bg[:, 1].tolist() == [0, 0] and parsed.bg_lines == [8, 16]
    assert parsed.paths[2] == f"{tmp_path}/c.png"
    engine.set_random_seed(0)
    layer, top = make_layer(
        source, tmp_path, "bg_threshold: 0.3 fg_fraction: 0.375", "crop_size: 4", 8
    )
    assert top[0].shape == (8, 3, 4, 4) and top[1].shape == (8,)
    fg_seen = set()
    for _ in range(6):
        data, label = forward(layer, top)
        assert (label[:5] == 0).all()  # int(8 * 0.375) = 3 foreground, last
        assert set(label[5:].tolist()) <= {3, 5}
        fg_seen |= set(label[5:].tolist())
        # foreground from a.png has class 3, from b.png class 5; c.png is never used
        for d, lab in zip(data, label):
            assert np.unique(d).tolist() in ([10.0], [200.0])
            if lab:
                assert d[0, 0, 0] == {3: 10, 5: 200}[lab]
    assert fg_seen == {3, 5}
    layer.close()


def test_whole_image_window_is_a_bilinear_resize(tmp_path):
    img = write_image(tmp_path / "a.png", random_image(7, 9, 2))
    source = window_file(tmp_path / "w.txt", [("a.png", (7, 9), [(0, 0.0, 0, 0, 8, 6)])])
    layer, top = make_layer(source, tmp_path, transform="crop_size: 5", prefetch=2)
    data, label = forward(layer, top)
    expected = chw(images.resize_linear(img, 5, 5))
    assert np.array_equal(data[0], expected) and np.array_equal(data[1], expected)
    assert label.tolist() == [0, 0]
    layer.close()


def test_mirror_gives_the_flipped_crop(one_image, tmp_path):
    img, source = one_image
    engine.set_random_seed(5)
    layer, top = make_layer(
        source(2, 3, 11, 8), tmp_path, "fg_fraction: 0", "crop_size: 6 mirror: true", batch_size=8
    )
    data, _ = forward(layer, top)
    plain = chw(images.resize_linear(img[3:9, 2:12], 6, 6))
    flipped = plain[:, :, ::-1]
    kinds = [np.array_equal(d, plain) + 2 * np.array_equal(d, flipped) for d in data]
    assert set(kinds) == {1, 2}  # every item one of the two, both present


def test_context_pad_zero_pads_outside_the_image(one_image, tmp_path):
    img, source = one_image
    # Window (0, 0)-(9, 9), crop 16, context_pad 2: scale 16 / 12 grows it to (-2, -2)-(12, 12);
    # clipped to (0, 0)-(12, 12) and warped to round(13 * 16 / 15) = 14 pixels after a pad of
    # round(2 * 16 / 15) = 2 at the top and left.
    engine.set_random_seed(0)
    layer, top = make_layer(
        source(0, 0, 9, 9), tmp_path, "context_pad: 2", "crop_size: 16", batch_size=1
    )
    data, _ = forward(layer, top)
    patch = chw(images.resize_linear(img[0:13, 0:13], 14, 14))
    assert (data[0, :, :2, :] == 0).all() and (data[0, :, :, :2] == 0).all()
    assert np.array_equal(data[0, :, 2:, 2:], patch) and (patch > 0).any()
    # Mirrored, the left pad moves to the right: the image fills columns 0..13.
    layer, top = make_layer(
        source(0, 0, 9, 9),
        tmp_path,
        "context_pad: 2 fg_fraction: 0",
        "crop_size: 16 mirror: true",
        batch_size=8,
    )
    data, _ = forward(layer, top)
    mirrored = [d for d in data if d[0, 5, 0] != 0]
    assert mirrored and len(mirrored) < 8
    for d in mirrored:
        assert (d[:, :2, :] == 0).all() and (d[:, :, 14:] == 0).all()
        assert np.array_equal(d[:, 2:, :14], patch[:, :, ::-1])


def test_square_mode(one_image, tmp_path):
    img, source = one_image
    # Window (2, 4)-(5, 13) is 4 wide, 10 high: squared to 10 x 10 around (4, 9) gives
    # (-1, 4)-(9, 14); clipped x from 0, crop 11 keeps the scale at 1, so one zero column.
    layer, top = make_layer(
        source(2, 4, 5, 13), tmp_path, 'crop_mode: "square"', "crop_size: 11", batch_size=1
    )
    data, _ = forward(layer, top)
    assert (data[0, :, :, 0] == 0).all()
    assert np.array_equal(data[0, :, :, 1:], chw(img[4:15, 0:10]))
    warp, top = make_layer(source(2, 4, 5, 13), tmp_path, transform="crop_size: 11", batch_size=1)
    assert np.array_equal(
        forward(warp, top)[0][0], chw(images.resize_linear(img[4:14, 2:6], 11, 11))
    )


def test_mean_value_and_scale(one_image, tmp_path, caplog):
    img, source = one_image
    mean = np.array([10, 20, 30], np.float32).reshape(3, 1, 1)
    expected = chw(images.resize_linear(img, 5, 5)) - mean
    for scale_in, factor in [("window_data_param", 0.5), ("transform_param", 1.0)]:
        # Caffe's WindowData scales by window_data_param.scale only: transform_param's scale
        # is ignored (with a warning here).
        caplog.clear()
        layer, top = make_layer(
            source(0, 0, 19, 19),
            tmp_path,
            params="scale: 0.5" if scale_in == "window_data_param" else "",
            transform="crop_size: 5 mean_value: 10 mean_value: 20 mean_value: 30"
            + (" scale: 0.5" if scale_in == "transform_param" else ""),
            batch_size=1,
        )
        data, _ = forward(layer, top)
        np.testing.assert_array_equal(data[0], expected * np.float32(factor))
        warned = "transform_param.scale 0.5 is ignored" in caplog.text
        assert warned == (scale_in == "transform_param")


def test_legacy_fields_and_mean_file_centre_crop(one_image, tmp_path):
    img, source = one_image
    mean = np.random.RandomState(3).rand(1, 3, 9, 9).astype(np.float32) * 50
    io.write_binary(str(tmp_path / "mean.binaryproto"), io.array_to_blobproto(mean))
    # The old window_data_param fields move into transform_param, as Caffe's upgrade does.
    layer, top = make_layer(
        source(0, 0, 19, 19),
        tmp_path,
        f'crop_size: 5 scale: 2 mean_file: "{tmp_path / "mean.binaryproto"}"',
        batch_size=1,
    )
    data, _ = forward(layer, top)
    expected = (chw(images.resize_linear(img, 5, 5)) - mean[0, :, 2:7, 2:7]) * np.float32(2)
    np.testing.assert_allclose(data[0], expected, rtol=1e-6)


def test_cache_images_survives_a_deleted_file(one_image, tmp_path):
    img, source = one_image
    layer, top = make_layer(
        source(0, 0, 19, 19), tmp_path, "cache_images: true", "crop_size: 20", batch_size=1
    )
    (tmp_path / "a.png").unlink()
    assert np.array_equal(forward(layer, top)[0][0], chw(img))
    layer, top = make_layer(source(0, 0, 19, 19), tmp_path, transform="crop_size: 20")
    with pytest.raises(LayerError, match=r"w.txt:7: .*a.png: cannot read image"):
        forward(layer, top)


def test_errors_name_file_and_line(one_image, tmp_path):
    _, source = one_image
    path = source(0, 0, 19, 19)
    bad = tmp_path / "bad.txt"
    bad.write_text(open(path).read().replace("0 0.0 0 0 19 19", "0 0.0 0 x 19 19"))
    with pytest.raises(LayerError, match=r"bad.txt:7: expected window y1, got 'x'"):
        make_layer(str(bad), tmp_path, transform="crop_size: 4")
    bad.write_text(open(path).read().replace("0 0.0 0 0 19 19", "0 0.9 0 0 19 19"))
    with pytest.raises(LayerError, match=r"bad.txt:7: foreground window .* must be > 0"):
        make_layer(str(bad), tmp_path, transform="crop_size: 4")
    bad.write_text("# 0\na.png\n3\n20\n")
    with pytest.raises(LayerError, match=r"bad.txt:4: file ends where width was expected"):
        make_layer(str(bad), tmp_path, transform="crop_size: 4")
    bad.write_text("\n")
    with pytest.raises(LayerError, match=r"bad.txt: window file is empty"):
        make_layer(str(bad), tmp_path, transform="crop_size: 4")
    with pytest.raises(LayerError, match=r"no foreground windows"):
        make_layer(path, tmp_path, "fg_fraction: 0.5", "crop_size: 4")
    with pytest.raises(LayerError, match=r"crop_size must be positive"):
        make_layer(path, tmp_path)
    # A window outside the image fails when it is cut, naming its line.
    outside = source(10, 10, 25, 19)
    layer, top = make_layer(outside, tmp_path, transform="crop_size: 4")
    with pytest.raises(LayerError, match=r"w.txt:7: window \[10, 10, 25, 19\].*outside"):
        forward(layer, top)


def test_net_with_window_data_runs_and_repeats_under_a_seed(one_image, tmp_path):
    _, _ = one_image
    write_image(tmp_path / "b.png", random_image(16, 24, 4))
    source = window_file(
        tmp_path / "w.txt",
        [
            ("a.png", (20, 20), [(1, 0.8, 2, 2, 15, 15), (0, 0.1, 0, 0, 9, 19)]),
            ("b.png", (16, 24), [(2, 0.6, 4, 2, 20, 13), (3, 0.2, 10, 5, 23, 15)]),
        ],
    )
    net_text = f"""
    layer {{ name: "win" type: "WindowData" top: "data" top: "label"
      window_data_param {{ source: "{source}" root_folder: "{tmp_path}/" batch_size: 4
                          fg_fraction: 0.5 context_pad: 1 }}
      transform_param {{ crop_size: 8 mirror: true mean_value: 104 mean_value: 117
                        mean_value: 123 }} }}
    layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
      inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
    """
    runs = []
    for _ in range(2):
        engine.set_random_seed(11)
        net = engine.Net(text_format.Parse(net_text, caffe_pb2.NetParameter()), engine.TRAIN)
        assert net.blobs["data"].shape == (4, 3, 8, 8)
        out = [net.forward() for _ in range(3)]
        net.backward()
        assert all(np.isfinite(o["loss"]) for o in out)
        runs.append((net.blobs["data"].data.copy(), net.blobs["label"].data.copy()))
        net.layers[0].close()
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][1][:2].tolist() == [0, 0] and set(runs[0][1][2:].tolist()) <= {1, 2}
