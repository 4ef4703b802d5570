"""Caffe's convert_mnist_data: MNIST IDX image and label files -> an LMDB of 1 x rows x cols
uint8 Datums keyed by the 8-digit item index.

Usage: python -m engine.tools.convert_mnist_data [FLAGS] INPUT_IMAGE_FILE INPUT_LABEL_FILE DB
"""

import gzip

import numpy as np

from engine.data.lmdb_io import LMDBWriter
from engine.data.sources import DataSourceError
from engine.proto import caffe_pb2
from engine.tools import FlagParser, run_main, setup_logging

USAGE = "convert_mnist_data [FLAGS] input_image_file input_label_file output_db_file"
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049


def flags():
    p = FlagParser(
        "convert_mnist_data",
        USAGE,
        "Convert the MNIST dataset to the lmdb/leveldb format used by Caffe.",
    )
    p.string("backend", "lmdb", "The backend {lmdb, leveldb} for storing the result")
    return p


def _read(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataSourceError(f"{path}: cannot read: {e}") from None


def read_idx(image_file, label_file):
    """(uint8 images N x rows x cols, uint8 labels N) from big-endian IDX files."""
    img, lab = _read(image_file), _read(label_file)
    if len(img) < 16 or len(lab) < 8:
        raise DataSourceError(f"{image_file} / {label_file}: too short for IDX headers")
    magic, n, rows, cols = np.frombuffer(img[:16], dtype=">u4")
    if magic != IMAGE_MAGIC:
        raise DataSourceError(
            f"{image_file}: incorrect image file magic {magic} (not {IMAGE_MAGIC})"
        )
    lmagic, nl = np.frombuffer(lab[:8], dtype=">u4")
    if lmagic != LABEL_MAGIC:
        raise DataSourceError(
            f"{label_file}: incorrect label file magic {lmagic} (not {LABEL_MAGIC})"
        )
    if n != nl:
        raise DataSourceError(f"{image_file}: {n} images but {label_file} has {nl} labels")
    need = 16 + int(n) * int(rows) * int(cols)
    if len(img) < need or len(lab) < 8 + int(n):
        raise DataSourceError(f"{image_file}: truncated ({len(img)} bytes, header says {need})")
    images = np.frombuffer(img, dtype=np.uint8, count=need - 16, offset=16)
    labels = np.frombuffer(lab, dtype=np.uint8, count=int(n), offset=8)
    return images.reshape(int(n), int(rows), int(cols)), labels


def convert(image_file, label_file, db_path, log):
    images, labels = read_idx(image_file, label_file)
    n, rows, cols = images.shape
    log.info("A total of %d items.", n)
    log.info("Rows: %d Cols: %d", rows, cols)
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = 1, rows, cols
    with LMDBWriter(db_path) as db:
        for i in range(n):
            datum.data = images[i].tobytes()
            datum.label = int(labels[i])
            db.put(f"{i:08d}", datum.SerializeToString())
    log.info("Processed %d files.", n)
    return n


def main(argv):
    parser = flags()
    opts, args = parser.parse(argv)
    if len(args) != 3:
        parser.fail("needs input_image_file input_label_file output_db_file")
    if opts.backend.lower() != "lmdb":
        raise DataSourceError(f"backend {opts.backend!r} is not supported (use --backend=lmdb)")
    convert(args[0], args[1], args[2], setup_logging("convert_mnist_data"))
    return 0


if __name__ == "__main__":
    run_main(main)
