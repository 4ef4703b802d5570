"""The data pipeline: Datum codec, LMDB I/O and sources, image decode/resize, the transformer,
prefetch, and the Data / ImageData / MemoryData / HDF5Data / HDF5Output layers, with parity
against the golden LMDBs and layer outputs made by BVLC Caffe."""

import io as pyio
import json
import logging
import os
import threading

import golden
import h5py
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

import engine
from engine.data import batches, datum, images, lmdb_io
from engine.data.prefetch import Prefetcher, PrefetchError
from engine.data.sources import DataSourceError, IterableSource, ListSource
from engine.data.transformer import DataTransformer, TransformError
from engine.layer import LayerError
from engine.layers import data_layers
from engine.proto import caffe_pb2

GDATA = golden.GOLDEN / "data"
needs_golden = pytest.mark.skipif(not GDATA.is_dir(), reason="no golden data suite")
LMDBS = ["lmdb_color32", "lmdb_png32", "lmdb_gray32", "lmdb_encoded_orig"]


def raw_bytes(arr, label):
    return datum.array_to_datum(arr, label).SerializeToString()


def write_lmdb(path, records):
    with lmdb_io.LMDBWriter(path) as w:
        for k, v in records:
            w.put(k, v)
    return str(path)


def layer_param(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def make_layer(text, phase=caffe_pb2.TEST, tops=2):
    lp = layer_param(text)
    layer = engine.layer.create_layer(lp, phase)
    top = [engine.Blob() for _ in range(tops)]
    layer.setup([], top)
    return layer, top


def forward(layer, top):
    layer.reshape([], top)
    layer.forward([], top)
    return [t.data.copy() for t in top]


@pytest.fixture
def closing():
    layers = []
    yield layers.append
    for layer in layers:
        layer.close()


# --- Datum codec -------------------------------------------------------------------------------


def test_raw_datum_round_trip_and_caffe_bytes():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    value = raw_bytes(arr, 7)
    # Caffe's CVMatToDatum layout: channels, height, width, data, label, encoded=false.
    assert value[:6] == bytes([0x08, 2, 0x10, 3, 0x18, 4])
    assert value.endswith(b"\x28\x07\x38\x00")
    got, label = datum.decode_record(value)
    assert got.dtype == np.uint8 and np.array_equal(got, arr) and label == 7


def test_float_datum_round_trip():
    arr = np.random.RandomState(0).randn(3, 2, 2).astype(np.float32)
    got, label = datum.decode_record(raw_bytes(arr, 2))
    assert got.dtype == np.float32 and np.array_equal(got, arr) and label == 2


def test_encoded_datum_is_bgr_chw():
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10  # blue
    buf = pyio.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    value = datum.encoded_datum(buf.getvalue(), 3).SerializeToString()
    arr, label = datum.decode_record(value)
    assert arr.shape == (3, 5, 6) and label == 3
    assert (arr[0] == 10).all() and (arr[2] == 200).all()  # B, G, R
    grey, _ = datum.decode_record(value, mode=images.GRAY)
    assert grey.shape == (1, 5, 6)


def test_datum_size_mismatch_names_record():
    d = caffe_pb2.Datum(channels=3, height=4, width=4, data=b"\x00" * 40, label=1)
    with pytest.raises(datum.DatumError, match=r"db key 'k7'.*40 bytes.*3x4x4 needs 48"):
        datum.decode_record(d.SerializeToString(), datum.record_name("db", b"k7"))


def test_corrupt_datum_and_bad_image_name_record():
    with pytest.raises(datum.DatumError, match="src key 'x'"):
        datum.decode_record(b"\xff\xff\xff", datum.record_name("src", b"x"))
    bad = datum.encoded_datum(b"not an image", 0).SerializeToString()
    with pytest.raises(datum.DatumError, match="src key 'y'.*cannot decode"):
        datum.decode_record(bad, datum.record_name("src", b"y"))


@pytest.mark.parametrize(
    "labels",
    [[0, 1, 2, 3], [5, 200, 7, 1000], [300, 400, 129, 16000], [-1, -5, -100, -3], [127] * 4],
)
def test_raw_batch_fast_path_matches_protobuf(labels):
    rs = np.random.RandomState(1)
    arrs = [rs.randint(0, 256, (3, 5, 4)).astype(np.uint8) for _ in labels]
    values = [raw_bytes(a, lab) for a, lab in zip(arrs, labels)]
    got = datum.decode_raw_batch(values)
    if len({len(v) for v in values}) > 1:
        assert got is None  # label varints of different lengths: record-by-record path
        return
    data, labs = got
    assert np.array_equal(data, np.stack(arrs))
    assert labs.tolist() == [datum.parse_datum(v).label for v in values] == labels


def test_raw_batch_fast_path_declines_non_uniform():
    a = np.zeros((1, 2, 2), np.uint8)
    mnist_style = caffe_pb2.Datum(channels=1, height=2, width=2, data=a.tobytes(), label=3)
    values = [raw_bytes(a, 3), mnist_style.SerializeToString()]
    assert datum.decode_raw_batch(values) is None
    # a batch in MNIST style (no `encoded` field) is fine on its own
    data, labs = datum.decode_raw_batch([mnist_style.SerializeToString()] * 2)
    assert data.shape == (2, 1, 2, 2) and labs.tolist() == [3, 3]
    other_shape = raw_bytes(np.zeros((1, 4, 1), np.uint8), 3)
    assert datum.decode_raw_batch([raw_bytes(a, 3), other_shape]) is None
    enc = datum.encoded_datum(b"\x89PNG....", 1).SerializeToString()
    assert datum.decode_raw_batch([enc]) is None
    floats = raw_bytes(np.zeros((1, 2, 2), np.float32), 1)
    assert datum.decode_raw_batch([floats]) is None


def test_raw_batch_layout_cache_switches_between_layouts():
    rs = np.random.RandomState(4)
    for shape in [(1, 4, 4), (3, 2, 2), (1, 4, 4), (2, 1, 8), (3, 2, 2)]:
        arrs = [rs.randint(0, 256, shape).astype(np.uint8) for _ in range(3)]
        data, labels = datum.decode_raw_batch([raw_bytes(a, i) for i, a in enumerate(arrs)])
        assert np.array_equal(data, np.stack(arrs)) and labels.tolist() == [0, 1, 2]
    # Same length and header as the cached layout, but a float_data field after the label.
    a = np.zeros((1, 4, 4), np.uint8)
    odd = caffe_pb2.Datum(channels=1, height=4, width=4, data=a.tobytes(), label=1)
    odd.float_data.append(1.0)
    cached = raw_bytes(a, 1)
    assert datum.decode_raw_batch([cached, odd.SerializeToString()[: len(cached)]]) is None


@needs_golden
@pytest.mark.parametrize("name", LMDBS)
def test_golden_lmdb_records_decode_exactly(name):
    meta = json.loads((GDATA / "data.json").read_text())["lmdbs"][name]["records"]
    expected = np.load(GDATA / f"expected_{name}.npz")
    records = lmdb_io.read_all(GDATA / name)
    assert [k.decode() for k, _ in records] == [r["key"] for r in meta]
    for i, (key, value) in enumerate(records):
        arr, label = datum.decode_record(value, str(key))
        exp = expected[f"record{i:02d}"]
        assert arr.shape == exp.shape and np.array_equal(arr, exp), f"{name} {key}"
        assert label == meta[i]["label"]
    if name in ("lmdb_color32", "lmdb_gray32"):
        data, labels = datum.decode_raw_batch([v for _, v in records])
        assert np.array_equal(data, np.stack([expected[f"record{i:02d}"] for i in range(20)]))
        assert labels.tolist() == [r["label"] for r in meta]


# --- images ------------------------------------------------------------------------------------


@needs_golden
def test_opencv_resize_and_grey_match_caffe_lmdbs():
    exp_color = np.load(GDATA / "expected_lmdb_color32.npz")
    exp_gray = np.load(GDATA / "expected_lmdb_gray32.npz")
    for i, line in enumerate((GDATA / "list.txt").read_text().split("\n")[:20]):
        path = str(GDATA / "images" / line.split()[0])
        color = images.hwc_to_chw(images.read_image_resized(path, 32, 32, True))
        gray = images.hwc_to_chw(images.read_image_resized(path, 32, 32, False))
        assert np.array_equal(color, exp_color[f"record{i:02d}"]), path
        assert np.array_equal(gray, exp_gray[f"record{i:02d}"]), path


def test_resize_linear_against_float_bilinear():
    rs = np.random.RandomState(0)
    img = rs.randint(0, 256, (13, 17, 3)).astype(np.uint8)
    for h, w in [(26, 34), (7, 5), (13, 30), (40, 11)]:
        got = images.resize_linear(img, h, w).astype(np.float64)

        def taps(n_src, n_dst):
            f = (np.arange(n_dst) + 0.5) * n_src / n_dst - 0.5
            s = np.floor(f)
            f = f - s
            s0 = np.clip(s, 0, n_src - 1).astype(int)
            s1 = np.clip(s + 1, 0, n_src - 1).astype(int)
            return s0, s1, f

        y0, y1, fy = taps(13, h)
        x0, x1, fx = taps(17, w)
        src = img.astype(np.float64)
        top = src[y0][:, x0] * (1 - fx)[None, :, None] + src[y0][:, x1] * fx[None, :, None]
        bot = src[y1][:, x0] * (1 - fx)[None, :, None] + src[y1][:, x1] * fx[None, :, None]
        ref = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
        assert got.shape == (h, w, 3)
        assert np.abs(got - ref).max() <= 1.0  # fixed-point rounding only
    assert np.array_equal(images.resize_linear(img, 13, 17), img)
    assert images.resize_linear(img[:, :, 0], 5, 6).shape == (5, 6)


def test_decode_modes_channels():
    rgba = np.random.RandomState(2).randint(0, 256, (4, 5, 4)).astype(np.uint8)
    buf = pyio.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    data = buf.getvalue()
    un = images.decode_image(data, images.UNCHANGED)
    assert un.shape == (4, 5, 4) and np.array_equal(un, rgba[:, :, [2, 1, 0, 3]])
    col = images.decode_image(data, images.COLOR)
    assert np.array_equal(col, rgba[:, :, [2, 1, 0]])  # alpha dropped, not blended
    gray = images.decode_image(data, images.GRAY)
    r, g, b = (rgba[:, :, i].astype(int) for i in range(3))
    ref = np.where((r == g) & (g == b), r, (9797 * r + 19234 * g + 3737 * b) >> 15)
    assert gray.shape == (4, 5, 1) and np.array_equal(gray[:, :, 0], ref)
    with pytest.raises(images.ImageDecodeError, match="myfile"):
        images.decode_image(b"garbage", what="myfile")


def test_encode_image_round_trip():
    img = np.random.RandomState(3).randint(0, 256, (6, 7, 3)).astype(np.uint8)
    assert np.array_equal(images.decode_image(images.encode_image(img, "png")), img)
    jpg = images.decode_image(images.encode_image(img, "jpg"))
    assert jpg.shape == img.shape


# --- LMDB --------------------------------------------------------------------------------------


def test_lmdb_source_wraps_peeks_and_counts(tmp_path):
    recs = [(f"{i:03d}".encode(), bytes([i])) for i in range(5)]
    path = write_lmdb(tmp_path / "db", recs)
    assert lmdb_io.count_records(path) == 5
    with lmdb_io.LMDBSource(path) as src:
        assert len(src) == 5
        assert src.peek() == recs[0]
        assert src.take(3) == recs[:3]
        assert src.take(4) == recs[3:] + recs[:2]  # straddles the wrap
        assert src.epochs == 1
        src.skip(3)
        assert src.take(1) == [recs[0]]
        assert src.position == 11  # taken and skipped, not wrapped; a peek does not count
    with lmdb_io.LMDBSource(path) as src:
        src.go_on_at(13)  # where a stream stands after 13 records: 2 passes and 3
        assert (src.position, src.peek()) == (13, recs[3])
        assert src.take(1) == [recs[3]] and src.position == 14


def test_lmdb_key_range_shards(tmp_path):
    recs = [(f"{i:04d}".encode(), bytes([i])) for i in range(11)]
    path = write_lmdb(tmp_path / "db", recs)
    ranges = lmdb_io.shard_ranges(path, 3)
    assert [n for _, n in ranges] == [4, 4, 3]
    seen = []
    for start, n in ranges:
        with lmdb_io.LMDBSource(path, start_key=start, count=n) as src:
            assert len(src) == n
            first = src.take(n)
            assert src.take(n) == first  # wraps to its own start key
            seen += first
    assert seen == recs
    with pytest.raises(DataSourceError, match="has 2 records, 5 asked"):
        lmdb_io.LMDBSource(path, start_key=b"0009", count=5)


def test_lmdb_writer_grows_map_and_refuses_existing(tmp_path):
    path = tmp_path / "big"
    with lmdb_io.LMDBWriter(path, map_size=1 << 16, commit_every=50) as w:
        for i in range(200):
            w.put(f"{i:05d}", bytes(2000))
    assert lmdb_io.count_records(path) == 200
    with pytest.raises(DataSourceError, match="already exists"):
        lmdb_io.LMDBWriter(path)


@needs_golden
def test_golden_lmdb_opens_read_only():
    # The golden folders are read-only and were written by Caffe (data.mdb + lock.mdb).
    with lmdb_io.LMDBSource(GDATA / "lmdb_color32") as src:
        assert len(src) == 20
        assert src.take(21)[-1][0] == b"00000000_img_00.png"


def test_missing_empty_and_corrupt_lmdb(tmp_path):
    with pytest.raises(DataSourceError, match="nowhere.*not found"):
        lmdb_io.LMDBSource(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataSourceError, match="no data.mdb"):
        lmdb_io.LMDBSource(tmp_path / "empty_dir")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(os.urandom(8192))
    with pytest.raises(DataSourceError, match="corrupt: cannot open LMDB"):
        lmdb_io.LMDBSource(bad)
    empty = write_lmdb(tmp_path / "empty", [])
    with pytest.raises(DataSourceError, match="no records"):
        lmdb_io.LMDBSource(empty)


def test_iterable_source_plugs_in():
    recs = [(b"a", b"1"), (b"b", b"2")]
    closed = []
    src = IterableSource(lambda: iter(recs), 2, name="arrow", on_close=lambda: closed.append(1))
    assert src.take(5) == recs * 2 + recs[:1]
    src.close()
    assert closed == [1]
    with pytest.raises(DataSourceError, match="empty: no records"):
        ListSource([], name="empty").take(1)


# --- transformer -------------------------------------------------------------------------------


def tparam(text):
    return text_format.Parse(text, caffe_pb2.TransformationParameter())


def test_transform_test_phase_centre_crop_mean_file_scale(tmp_path):
    rs = np.random.RandomState(0)
    x = rs.randint(0, 256, (2, 3, 6, 7)).astype(np.uint8)
    mean = rs.rand(3, 6, 7).astype(np.float32) * 100
    engine.io.write_binary(tmp_path / "m.binaryproto", engine.io.array_to_blobproto(mean[None]))
    t = DataTransformer(
        tparam(f'crop_size: 4 scale: 0.5 mean_file: "{tmp_path / "m.binaryproto"}"'),
        caffe_pb2.TEST,
    )
    out = t.transform(x)
    y, xo = (6 - 4) // 2, (7 - 4) // 2
    ref = x[:, :, y : y + 4, xo : xo + 4].astype(np.float32) - mean[:, y : y + 4, xo : xo + 4]
    assert np.array_equal(out, ref * np.float32(0.5))
    with pytest.raises(TransformError, match=r"rec 9.*m.binaryproto has shape 3x6x7.*3x5x5"):
        t.check((3, 5, 5), "rec 9")


def test_transform_mean_values():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    t = DataTransformer(tparam("mean_value: 1 mean_value: 2 mean_value: 3"), caffe_pb2.TEST)
    out = t.transform(x)
    assert np.array_equal(out, x - np.array([1, 2, 3], np.float32)[None, :, None, None])
    one = DataTransformer(tparam("mean_value: 5 scale: 2"), caffe_pb2.TEST).transform(x)
    assert np.array_equal(one, (x.astype(np.float32) - 5) * 2)
    with pytest.raises(TransformError, match="2 mean_value entries for an input of 3"):
        DataTransformer(tparam("mean_value: 1 mean_value: 2"), caffe_pb2.TEST).check((3, 2, 2), "r")
    with pytest.raises(TransformError, match="either mean_file or mean_value"):
        DataTransformer(tparam('mean_file: "x" mean_value: 1'), caffe_pb2.TEST)
    with pytest.raises(TransformError, match="force_color and force_gray"):
        DataTransformer(tparam("force_color: true force_gray: true"), caffe_pb2.TEST)
    with pytest.raises(TransformError, match="crop_size 5 is larger"):
        DataTransformer(tparam("crop_size: 5"), caffe_pb2.TEST).output_shape((3, 4, 9))


def test_transform_train_random_crop_and_mirror_are_windows_and_repeatable():
    x = np.random.RandomState(1).randint(0, 256, (16, 2, 6, 6)).astype(np.uint8)
    p = tparam("crop_size: 3 mirror: true mean_value: 10")

    def run(seed):
        return DataTransformer(p, caffe_pb2.TRAIN, np.random.default_rng(seed)).transform(x)

    out = run(5)
    assert np.array_equal(out, run(5))
    mirrored = offsets = 0
    for i in range(16):
        windows = {
            (a, b, m)
            for a in range(4)
            for b in range(4)
            for m in (0, 1)
            if np.array_equal(
                out[i],
                (x[i, :, a : a + 3, b : b + 3].astype(np.float32) - 10)[..., :: (-1 if m else 1)],
            )
        }
        assert windows, f"item {i} is not a (mirrored) crop window"
        mirrored += any(m for _, _, m in windows)
        offsets += any((a, b) != (1, 1) for a, b, _ in windows)
    assert 0 < mirrored < 16 and offsets > 0


def test_transform_list_of_different_sizes_with_crop():
    rs = np.random.RandomState(0)
    arrs = [rs.randint(0, 256, (3, h, w)).astype(np.uint8) for h, w in [(5, 6), (7, 4)]]
    out = DataTransformer(tparam("crop_size: 4"), caffe_pb2.TEST).transform_list(arrs)
    assert np.array_equal(out[0], arrs[0][:, 0:4, 1:5])
    assert np.array_equal(out[1], arrs[1][:, 1:5, 0:4])
    with pytest.raises(TransformError, match="different sizes"):
        DataTransformer(tparam(""), caffe_pb2.TEST).transform_list(arrs)


# --- prefetch ----------------------------------------------------------------------------------


def test_prefetcher_runs_ahead_and_stops():
    made = []

    def produce(slot):
        made.append(len(made))
        return made[-1]

    p = Prefetcher(produce, depth=3, name="t")
    got = [p.get() for _ in range(3)]
    assert got == [0, 1, 2]
    for g in got:
        p.recycle(g)
    assert p.get() == 3
    assert p.close() and not p.alive


def test_prefetcher_error_surfaces_in_main_thread():
    def produce(slot):
        raise DataSourceError("LMDB foo key '0042': broken")

    p = Prefetcher(produce, depth=2, name="layer 'data'")
    with pytest.raises(PrefetchError, match="layer 'data'.*LMDB foo key '0042': broken"):
        p.get()
    with pytest.raises(PrefetchError, match="failed earlier"):
        p.get()
    assert p.close()


# --- Data layer --------------------------------------------------------------------------------


def check_golden_case(name):
    case = GDATA / name
    meta, arrays = golden.load_case(case)
    with golden.chdir(case):
        net = engine.Net(str(case / "net.prototxt"), engine.TEST)
        calls = arrays["output/data"].shape[0]
        for i in range(calls):
            net.forward()
            for blob in ("data", "label"):
                key = f"output/{blob}"
                rtol, atol = golden.tolerance(meta, key)
                golden.assert_close(
                    net.blobs[blob].data, arrays[key][i], rtol, atol, f"{name} call {i} {key}"
                )
        for layer in net.layers:
            layer.close()


@needs_golden
@pytest.mark.parametrize("name", ["data_meanfile", "data_meanvalue", "data_wraparound"])
def test_golden_data_layer(name):
    check_golden_case(name)


def data_text(source, batch=4, extra="", transform="", prefetch=None):
    pf = f"prefetch: {prefetch}" if prefetch is not None else ""
    return (
        f'name: "data" type: "Data" top: "data" top: "label" '
        f"transform_param {{ {transform} }} "
        f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB {pf} {extra} }}'
    )


def test_data_layer_round_trip_and_wrap(tmp_path, closing):
    rs = np.random.RandomState(0)
    arrs = [rs.randint(0, 256, (3, 4, 5)).astype(np.uint8) for _ in range(5)]
    path = write_lmdb(tmp_path / "db", [(f"{i:08d}", raw_bytes(a, i)) for i, a in enumerate(arrs)])
    for prefetch in (0, 2):
        layer, top = make_layer(data_text(path, batch=3, prefetch=prefetch))
        closing(layer)
        assert top[0].shape == (3, 3, 4, 5) and top[1].shape == (3,)
        seen = []
        for _ in range(4):
            data, label = forward(layer, top)
            seen += list(zip(data, label))
        for i, (d, lab) in enumerate(seen):
            assert np.array_equal(d, arrs[i % 5]) and lab == i % 5


def test_data_layer_float_datums_and_small_records(tmp_path, closing):
    arrs = [np.full((2, 3, 3), i + 0.5, np.float32) for i in range(3)]
    path = write_lmdb(tmp_path / "db", [(f"{i}", raw_bytes(a, i)) for i, a in enumerate(arrs)])
    layer, top = make_layer(data_text(path, batch=3, transform="scale: 2 mean_value: 0.5"))
    closing(layer)
    data, label = forward(layer, top)
    assert np.array_equal(data, (np.stack(arrs) - 0.5) * 2) and label.tolist() == [0, 1, 2]
    with pytest.raises(LayerError, match=r"db key '0': crop_size 4 is larger than the input 3x3"):
        make_layer(data_text(path, batch=3, transform="crop_size: 4"))


def test_data_layer_label_top_optional(tmp_path, closing):
    path = write_lmdb(tmp_path / "db", [(b"a", raw_bytes(np.ones((1, 2, 2), np.uint8), 1))])
    text = (
        f'name: "d" type: "Data" top: "data" '
        f'data_param {{ source: "{path}" batch_size: 2 backend: LMDB }}'
    )
    layer, top = make_layer(text, tops=1)
    closing(layer)
    (data,) = forward(layer, top)
    assert data.shape == (2, 1, 2, 2) and (data == 1).all()


def test_data_layer_train_crop_mirror_repeatable(tmp_path):
    rs = np.random.RandomState(0)
    recs = [
        (f"{i:02d}", raw_bytes(rs.randint(0, 256, (3, 8, 8)).astype(np.uint8), i)) for i in range(6)
    ]
    path = write_lmdb(tmp_path / "db", recs)
    text = data_text(path, batch=6, transform="crop_size: 5 mirror: true")
    outs = []
    for _ in range(2):
        engine.set_random_seed(1234)
        layer, top = make_layer(text, phase=caffe_pb2.TRAIN)
        outs.append(forward(layer, top)[0])
        layer.close()
    assert outs[0].shape == (6, 3, 5, 5)
    assert np.array_equal(outs[0], outs[1])


def test_data_layer_encoded_varying_sizes_with_crop(tmp_path, closing):
    rs = np.random.RandomState(0)
    recs = []
    for i, (h, w) in enumerate([(9, 7), (6, 12), (8, 8)]):
        img = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
        recs.append(
            (f"{i}", datum.encoded_datum(images.encode_image(img, "png"), i).SerializeToString())
        )
    path = write_lmdb(tmp_path / "db", recs)
    layer, top = make_layer(data_text(path, batch=3, transform="crop_size: 5 force_gray: true"))
    closing(layer)
    data, label = forward(layer, top)
    assert data.shape == (3, 1, 5, 5) and label.tolist() == [0, 1, 2]


def test_data_layer_errors_name_layer_and_source(tmp_path):
    with pytest.raises(LayerError, match=r"'data'.*nowhere.*not found"):
        make_layer(data_text(tmp_path / "nowhere"))
    path = write_lmdb(tmp_path / "db", [(b"a", raw_bytes(np.ones((1, 2, 2), np.uint8), 1))])
    text = (
        f'name: "data" type: "Data" top: "data" '
        f'data_param {{ source: "{path}" batch_size: 1 backend: LEVELDB }}'
    )
    with pytest.raises(LayerError, match="LEVELDB backend is not supported"):
        make_layer(text, tops=1)
    # Caffe's default backend is LEVELDB: an unset backend on an LMDB reads the LMDB.
    text = f'name: "d" type: "Data" top: "data" data_param {{ source: "{path}" batch_size: 1 }}'
    layer, top = make_layer(text, tops=1)
    layer.close()
    with pytest.raises(LayerError, match="mean_file.*cannot read"):
        make_layer(data_text(path, transform=f'mean_file: "{tmp_path / "nomean"}"'))


def test_bad_mean_file_shape_names_mean_and_key(tmp_path):
    path = write_lmdb(tmp_path / "db", [(b"k0", raw_bytes(np.ones((3, 4, 4), np.uint8), 1))])
    engine.io.write_binary(
        tmp_path / "m.binaryproto", engine.io.array_to_blobproto(np.zeros((1, 3, 5, 5)))
    )
    text = data_text(path, transform=f'mean_file: "{tmp_path / "m.binaryproto"}"')
    with pytest.raises(LayerError, match=r"key 'k0'.*m.binaryproto has shape 3x5x5.*3x4x4"):
        make_layer(text)


def corrupt_db(tmp_path):
    good = raw_bytes(np.full((1, 2, 2), 9, np.uint8), 1)
    short = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"\x01\x02", label=2)
    bad_img = datum.encoded_datum(b"nope", 3).SerializeToString()
    recs = [(b"00_good", good), (b"01_short", short.SerializeToString()), (b"02_good", good),
            (b"03_badimg", bad_img), (b"04_good", good)]  # fmt: skip
    return write_lmdb(tmp_path / "db", recs)


def test_bad_record_in_prefetch_thread_names_source_and_key(tmp_path):
    path = corrupt_db(tmp_path)
    layer, top = make_layer(data_text(path, batch=2))
    with pytest.raises(LayerError, match=r"'data'.*db key '01_short'.*2 bytes.*1x2x2 needs 4"):
        forward(layer, top)
    layer.close()
    assert not layer._prefetcher.alive


def test_skip_bad_records_counts_in_log(tmp_path, caplog, monkeypatch):
    path = corrupt_db(tmp_path)
    monkeypatch.setenv(batches.SKIP_BAD_ENV, "1")
    layer, top = make_layer(data_text(path, batch=3, prefetch=0))
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        data, label = forward(layer, top)
    layer.close()
    assert label.tolist() == [1, 1, 1] and (data == 9).all()
    assert layer.skipped == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert any("01_short" in m and "1 skipped so far" in m for m in msgs)
    assert any("03_badimg" in m and "2 skipped so far" in m for m in msgs)


def test_every_record_bad_is_an_error(tmp_path, monkeypatch):
    bad = datum.encoded_datum(b"nope", 3).SerializeToString()
    path = write_lmdb(tmp_path / "db", [(b"a", bad), (b"b", bad)])
    monkeypatch.setenv(batches.SKIP_BAD_ENV, "1")
    with pytest.raises(LayerError, match="no valid record"):
        make_layer(data_text(path, batch=1))


def test_prefetch_thread_stops_on_close_and_gc(tmp_path):
    path = write_lmdb(tmp_path / "db", [(b"a", raw_bytes(np.ones((1, 2, 2), np.uint8), 1))])
    layer, top = make_layer(data_text(path, batch=2, prefetch=3))
    forward(layer, top)
    thread = layer._prefetcher._thread
    assert thread.daemon and thread.is_alive()
    layer.close()
    assert not thread.is_alive()
    layer2, _ = make_layer(data_text(path, batch=2))
    thread2 = layer2._prefetcher._thread
    del layer2
    import gc

    gc.collect()
    thread2.join(10)
    assert not thread2.is_alive()
    assert all(t.name != thread2.name or not t.is_alive() for t in threading.enumerate())


def test_source_factory_hook(closing):
    recs = [(f"k{i}".encode(), raw_bytes(np.full((1, 1, 2), i, np.uint8), i)) for i in range(3)]
    calls = []

    def factory(lp, phase):
        calls.append((lp.name, phase))
        return ListSource(recs, name="arrow:part-0")

    previous = data_layers.set_source_factory(factory)
    try:
        layer, top = make_layer(data_text("ignored", batch=4))
        closing(layer)
    finally:
        data_layers.set_source_factory(previous)
    _, label = forward(layer, top)
    assert label.tolist() == [0, 1, 2, 0] and calls == [("data", caffe_pb2.TEST)]


def test_random_transforms_are_keyed_on_the_stream_position(closing):
    """A stream resumed with go_on_at (a stage retry) draws the crops and mirrors that the
    uninterrupted stream drew for the same batches, whatever came before."""
    rs = np.random.RandomState(0)
    recs = [
        (f"k{i}".encode(), raw_bytes(rs.randint(0, 256, (2, 8, 8)).astype(np.uint8), i))
        for i in range(10)
    ]
    text = data_text("ignored", batch=4, transform="crop_size: 5 mirror: true")

    def batches(start, count):
        def factory(lp, phase):
            source = ListSource(recs, name="shard")
            source.go_on_at(start)
            return source

        previous = data_layers.set_source_factory(factory)
        try:
            engine.set_random_seed(3)
            layer, top = make_layer(text, phase=caffe_pb2.TRAIN)
            closing(layer)
        finally:
            data_layers.set_source_factory(previous)
        return [forward(layer, top)[0].copy() for _ in range(count)]

    whole = batches(0, 4)  # records 0-3, 4-7, 8-9 and 0-1, 2-5
    resumed = batches(8, 2)
    for got, expected in zip(resumed, whole[2:]):
        np.testing.assert_array_equal(got, expected)


def test_data_layer_in_net_uses_solver_seed(tmp_path):
    rs = np.random.RandomState(0)
    recs = [
        (f"{i}", raw_bytes(rs.randint(0, 256, (1, 6, 6)).astype(np.uint8), i)) for i in range(4)
    ]
    path = write_lmdb(tmp_path / "db", recs)
    net_text = "layer { " + data_text(path, batch=4, transform="crop_size: 4 mirror: true") + " }"
    outs = []
    for _ in range(2):
        engine.set_random_seed(7)
        net = engine.Net(text_format.Parse(net_text, caffe_pb2.NetParameter()), engine.TRAIN)
        net.forward()
        outs.append(net.blobs["data"].data.copy())
        net.layers[0].close()
    assert np.array_equal(outs[0], outs[1])


# --- ImageData ---------------------------------------------------------------------------------


@needs_golden
def test_golden_imagedata():
    check_golden_case("imagedata")


def test_imagedata_shuffle_gray_and_errors(tmp_path, closing):
    rs = np.random.RandomState(0)
    lines = []
    for i in range(5):
        Image.fromarray(rs.randint(0, 256, (6, 8, 3)).astype(np.uint8)).save(
            tmp_path / f"im {i}.png"
        )
        lines.append(f"im {i}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    text = (
        f'name: "img" type: "ImageData" top: "data" top: "label" '
        f'image_data_param {{ source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}/" '
        f"batch_size: 5 shuffle: true is_color: false new_height: 4 new_width: 3 }}"
    )
    engine.set_random_seed(3)
    layer, top = make_layer(text, phase=caffe_pb2.TRAIN)
    closing(layer)
    assert top[0].shape == (5, 1, 4, 3)
    epochs = [forward(layer, top)[1].tolist() for _ in range(3)]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled every pass
    (tmp_path / "bad.txt").write_text("im 0.png 0\nmissing.png 1\n")
    bad = text.replace("list.txt", "bad.txt").replace("batch_size: 5", "batch_size: 2")
    bad = bad.replace("shuffle: true", "shuffle: false")
    layer, top = make_layer(bad)
    closing(layer)
    with pytest.raises(LayerError, match=r"bad.txt key 'missing.png \(line 2\)'.*cannot read"):
        forward(layer, top)
    (tmp_path / "nolabel.txt").write_text("im 0.png\n")
    with pytest.raises(LayerError, match=r"nolabel.txt:1: expected"):
        make_layer(text.replace("list.txt", "nolabel.txt"))


# --- MemoryData --------------------------------------------------------------------------------


def test_memory_data_reset_and_set_input_arrays():
    net_text = """
    layer { name: "mem" type: "MemoryData" top: "data" top: "label"
            memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
    """
    net = engine.Net(text_format.Parse(net_text, caffe_pb2.NetParameter()), engine.TEST)
    with pytest.raises(LayerError, match="call reset"):
        net.forward()
    data = np.arange(4 * 6, dtype=np.float32).reshape(4, 1, 2, 3)
    labels = np.array([5, 6, 7, 8], np.float32)
    data_layers.set_input_arrays(net, data, labels)
    seen = []
    for _ in range(3):
        out = net.forward()
        seen.append((out["data"].copy(), out["label"].copy()))
    assert np.array_equal(seen[0][0], data[:2]) and seen[1][1].tolist() == [7, 8]
    assert np.array_equal(seen[2][0], data[:2])
    layer = net.layers[0]
    with pytest.raises(LayerError, match="positive multiple of the batch size"):
        layer.reset(data[:3], labels[:3])
    with pytest.raises(LayerError, match="N x 1x2x3"):
        layer.reset(np.zeros((2, 3, 2, 3), np.float32), labels[:2])
    layer.reset(data, labels.reshape(4, 1, 1, 1))
    layer.add_datum_vector([datum.array_to_datum(np.full((1, 2, 3), 4, np.uint8), 9)] * 2)
    out = net.forward()
    assert (out["data"] == 4).all() and out["label"].tolist() == [9, 9]


# --- HDF5 --------------------------------------------------------------------------------------


@needs_golden
def test_golden_hdf5data():
    check_golden_case("hdf5")


def test_hdf5data_shuffle_covers_rows_and_missing_dataset(tmp_path):
    for name, rows in [("a.h5", range(0, 3)), ("b.h5", range(3, 5))]:
        with h5py.File(tmp_path / name, "w") as f:
            f["data"] = np.array(list(rows), np.float64).reshape(-1, 1)
            f["label"] = np.array(list(rows), np.int32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n\n{tmp_path / 'b.h5'}\n")
    text = (
        f'name: "h" type: "HDF5Data" top: "data" top: "label" '
        f'hdf5_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: 5 shuffle: true }}'
    )
    engine.set_random_seed(0)
    layer, top = make_layer(text, phase=caffe_pb2.TRAIN)
    for _ in range(3):
        data, label = forward(layer, top)
        assert sorted(label.tolist()) == [0, 1, 2, 3, 4] and np.array_equal(data[:, 0], label)
    with pytest.raises(LayerError, match=r"[ab].h5: no dataset 'feat'"):
        make_layer(text.replace('top: "label"', 'top: "feat"'))


def test_hdf5output_appends_batches(tmp_path):
    out = tmp_path / "out.h5"
    lp = layer_param(
        f'name: "o" type: "HDF5Output" bottom: "d" bottom: "l" '
        f'hdf5_output_param {{ file_name: "{out}" }}'
    )
    layer = engine.layer.create_layer(lp, caffe_pb2.TEST)
    d = engine.Blob((2, 3, 1, 1))
    lab = engine.Blob((2,))
    layer.setup([d, lab], [])
    for k in range(2):
        d.data[...] = k
        lab.data[...] = [k, k + 10]
        layer.reshape([d, lab], [])
        layer.forward([d, lab], [])
    layer.close()
    with h5py.File(out, "r") as f:
        assert f["data"].shape == (4, 3, 1, 1) and f["label"][()].tolist() == [0, 10, 1, 11]
