"""Turns the bundled digits (data/digits.npz) into Caffe's MNIST files and LMDBs, the way a
Caffe user prepares MNIST: IDX files, then convert_mnist_data.

Usage: python data/prepare_digits.py [OUT_DIR]   (default: work/; existing LMDBs are kept)
"""

import sys
from pathlib import Path

import numpy as np

from engine.tools import convert_mnist_data

HERE = Path(__file__).resolve().parent


def write_idx(images, labels, image_path, label_path):
    n, rows, cols = images.shape
    header = np.array([convert_mnist_data.IMAGE_MAGIC, n, rows, cols], dtype=">u4")
    image_path.write_bytes(header.tobytes() + images.astype(np.uint8).tobytes())
    lheader = np.array([convert_mnist_data.LABEL_MAGIC, n], dtype=">u4")
    label_path.write_bytes(lheader.tobytes() + labels.astype(np.uint8).tobytes())


def prepare(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = np.load(HERE / "digits.npz")
    for split in ("train", "test"):
        db = out / f"digits_{split}_lmdb"
        if (db / "data.mdb").exists():
            print(f"{db} exists, kept")
            continue
        images = out / f"digits-{split}-images-idx3-ubyte"
        labels = out / f"digits-{split}-labels-idx1-ubyte"
        write_idx(digits[f"{split}_images"], digits[f"{split}_labels"], images, labels)
        convert_mnist_data.main([str(images), str(labels), str(db)])
    return out


if __name__ == "__main__":
    prepare(sys.argv[1] if len(sys.argv) > 1 else "work")
