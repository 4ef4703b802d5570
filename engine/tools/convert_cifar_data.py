"""Caffe's convert_cifar_data: the CIFAR-10 binary batches (data_batch_1..5.bin, test_batch.bin)
-> OUTPUT/cifar10_train_<db> and OUTPUT/cifar10_test_<db> of 3 x 32 x 32 uint8 Datums.

Pixels are stored as the files hold them (R, G, B planes), like Caffe's tool; keys are the
5-digit item index (train: batch * 10000 + item). Usage:
python -m engine.tools.convert_cifar_data INPUT_FOLDER OUTPUT_FOLDER [DB_TYPE=lmdb]
"""

import os

import numpy as np

from engine.data.lmdb_io import LMDBWriter
from engine.data.sources import DataSourceError
from engine.proto import caffe_pb2
from engine.tools import FlagParser, run_main, setup_logging

USAGE = "convert_cifar_data input_folder output_folder db_type"
SIZE = 32
IMAGE_BYTES = 3 * SIZE * SIZE
BATCH_ITEMS = 10000
TRAIN_BATCHES = 5


def read_batch(path):
    """(labels, images N x 3 x 32 x 32) of one CIFAR-10 binary batch file (1 + 3072 bytes each)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataSourceError(f"{path}: cannot open CIFAR batch: {e.strerror}") from None
    if not raw or len(raw) % (IMAGE_BYTES + 1):
        raise DataSourceError(
            f"{path}: {len(raw)} bytes is not a whole number of {IMAGE_BYTES + 1}-byte records"
        )
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, IMAGE_BYTES + 1)
    return rec[:, 0], rec[:, 1:].reshape(-1, 3, SIZE, SIZE)


def _write(db_path, batches, log):
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = 3, SIZE, SIZE
    with LMDBWriter(db_path) as db:
        for base, labels, imgs in batches:
            for i in range(len(labels)):
                datum.label = int(labels[i])
                datum.data = imgs[i].tobytes()
                db.put(f"{base + i:05d}", datum.SerializeToString())


def convert(input_folder, output_folder, db_type, log):
    if db_type.lower() != "lmdb":
        raise DataSourceError(f"db type {db_type!r} is not supported (use lmdb)")
    os.makedirs(output_folder, exist_ok=True)
    log.info("Writing Training data")
    train = []
    for b in range(TRAIN_BATCHES):
        log.info("Training Batch %d", b + 1)
        labels, imgs = read_batch(os.path.join(input_folder, f"data_batch_{b + 1}.bin"))
        train.append((b * BATCH_ITEMS, labels, imgs))
    _write(os.path.join(output_folder, f"cifar10_train_{db_type}"), train, log)
    log.info("Writing Testing data")
    labels, imgs = read_batch(os.path.join(input_folder, "test_batch.bin"))
    _write(os.path.join(output_folder, f"cifar10_test_{db_type}"), [(0, labels, imgs)], log)
    return sum(len(t[1]) for t in train), len(labels)


def main(argv):
    parser = FlagParser(
        "convert_cifar_data",
        USAGE,
        "This script converts the CIFAR dataset to the leveldb/lmdb format used by Caffe.",
    )
    _, args = parser.parse(argv)
    if len(args) not in (2, 3):
        parser.fail("needs input_folder output_folder [db_type]")
    log = setup_logging("convert_cifar_data")
    convert(args[0], args[1], args[2] if len(args) == 3 else "lmdb", log)
    return 0


if __name__ == "__main__":
    run_main(main)
