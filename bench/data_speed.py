"""Data pipeline throughput: LMDB read + Datum decode + transform, in records/s and MB/s.

Cases (LMDBs generated in a temp dir): raw 28x28 grey (LeNet), raw 32x32 colour with a mean
file (CIFAR), encoded 256x256 JPEG with a TRAIN random 227 crop + mirror (ImageNet). Each runs
on one core (the batcher called in the main thread) and through the Data layer with its
prefetch thread. Usage: python bench/data_speed.py [--seconds 3] [--jpeg-records 512]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from google.protobuf import text_format

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import engine  # noqa: E402
from engine import io  # noqa: E402
from engine.data import images  # noqa: E402
from engine.data.datum import array_to_datum, encoded_datum  # noqa: E402
from engine.data.lmdb_io import LMDBWriter  # noqa: E402
from engine.layer import create_layer  # noqa: E402
from engine.proto import caffe_pb2  # noqa: E402


def smooth_images(rs, n, h, w, c):
    """Natural-ish pictures (gradients, blobs, a little noise): JPEG sizes like photos."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, c), np.uint8)
    for i in range(n):
        fx, fy, ph = rs.uniform(0.01, 0.08, 3)
        base = 127 + 60 * np.sin(xx * fx + ph)[..., None] * np.cos(yy * fy)[..., None]
        tint = rs.uniform(0.6, 1.4, c)[None, None, :]
        noise = rs.normal(0, 12, (h, w, c))
        out[i] = np.clip(base * tint + noise, 0, 255).astype(np.uint8)
    return out


def make_raw_lmdb(path, n, c, h, w, seed):
    rs = np.random.RandomState(seed)
    total = 0
    with LMDBWriter(path) as db:
        for i in range(n):
            arr = rs.randint(0, 256, (c, h, w)).astype(np.uint8)
            v = array_to_datum(arr, i % 10).SerializeToString()
            total += c * h * w
            db.put(f"{i:08d}", v)
    return total / n


def make_jpeg_lmdb(path, n, size, seed):
    rs = np.random.RandomState(seed)
    total = 0
    with LMDBWriter(path) as db:
        for start in range(0, n, 64):
            imgs = smooth_images(rs, min(64, n - start), size, size, 3)
            for j, img in enumerate(imgs):
                data = images.encode_image(img, "jpg")
                total += len(data)
                db.put(
                    f"{start + j:08d}", encoded_datum(data, (start + j) % 1000).SerializeToString()
                )
    return total / n


def layer_for(source, batch, transform, phase, prefetch):
    text = (
        f'name: "data" type: "Data" top: "data" top: "label" transform_param {{ {transform} }} '
        f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB '
        f"prefetch: {prefetch} }}"
    )
    layer = create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()), phase)
    top = [engine.Blob(), engine.Blob()]
    layer.setup([], top)
    return layer, top


def timed(step, batch, seconds):
    step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += batch
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def run_case(name, source, batch, transform, phase, bytes_per_record, out_bytes, seconds):
    engine.set_random_seed(1)
    # One core: the batch producer (read + decode + transform) called in this thread.
    layer, top = layer_for(source, batch, transform, phase, prefetch=0)
    one = timed(lambda: layer._batcher(None), batch, seconds)
    layer.close()
    # Prefetching: the net's view, forward() of the Data layer (copy into the top blobs).
    layer, top = layer_for(source, batch, transform, phase, prefetch=4)
    pre = timed(lambda: layer.forward([], top), batch, seconds)
    layer.close()
    for label, rate in (("1 core", one), ("prefetch", pre)):
        print(
            f"{name:<34} {label:<9} {rate:>10.0f} rec/s  "
            f"{rate * bytes_per_record / 1e6:>8.1f} MB/s "
            f"datum  {rate * out_bytes / 1e6:>8.1f} MB/s float32 out"
        )
    return one, pre


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--records", type=int, default=20000, help="records of the raw LMDBs")
    ap.add_argument("--jpeg-records", type=int, default=512, help="records of the JPEG LMDB")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="data_speed_") as tmp:
        t0 = time.perf_counter()
        gray = make_raw_lmdb(os.path.join(tmp, "gray28"), args.records, 1, 28, 28, 0)
        color = make_raw_lmdb(os.path.join(tmp, "color32"), args.records, 3, 32, 32, 1)
        jpeg = make_jpeg_lmdb(os.path.join(tmp, "jpeg256"), args.jpeg_records, 256, 2)
        mean = np.random.RandomState(3).uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)
        mean_file = os.path.join(tmp, "mean.binaryproto")
        io.write_binary(mean_file, io.array_to_blobproto(mean))
        print(
            f"generated LMDBs in {time.perf_counter() - t0:.1f} s "
            f"(JPEG mean size {jpeg / 1024:.1f} KiB); cores visible: {os.cpu_count()}"
        )
        print(f"{'case':<34} {'mode':<9} {'records/s':>10}       {'MB/s of Datum bytes':>8}")
        run_case(
            "raw 28x28 grey b64 scale",
            os.path.join(tmp, "gray28"),
            64,
            "scale: 0.00390625",
            caffe_pb2.TRAIN,
            gray,
            28 * 28 * 4,
            args.seconds,
        )
        run_case(
            "raw 32x32 colour b100 mean_file",
            os.path.join(tmp, "color32"),
            100,
            f'mean_file: "{mean_file}"',
            caffe_pb2.TRAIN,
            color,
            3 * 32 * 32 * 4,
            args.seconds,
        )
        run_case(
            "jpeg 256 -> crop 227 mirror b32",
            os.path.join(tmp, "jpeg256"),
            32,
            "crop_size: 227 mirror: true mean_value: 104 mean_value: 117 mean_value: 123",
            caffe_pb2.TRAIN,
            jpeg,
            3 * 227 * 227 * 4,
            args.seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
